"""Fixtures of the pod runtime tests (see _podkit.py)."""

from tests.pod._podkit import env

__all__ = ["env"]

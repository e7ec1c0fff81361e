"""Fixtures of the infra tests: the pod tests' per-test network and leak check."""

from tests.pod._podkit import env

__all__ = ["env"]

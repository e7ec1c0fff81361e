"""vminit's event loop on epoll, without a VM."""

from __future__ import annotations

import os

import pytest

from magikrun.vminit._init import Loop


def test_loop_runs_readers_and_timers_in_order_and_stops() -> None:
    loop = Loop()
    read_fd, write_fd = os.pipe()
    seen: list[str] = []

    def readable() -> None:
        seen.append(os.read(read_fd, 10).decode())
        loop.remove_reader(read_fd)
        loop.call_later(0.0, stop)

    def stop() -> None:
        seen.append("stop")
        loop.running = False

    try:
        loop.add_reader(read_fd, readable)
        loop.call_later(0.01, lambda: os.write(write_fd, b"data"))
        cancelled = loop.call_later(0.0, lambda: seen.append("cancelled"))
        cancelled[0] = True
        loop.run()
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert seen == ["data", "stop"]


def test_a_reader_removed_by_an_earlier_callback_is_not_called() -> None:
    loop = Loop()
    first_r, first_w = os.pipe()
    second_r, second_w = os.pipe()
    called: list[int] = []

    def on_ready(fd: int, other: int) -> None:
        called.append(fd)
        loop.remove_reader(fd)
        loop.remove_reader(other)
        loop.running = False

    try:
        os.write(first_w, b"x")
        os.write(second_w, b"x")
        loop.add_reader(first_r, lambda: on_ready(first_r, second_r))
        loop.add_reader(second_r, lambda: on_ready(second_r, first_r))
        loop.run()
    finally:
        for fd in (first_r, first_w, second_r, second_w):
            os.close(fd)
    assert len(called) == 1


def test_one_interest_per_fd() -> None:
    loop = Loop()
    read_fd, write_fd = os.pipe()
    try:
        loop.add_reader(read_fd, lambda: None)
        with pytest.raises(KeyError, match=f"fd {read_fd} is already registered"):
            loop.add_writer(read_fd, lambda: None)
        loop.remove_reader(read_fd)
        loop.add_writer(write_fd, lambda: None)
        loop.remove_writer(write_fd)
    finally:
        os.close(read_fd)
        os.close(write_fd)

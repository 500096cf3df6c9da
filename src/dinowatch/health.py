"""How long each worker has been on its current item: what the systemd watchdog looks at.

A thread alive but stuck (a hung network mount under a decoder, a store write that never
returns, a wedged MQTT drain) is as useless as a dead one; systemd can only restart it if we
stop sending WATCHDOG=1. Each stage marks when it starts and ends an item, or beats once per
loop when it polls; the daemon pings only while no stage with work is stuck.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TASKS = Path("/proc/self/task")  # one folder per thread of this process (Linux)


class Activity:
    """Per-thread start times of the items in progress, plus the last beat of a polling loop."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._since: dict[int, float] = {}
        self._beat = time.monotonic()

    @contextmanager
    def working(self) -> Iterator[None]:
        """Around one item of work on the calling thread."""
        thread = threading.get_ident()
        self._since[thread] = time.monotonic()
        try:
            yield
        finally:
            self._since.pop(thread, None)

    def beat(self) -> None:
        """A polling loop came round once more."""
        self._beat = time.monotonic()

    def stuck_for(self) -> float:
        """Seconds the oldest item in progress has taken (0 when idle)."""
        now = time.monotonic()
        return max((now - since for since in list(self._since.values())), default=0.0)

    def silent_for(self) -> float:
        """Seconds since the polling loop last came round."""
        return time.monotonic() - self._beat


class CpuClock:
    """CPU seconds per pipeline stage, summed over the threads that ran it.

    time.thread_time() counts only the calling thread's CPU, so waits (a full queue, an
    fsync, the GIL) are not charged to a stage: the sum over stages, per image, is the CPU
    an image costs, and cores / that sum is the most images/s this machine can do. A stage
    that hands work to native threads (ONNX Runtime's intra-op pool) is timed with `pool`:
    the CPU of the threads Python did not start is charged to it too, read from Linux's
    /proc/self/task/<tid>/schedstat (nanoseconds on the CPU; proc(5)).
    """

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    @contextmanager
    def timing(self, stage: str, *, pool: bool = False) -> Iterator[None]:
        """Charge the CPU time inside the block to `stage` (`pool`: native threads' too)."""
        start = time.thread_time() + (native_threads_cpu() if pool else 0.0)
        try:
            yield
        finally:
            spent = time.thread_time() + (native_threads_cpu() if pool else 0.0) - start
            with self._lock:
                self._seconds[stage] = self._seconds.get(stage, 0.0) + spent

    def seconds(self) -> dict[str, float]:
        """{stage: CPU seconds} so far, rounded to the millisecond."""
        with self._lock:
            return {stage: round(value, 3) for stage, value in self._seconds.items()}


def native_threads_cpu() -> float:
    """CPU seconds of this process's threads that Python did not start (0 where /proc has
    no schedstat)."""
    python = {thread.native_id for thread in threading.enumerate()}
    total = 0
    try:
        tasks = list(TASKS.iterdir())
    except OSError:
        return 0.0
    for task in tasks:
        if int(task.name) in python:
            continue
        try:
            total += int((task / "schedstat").read_bytes().split()[0])
        except (OSError, ValueError, IndexError):  # the thread ended, or no schedstat
            continue
    return total / 1e9

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

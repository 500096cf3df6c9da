"""Faults no real part can be made to produce on demand, injected into the real daemon.

Put this folder on PYTHONPATH of a `dinowatch run` process and name the fault in
DINOWATCH_FAULT; it arms once the file named by DINOWATCH_FAULT_TRIGGER exists:

- `writer`: the database's next write fails, and so does its ROLLBACK (an I/O error on the
  disk): the store's writer thread must stop and the daemon must exit non-zero.
- `hang`: decoding a file whose name contains "hang" never returns (a hung network mount);
  the daemon's stall limits are shortened so the watchdog notices within seconds.
- `short-limits`: no fault, only the stall limit, the database's busy timeout and the store
  probe shortened, so a test sees in seconds what takes minutes in the field.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

FAULT = os.environ.get("DINOWATCH_FAULT", "")
TRIGGER = Path(os.environ.get("DINOWATCH_FAULT_TRIGGER", "/nonexistent"))


class _FailingConnection:
    """A sqlite3 connection whose statements fail once TRIGGER exists (BEGIN still works,
    so a transaction is open when its ROLLBACK fails)."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)

    def execute(self, sql: str, *args: Any) -> Any:
        if TRIGGER.exists() and sql != "BEGIN IMMEDIATE":
            raise sqlite3.OperationalError("disk I/O error")
        return self._connection.execute(sql, *args)

    def executemany(self, sql: str, *args: Any) -> Any:
        if TRIGGER.exists():
            raise sqlite3.OperationalError("disk I/O error")
        return self._connection.executemany(sql, *args)


if FAULT == "writer":
    from dinowatch import store

    _write_loop = store.Store._write_loop

    def _failing_write_loop(self: store.Store, connection: sqlite3.Connection) -> None:
        _write_loop(self, _FailingConnection(connection))  # type: ignore[arg-type]

    store.Store._write_loop = _failing_write_loop  # type: ignore[method-assign]

elif FAULT == "short-limits":
    from dinowatch import daemon, pipeline, store

    daemon.STUCK_SECONDS = 2.0
    store.BUSY_TIMEOUT_SECONDS = 0.5
    pipeline.STORE_PROBE_SECONDS = 0.5

elif FAULT == "hang":
    from dinowatch import daemon, embedder

    daemon.STUCK_SECONDS = 2.0
    _prepare = embedder.DinoEmbedder.prepare

    def _hanging_prepare(self: embedder.DinoEmbedder, image: Any, *, name: str | None = None
                         ) -> embedder.Prepared:
        if TRIGGER.exists() and name and "hang" in name:
            threading.Event().wait()  # for ever
        return _prepare(self, image, name=name)

    embedder.DinoEmbedder.prepare = _hanging_prepare  # type: ignore[method-assign]

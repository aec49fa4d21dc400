"""The sent-journal: deliveries confirmed downstream whose attempt record is not committed yet.

A destination that is not idempotent (MLLP) sends one message at a time, and the next
may go only once the last one's success would survive a crash; otherwise a crash repeats
every message sent since the last commit. Committing each attempt before the next send
ties every send to a turn of the store's writer, which ingest keeps busy with its own
commits. So the success goes first to this file, one `write` of eight bytes that the
kernel keeps when the process is killed, and the attempt record follows in a group
commit. At start, before any queue is read, the engine records as sent what the file
holds and the store does not (`Store.record_journaled`), and empties the file.

A power cut may lose the file's tail together with the records not yet committed: those
messages are sent again, which at-least-once allows.

The file is written in two generations so it need not grow: once the current one passes
`LIMIT`, appends go to the other as soon as every entry there is recorded in the store.
"""

from __future__ import annotations

import os
import struct

from twisted.logger import Logger

log = Logger()

_ENTRY = struct.Struct("<Q")


class SentJournal:
    LIMIT = 1 << 20  # bytes in a generation before appends move to the other one

    def __init__(self, path: str):
        self.paths = (f"{path}.0", f"{path}.1")
        self._fds: list[int] | None = None
        self._sizes = [0, 0]
        self._unrecorded = [0, 0]
        self._current = 0

    @classmethod
    def for_store(cls, url: str, node: str) -> SentJournal | None:
        """The journal beside a SQLite store file, one per engine; None where there is no such file.

        A PostgreSQL store is shared by engines that take over each other's queues and
        could not read a journal on another machine: there each record commits first.
        """
        from ..config import sqlite_path

        path = sqlite_path(url)
        return None if path is None else cls(f"{path}-sent-{node}")

    def entries(self) -> list[int]:
        """Every delivery id in the journal, as written (before `open`)."""
        ids = []
        for path in self.paths:
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                continue
            whole = len(data) - len(data) % _ENTRY.size   # a torn last entry was never confirmed
            ids.extend(entry[0] for entry in _ENTRY.iter_unpack(data[:whole]))
        return ids

    def open(self):
        """Empty both generations and keep them open for appends: call once what they held is recorded."""
        self._fds = [os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o600)
                     for path in self.paths]
        self._sizes, self._unrecorded, self._current = [0, 0], [0, 0], 0

    def close(self):
        """Stop appending; a journal whose every entry is recorded is left empty."""
        fds, self._fds = self._fds, None
        for fd in fds or ():
            if not any(self._unrecorded):
                os.ftruncate(fd, 0)
            os.close(fd)

    def sent(self, delivery_id: int) -> int | None:
        """Note a confirmed delivery; returns the generation to pass to `recorded`, None if it could not be written."""
        if self._fds is None:
            return None
        current = self._current
        other = 1 - current
        if self._sizes[current] >= self.LIMIT and self._unrecorded[other] == 0:
            try:
                os.ftruncate(self._fds[other], 0)
            except OSError as e:
                log.warn("cannot empty the sent-journal {path}: {error}", path=self.paths[other],
                         error=e.strerror)
            else:
                self._sizes[other], self._current = 0, other
                current = other
        try:
            os.write(self._fds[current], _ENTRY.pack(delivery_id))
        except OSError as e:
            log.warn("cannot write the sent-journal {path}: {error}; deliveries wait for their "
                     "records", path=self.paths[current], error=e.strerror)
            return None
        self._sizes[current] += _ENTRY.size
        self._unrecorded[current] += 1
        return current

    def recorded(self, generation: int):
        """The attempt record of an entry of `generation` is committed (or failed: the queue is read again)."""
        self._unrecorded[generation] -= 1

"""The directory source: files of HL7 messages dropped in a folder, picked up, stored, moved aside.

A file is moved to `done/` once every message in it is committed (or was already
stored: a file dropped twice is answered from the store), and to `error/` if any
of its messages was rejected. Until its messages are committed it stays where it
is, so a crash or a store failure loses nothing: it is picked up again.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.logger import Logger

from .. import hl7
from ..store import REJECTED
from .config import ChannelConfig

log = Logger()

#: A file younger than this may still be being written by its producer.
SETTLE_SECONDS = 1.0


class DirectorySource(service.Service):
    def __init__(self, channel: ChannelConfig, ingest, reactor):
        self.channel = channel
        self.ingest = ingest
        self.reactor = reactor
        self.folder = Path(channel.source.path)
        self.setName(f"directory:{channel.name}")
        self._loop: task.LoopingCall | None = None
        self._scanning: defer.Deferred | None = None

    def startService(self):
        super().startService()
        for sub in ("done", "error"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.reactor
        self._loop.start(self.channel.source.interval, now=True)
        log.info("watching {folder} for channel {name}", folder=str(self.folder), name=self.channel.name)

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return self._scanning or defer.succeed(None)

    def _tick(self):
        if self._scanning is None:
            self._scanning = self.scan()
            self._scanning.addBoth(self._scanned)

    def _scanned(self, result):
        self._scanning = None
        if isinstance(result, Exception) or hasattr(result, "getErrorMessage"):
            log.error("directory {folder}: {error}", folder=str(self.folder),
                      error=result.getErrorMessage())

    @defer.inlineCallbacks
    def scan(self):
        for path in (yield threads.deferToThread(self._ready)):
            if not self.running:
                break
            yield self._take(path)

    def _ready(self) -> list[Path]:
        """Files matching the pattern that nobody has written to for a moment, oldest first."""
        now = time.time()
        found = []
        for path in self.folder.glob(self.channel.source.pattern):
            if path.name.startswith(".") or not path.is_file():
                continue
            mtime = path.stat().st_mtime
            if now - mtime >= SETTLE_SECONDS:
                found.append((mtime, path.name, path))
        return [p for _, _, p in sorted(found)]

    @defer.inlineCallbacks
    def _take(self, path: Path):
        data = yield threads.deferToThread(path.read_bytes)
        parts = hl7.split_file(data)
        if not parts:
            yield threads.deferToThread(_move, path, self.folder / "error")
            log.warn("{file}: no HL7 message in it; moved to error/", file=path.name)
            return
        results = yield defer.gatherResults([self.ingest.store(part, f"file:{path.name}") for part in parts],
                                            consumeErrors=True)
        rejected = sum(1 for _, outcome in results if outcome.state == REJECTED)
        folder = self.folder / ("error" if rejected else "done")
        yield threads.deferToThread(_move, path, folder)
        log.info("{file}: {count} message(s) stored, {bad} rejected; moved to {to}/",
                 file=path.name, count=len(parts), bad=rejected, to=folder.name)


def _move(path: Path, folder: Path):
    """Move aside without ever overwriting an earlier file of the same name."""
    target = folder / path.name
    n = 1
    while target.exists():
        target = folder / f"{path.stem}.{n}{path.suffix}"
        n += 1
    os.replace(path, target)

"""Where channels filter and transform: in a process of their own, or in the engine's.

Parsing, filters and templates are the heaviest per-message work after the store's.
In the engine process they take the GIL from the reactor (ACKs, downstream MLLP)
and from the store writer; in a process of their own they run on another core, and
a template cannot touch the engine's memory at all. The engine sends a batch of
stored messages (id, raw bytes, channel) and gets back what each channel made of
them (`store.Processed`), in order. The channel set travels once per version
(`Snapshot`), when the process has not seen it yet.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from twisted.logger import Logger

from .. import hl7
from ..store import Processed
from .config import ChannelConfig
from .pipeline import decide
from .templating import Mappings

log = Logger()

_versions = itertools.count(1)
ORPHAN_CHECK = 0.5   # seconds between the child's looks at whether the engine still runs


@dataclass(frozen=True)
class Snapshot:
    """The channel set as one batch is processed with it: a reload makes a new one."""

    version: int
    channels: dict[str, ChannelConfig]
    mappings: Mappings

    @classmethod
    def of(cls, channels: dict[str, ChannelConfig], mappings: Mappings) -> Snapshot:
        return cls(next(_versions), dict(channels), mappings)


def process(batch, snapshot: Snapshot, charsets: dict) -> list[Processed]:
    """Filter and transform `batch` ((message id, raw, channel) each) as the channels say."""
    results = []
    for message_id, raw, name in batch:
        channel = snapshot.channels.get(name)
        if channel is None:
            continue  # the channel was removed: the message stays `received`
        msg = hl7.parse(raw, **charsets)
        decision = decide(channel, snapshot.mappings, msg, raw)
        results.append(Processed(message_id, name, decision.filter_reason, decision.deliveries))
    return results


class InProcess:
    """Processing on the calling thread, in the engine's process."""

    def __init__(self, charsets: dict):
        self.charsets = charsets

    def __call__(self, batch, snapshot: Snapshot) -> list[Processed]:
        return process(batch, snapshot, self.charsets)

    def start(self):
        pass

    def close(self):
        pass


class OwnProcess:
    """Processing in one child process; called from one thread at a time (the runtime's processor)."""

    def __init__(self, charsets: dict):
        self.charsets = charsets
        self._pool: ProcessPoolExecutor | None = None
        self._known = 0   # the newest snapshot version the child has

    def start(self):
        """Start the child now (it takes about half a second), so the first message does not wait for it."""
        if self._pool is None:
            # spawn: a fork would copy the reactor's and the writer's threads mid-flight
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_start, initargs=(self.charsets, os.getpid()))
            self._known = 0
            self._pool.submit(_ready).result()

    def __call__(self, batch, snapshot: Snapshot) -> list[Processed]:
        for last in (False, True):
            self.start()
            sent = None if snapshot.version == self._known else (
                snapshot.channels, snapshot.mappings.directory, snapshot.mappings.timezone)
            try:
                results = self._pool.submit(_process, batch, snapshot.version, sent).result()
            except BrokenProcessPool:
                self._pool.shutdown(wait=False)
                self._pool = None
                if last:
                    log.error("the channel processor process ended twice on a batch of {count} messages; "
                              "they stay received and are processed again at the next start or reload",
                              count=len(batch))
                    raise
                log.warn("the channel processor process ended unexpectedly; starting a new one")
                continue
            self._known = snapshot.version
            return results

    def close(self):
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


# -- in the child process ---------------------------------------------------------------

_child: dict = {}


def _start(charsets: dict, engine: int):
    _child["charsets"] = charsets
    threading.Thread(target=_end_with, args=(engine,), name="engine-watch", daemon=True).start()


def _end_with(engine: int):
    """Exit once the engine is gone (killed, it cannot say so): a child must not outlive it."""
    while os.getppid() == engine:
        time.sleep(ORPHAN_CHECK)
    os._exit(0)


def _ready():
    pass


def _process(batch, version: int, sent) -> list[Processed]:
    snapshot = _child.get("snapshot")
    if sent is not None:
        channels, directory, timezone = sent
        snapshot = _child["snapshot"] = Snapshot(version, channels, Mappings(directory, timezone=timezone))
    return process(batch, snapshot, _child["charsets"])

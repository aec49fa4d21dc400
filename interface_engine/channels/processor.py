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
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass

from twisted.logger import Logger

from .. import children, hl7
from ..store import Processed
from .config import ChannelConfig
from .pipeline import decide
from .templating import Mappings

log = Logger()

_versions = itertools.count(1)


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
    """Processing in one child process, over a pipe; called from one thread at a time (the runtime's processor).

    A plain child (``python -m interface_engine.channels.processor``) rather than a
    multiprocessing pool: no semaphores or resource tracker, and a child whose
    engine dies sees its pipe end and exits.
    """

    def __init__(self, charsets: dict):
        self.charsets = charsets
        self._child: subprocess.Popen | None = None
        self._known = 0   # the newest snapshot version the child has

    def start(self):
        """Start the child now (it takes about half a second), so the first message does not wait for it."""
        if self._child is None:
            self._child = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, close_fds=True)
            self._known = 0
            self._ask(("start", self.charsets))

    def __call__(self, batch, snapshot: Snapshot) -> list[Processed]:
        for last in (False, True):
            self.start()
            sent = None if snapshot.version == self._known else (
                snapshot.channels, snapshot.mappings.directory, snapshot.mappings.timezone)
            try:
                results = self._ask(("batch", batch, snapshot.version, sent))
            except ChildGone:
                self._end()
                if last:
                    log.error("the channel processor process ended twice on a batch of {count} messages; "
                              "they stay received and are processed again at the next start or reload",
                              count=len(batch))
                    raise
                log.warn("the channel processor process ended unexpectedly; starting a new one")
                continue
            self._known = snapshot.version
            return results

    def _ask(self, request):
        child = self._child
        try:
            pickle.dump(request, child.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            child.stdin.flush()
            answer, value = pickle.load(child.stdout)
        except (OSError, EOFError, pickle.UnpicklingError):
            raise ChildGone() from None
        if answer == "error":
            raise RuntimeError(f"channel processor: {value}")
        return value

    def _end(self):
        child, self._child = self._child, None
        if child is not None:
            children.end(child, wait=5)

    def close(self):
        self._end()   # its stdin closed, the child ends


class ChildGone(Exception):
    """The child process ended or its pipe broke."""


# -- in the child process ---------------------------------------------------------------

def _serve(requests, answers):
    """Answer requests until the engine closes the pipe (or is gone)."""
    charsets, snapshot = {}, None
    while True:
        try:
            request = pickle.load(requests)
        except EOFError:
            return
        kind = request[0]
        try:
            if kind == "start":
                charsets, value = request[1], None
            else:
                _, batch, version, sent = request
                if sent is not None:
                    channels, directory, timezone = sent
                    snapshot = Snapshot(version, channels, Mappings(directory, timezone=timezone))
                value = process(batch, snapshot, charsets)
            answer = ("ok", value)
        except Exception as error:  # reported to the engine by type only: the text may quote content
            answer = ("error", type(error).__name__)
        pickle.dump(answer, answers, protocol=pickle.HIGHEST_PROTOCOL)
        answers.flush()


if __name__ == "__main__":
    # The pipe to the engine is this process's own: anything printed goes to stderr instead.
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    _serve(sys.stdin.buffer, answers)

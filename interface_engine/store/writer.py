"""The store's write path in a process of its own.

The group committer's thread hands each cycle's batches (messages first, then
processing results, attempts, queue reads, leases) to this process and waits on
the pipe, so the engine's GIL stays with the reactor: sealing contents, chaining
audit events and SQLite's own work run on another core. Messages are committed in
their own transaction and answered as soon as it is, so ACKs never wait for the rest
of the cycle; on SQLite the kinds that can share one (Store.joined) share it.

A plain child (``python -c "...store.writer import main; main()"``) with pickled requests
over its stdin and answers over its stdout, as the channel processor's. It ends
when its pipe does, so a killed engine leaves no writer behind. If it dies with a
cycle in hand, that cycle's items fail (no ACK is sent for its messages; the
runtime retries its processing and attempts) and the next cycle starts a new one.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from dataclasses import dataclass

from .. import children
from .store import Store, StoreError

@dataclass(frozen=True)
class WriterSpec:
    """What the writer process needs to open the engine's store as the engine does."""

    url: str
    duplicate_window: float
    node: str
    keys_file: str


class WriteFailed(StoreError):
    """A batch's transaction failed in the writer process; the text names the error, never the values."""


class WriterGone(Exception):
    """The writer process ended or its pipe broke; `sent`: whether the cycle may have reached it."""

    def __init__(self, sent: bool = True):
        super().__init__("the store writer process ended")
        self.sent = sent


class OwnProcess:
    """The writer process, driven from one thread (the group committer's)."""

    def __init__(self, spec: WriterSpec):
        self.spec = spec
        self._child: subprocess.Popen | None = None

    def start(self):
        """Start the child now (it opens the store), so the first batch does not wait for it."""
        if self._child is None:
            # Not `-m`: this module is imported with its package, and would then run twice.
            self._child = subprocess.Popen([sys.executable, "-c", f"from {__name__} import main; main()"],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
            try:
                self._send(("start", self.spec))
                ok, why, _ = self._answer()
            except WriterGone:
                self.close()
                raise
            if not ok:
                self.close()
                raise WriteFailed(f"the store writer process cannot open the store: {why}")

    def cycle(self, kinds: list[tuple[str, str, list]]):
        """Send a cycle ((owner, method name, items) per kind) and yield each kind's
        (ok, results or WriteFailed, seconds) as the child commits it."""
        self.start()
        try:
            self._send(("cycle", kinds))
        except WriterGone:
            raise WriterGone(sent=False) from None
        for _ in kinds:
            ok, value, seconds = self._answer()
            yield ok, (value if ok else WriteFailed(value)), seconds

    def _send(self, request):
        try:
            pickle.dump(request, self._child.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self._child.stdin.flush()
        except (OSError, ValueError):
            raise WriterGone() from None

    def _answer(self):
        try:
            return pickle.load(self._child.stdout)
        except (OSError, EOFError, ValueError, pickle.UnpicklingError):
            raise WriterGone() from None

    def close(self):
        """End the child (its stdin closed, it finishes what it has and exits)."""
        child, self._child = self._child, None
        if child is not None:
            children.end(child, wait=10)


# -- in the child process ---------------------------------------------------------------

class _Writer:
    def __init__(self, spec: WriterSpec):
        from .. import keys
        from ..audit import AuditTrail
        from .cipher import Cipher
        from .leases import Leases
        from .store import Store

        self._keys, self._path = keys, spec.keys_file
        found = keys.load(spec.keys_file)
        self._stamp, self._looked = keys.file_stamp(spec.keys_file), time.monotonic()
        self.cipher = Cipher(found, reload=lambda: keys.load(spec.keys_file))
        self.store = Store(spec.url, duplicate_window=spec.duplicate_window,
                           audit=AuditTrail(found.audit, spec.node), node=spec.node, cipher=self.cipher)
        self.owners = {"store": self.store, "leases": Leases(self.store)}

    def watch_keys(self):
        """Take up a rotation as the engine does: new writes use the new data key."""
        now = time.monotonic()
        if now - self._looked < self._keys.FILE_POLL:
            return
        self._looked = now
        stamp = self._keys.file_stamp(self._path)
        if stamp is None or stamp == self._stamp:
            return
        try:
            self.cipher.use(self._keys.load(self._path))
        except self._keys.KeyFileError:
            return   # the engine logs it; the keys in use stay
        self._stamp = stamp

    def run_joined(self, group: list[tuple[str, str, list]]) -> list[tuple]:
        """Kinds in one transaction (Store.joined), answered once it has committed; if one
        fails, each again in its own, so that only that one fails."""
        started = time.perf_counter()
        results = self.store.run_joined([(getattr(self.owners[owner], name), items) for owner, name, items in group])
        if results is None:
            return [self.run(*kind) for kind in group]
        seconds = time.perf_counter() - started
        return [(True, value, seconds) for value in results]

    def run(self, owner: str, name: str, items: list):
        started = time.perf_counter()
        try:
            results = getattr(self.owners[owner], name)(items)
        except Exception as error:  # reported by its text, which never holds values (hide_parameters)
            return False, _describe(error), time.perf_counter() - started
        return True, results, time.perf_counter() - started


def grouped(kinds: list, joinable) -> list[list]:
    """A cycle's kinds in order, each run of joinable ones side by side as one group (one
    transaction, Store.joined), every other kind alone."""
    groups: list[list] = []
    for kind in kinds:
        if groups and joinable(kind) and joinable(groups[-1][-1]):
            groups[-1].append(kind)
        else:
            groups.append([kind])
    return groups


def _describe(error: Exception) -> str:
    text = str(getattr(error, "orig", None) or error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _serve(requests, answers):
    """Answer requests until the engine closes the pipe (or is gone)."""
    writer = None
    while True:
        try:
            request = pickle.load(requests)
        except EOFError:
            break
        except Exception as error:   # a request that does not unpickle: the engine's bug, reported so
            request = ("broken", _describe(error))
        if request[0] == "start":
            try:
                writer = _Writer(request[1])
                answer = (True, None, 0.0)
            except Exception as error:
                answer = (False, _describe(error), 0.0)
            pickle.dump(answer, answers, protocol=pickle.HIGHEST_PROTOCOL)
            answers.flush()
            continue
        if request[0] == "broken":   # its kinds are unknown: the engine reads one failure and restarts us
            pickle.dump((False, f"a request that cannot be read: {request[1]}", 0.0), answers,
                        protocol=pickle.HIGHEST_PROTOCOL)
            answers.flush()
            break
        writer.watch_keys()
        for group in grouped(request[1], lambda kind: writer.store.joins and kind[0] == "store"
                             and kind[1] in Store.JOINABLE):
            for answer in (writer.run(*group[0]),) if len(group) == 1 else writer.run_joined(group):
                pickle.dump(answer, answers, protocol=pickle.HIGHEST_PROTOCOL)
            answers.flush()
    if writer is not None:
        writer.store.close()


def main():
    # The pipe to the engine is this process's own: anything printed goes to stderr instead.
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    _serve(sys.stdin.buffer, answers)

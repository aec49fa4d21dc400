"""Retention inside the engine: the [retention] rules applied on a schedule, off the reactor thread.

The work is the same as `interface-engine db prune` (`store/retention.py`): short
batches in a thread of their own, each its own transaction, so ingest goes on.
"""

from __future__ import annotations

from twisted.application import service
from twisted.internet import task, threads
from twisted.logger import Logger

from .config import RetentionConfig
from .store.retention import CONTENT, DELETE, prune

log = Logger()


def report(counts, dry_run: bool = False) -> list[str]:
    """A table, one line per channel and state: contents removed and messages deleted (or to be)."""
    tail = " (dry run: nothing was changed)" if dry_run else ""
    if not counts:
        return [f"nothing to prune: no message matches a rule yet{tail}"]
    would = "would be " if dry_run else ""
    lines = [f"channel\tstate\tcontents {would}removed\tmessages {would}deleted"]
    for channel, state in sorted({(c, s) for c, s, _ in counts}, key=lambda k: (k[0] or "", k[1])):
        lines.append(f"{channel or '(none)'}\t{state}\t{counts[channel, state, CONTENT]}"
                     f"\t{counts[channel, state, DELETE]}")
    return lines + [f"total: {sum(counts.values())} message(s){tail}"]


def summary(counts) -> dict:
    """What a prune removed, for its audit event: counts only."""
    return {"contents_removed": sum(n for (_, _, kind), n in counts.items() if kind == CONTENT),
            "messages_deleted": sum(n for (_, _, kind), n in counts.items() if kind == DELETE),
            "by_channel_state": {f"{channel or '(none)'}/{state}/{kind}": n
                                 for (channel, state, kind), n in sorted(counts.items(), key=str)}}


class RetentionService(service.Service):
    """Runs the rules every `schedule`; a run in progress ends after its batch when the engine stops."""

    name = "retention"

    def __init__(self, store, config: RetentionConfig, reactor, audit=None):
        self.store, self.config, self.reactor, self.audit = store, config, reactor, audit
        self._loop = task.LoopingCall(self._run)
        self._loop.clock = reactor
        self._running = None

    def startService(self):
        super().startService()
        self._loop.start(self.config.schedule, now=False)

    def stopService(self):
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        return self._running

    def _run(self):
        self._running = threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), prune, self.store, self.config.rules,
            batch=self.config.batch, stopping=lambda: not self.running)
        self._running.addCallbacks(self._done, lambda f: log.error(
            "retention run failed: {error}; trying again at the next run",
            error=f.getErrorMessage().splitlines()[0] if f.getErrorMessage() else f.type.__name__))
        return self._running

    def _done(self, counts):
        for channel, state, kind in sorted(counts, key=lambda k: (k[0] or "", k[1], k[2])):
            log.info("retention: channel {channel}, {state}: {what} {count} message(s)",
                     channel=channel or "(none)", state=state, count=counts[channel, state, kind],
                     what="deleted" if kind == DELETE else "removed the contents of")
        self._running = None
        if counts and self.audit is not None:
            audit = self.audit
            d = threads.deferToThread(audit.record, "retention.pruned", actor=audit.actor, object_type="store",
                                      object_id=audit.chain, source=audit.source, detail=summary(counts))
            d.addErrback(lambda f: log.error("could not audit the retention run: {error}",
                                             error=f.getErrorMessage()))

"""What every destination promises the delivery runtime.

The runtime owns the queue, ordering, retries and backoff. A destination makes
one attempt per `deliver` call and reports it as a `Result`, so the runtime can
record every attempt the same way whatever the transport.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from twisted.internet import defer
from twisted.logger import Logger

log = Logger()

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of one delivery attempt.

    ``ok`` means delivered and confirmed. ``error`` is one line and never quotes
    the message. ``retry`` is False only when sending the same bytes again cannot
    succeed without someone changing something.
    """

    ok: bool
    response: bytes | None = None
    error: str | None = None
    retry: bool = True
    retry_after: float | None = None   # seconds the far side asked us to wait (Retry-After)


class Destination:
    """A place messages go to. Implementations override `deliver` and, if they hold resources, `close`."""

    name: str
    #: Delivering the same payload twice leaves the far side as once (an identical file is
    #: "already present"; a FHIR PUT by id). The runtime then need not record each attempt
    #: before starting the next: a crash can only repeat deliveries that change nothing.
    idempotent: bool = False
    #: Deliveries the runtime may hand over at once through `deliver_batch(items)`, which
    #: returns one Result per item up to the first failure; 1: one `deliver` at a time.
    batch: int = 1

    _busy = False

    def _one_at_a_time(self, attempt) -> defer.Deferred[Result]:
        """Run `attempt()` (a coroutine function) as the one delivery in flight; it never errbacks."""
        if self._busy:
            raise RuntimeError(f"destination {self.name}: deliver called with a message in flight")
        self._busy = True
        d = never_fails(defer.Deferred.fromCoroutine(attempt()), self.name)
        return d.addBoth(self._idle)

    def _idle(self, result: Result) -> Result:
        self._busy = False
        return result

    def deliver(self, payload: bytes, target: str | None = None) -> defer.Deferred[Result]:
        """Deliver one message. Never errbacks: every failure is a Result(ok=False).

        One call at a time per destination (the runtime never overlaps calls).
        """
        raise NotImplementedError

    def close(self) -> defer.Deferred[None]:
        """Release connections and threads; safe to call more than once."""
        return defer.succeed(None)


def one_line(text: str, limit: int = 200) -> str:
    """Text from the far side made fit for a one-line error: control characters folded, length capped."""
    text = _CONTROL.sub(" ", text).strip()
    return text if len(text) <= limit else text[:limit - 3] + "..."


def never_fails(d: defer.Deferred, name: str) -> defer.Deferred[Result]:
    """Turn an unexpected exception into a failed Result, so a bug cannot stall the runtime's queue.

    Only the exception type and where it was raised are logged: its message
    might quote the payload.
    """

    def unexpected(failure):
        where = "{1}:{2} in {0}".format(*failure.frames[-1][:3]) if failure.frames else "unknown"
        log.error("destination {name}: unexpected {error} at {where}",
                  name=name, error=failure.type.__name__, where=where)
        return Result(ok=False, error=f"internal error ({failure.type.__name__})")

    return d.addErrback(unexpected)

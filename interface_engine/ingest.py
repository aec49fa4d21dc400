"""Ingest: what each received frame becomes in the store, and what its sender is answered.

framing -> ingest -> store (commit) -> ACK. The answer is built before the commit
and stored with the message in the same transaction, so a duplicate can be given
the very answer its original got; it is released to the sender only after the
commit.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from itertools import count

from twisted.internet import defer
from twisted.logger import Logger

from . import hl7, log as logging
from .config import HL7Config, ListenerConfig
from .hl7.patients import patient_ids
from .keys import Keys
from .metrics import (REJECTED_CONFLICT, REJECTED_HEADER, REJECTED_LIMITS, REJECTED_OVERSIZED,
                      REJECTED_UNROUTED, Metrics)
from .store import (CONFLICT, DUPLICATE, RECEIVED, REJECTED, STORED, GroupCommitter, Incoming,
                    Outcome)

log = Logger()


class ControlIds:
    """Control ids for our ACKs: unique per process and across processes, at most 20 characters."""

    def __init__(self):
        self.pid = os.getpid()
        self._prefix = "%08X%04X" % (int(time.time()) & 0xFFFFFFFF, self.pid & 0xFFFF)
        self._count = count(1)

    def __call__(self) -> str:
        return "%s%07X" % (self._prefix, next(self._count) & 0xFFFFFFF)


class ConflictAck:
    """Builds the AE for a message whose control id is stored with other content, where the store
    finds out: in the engine, or in its writer process (so it travels by pickle)."""

    __slots__ = ("header",)
    _ids: ControlIds | None = None   # per process: the pid is part of each id

    def __init__(self, header):
        self.header = header

    def __reduce__(self):
        return ConflictAck, (self.header,)

    def __call__(self) -> bytes:
        ids = ConflictAck._ids
        if ids is None or ids.pid != os.getpid():
            ids = ConflictAck._ids = ControlIds()
        return hl7.build_ack(self.header, hl7.ack_code(self.header, "error"), control_id=ids(),
                             reason="message control id already received with different content",
                             error_code="207")


def over_limits(raw: bytes, header, limits: tuple[int, int]) -> hl7.HL7Error | None:
    """Refuse a message built to make later stages work hard: too many segments, or a field
    with too many repetitions. Counting bytes first keeps the common case to two scans."""
    max_segments, max_repetitions = limits
    body = raw.rstrip(b"\r\n")
    segments = max(body.count(b"\r"), body.count(b"\n")) + 1
    if segments > max_segments:
        return hl7.HL7Error("207", f"message has more than {max_segments} segments")
    rep = header.repetition_sep.encode("latin-1", "replace") if header.repetition_sep else b""
    if not rep or raw.count(rep) < max_repetitions:
        return None
    field = header.field_sep.encode("latin-1", "replace")
    for line in raw.replace(b"\n", b"\r").split(b"\r"):
        fields = line.split(field)
        for value in fields[2:] if line.startswith(b"MSH") else fields[1:]:
            if value.count(rep) >= max_repetitions:
                return hl7.HL7Error("207", f"a field of {line[:3].decode('latin-1')} has more than "
                                           f"{max_repetitions} repetitions")
    return None


class Ingest:
    """One listener's (or directory's) way into the store.

    `routes` are the channels fed by this listener, in the order a message is offered
    to them; with none, messages are stored only. `runtime` takes what was stored.
    """

    def __init__(self, committer: GroupCommitter, listener: ListenerConfig, charsets: HL7Config,
                 runtime=None, routes=(), keys: Keys | None = None, metrics: Metrics | None = None):
        self.committer = committer
        self.metrics = metrics or Metrics()
        self.keys = keys
        self.listener = listener.name
        self.charsets = {"default_charset": charsets.default_charset,
                         "fallback_charset": charsets.fallback_charset}
        self.control_ids = ControlIds()
        self.counts: Counter = Counter()
        self.runtime = runtime
        self.routes = tuple(routes)
        self.limits = (listener.max_segments, listener.max_repetitions)

    def route(self, header):
        """The channel that takes this message here, or an HL7Error saying none does."""
        if not self.routes:
            return None, None
        best, rank = None, -1
        for channel in self.routes:  # the most specific pattern wins: ADT^A01 before ADT before *
            r = channel.match(header.message_type, header.trigger_event)
            if r is not None and r > rank:
                best, rank = channel, r
        if best is not None:
            return best, None
        kind = f"{header.message_type}^{header.trigger_event}".rstrip("^")
        return None, hl7.HL7Error("200", f"no channel on listener {self.listener} takes {kind} messages")

    def receive(self, payload: bytes, peer: str) -> defer.Deferred:
        """Store what the frame holds; the Deferred fires with the answer to send."""
        if hl7.is_batch(payload):
            parts = hl7.split_messages(payload)
            if parts:
                answers = [self._message(part, peer) for part in parts]
                d = defer.gatherResults(answers, consumeErrors=True)
                d.addCallback(lambda results: hl7.build_batch_ack(payload, [ack for ack, _ in results]))
                return d
        return self._message(payload, peer).addCallback(lambda result: result[0])

    def store(self, raw: bytes, peer: str) -> defer.Deferred:
        """Store one message that did not come over MLLP; fires with (answer, Outcome)."""
        return self._message(raw, peer)

    def oversized(self, head: bytes, peer: str, limit: int) -> bytes:
        """The AR for a frame over the size limit; nothing of it is stored."""
        header = hl7.peek(head, **self.charsets)
        self.counts["oversized"] += 1
        self.metrics.error(REJECTED_OVERSIZED)
        log.warn("frame over {limit} bytes from {peer} (control id {control_id!r}) refused",
                 limit=limit, peer=peer, control_id=header.control_id)
        return hl7.build_ack(header, hl7.ack_code(header, "reject"), control_id=self.control_ids(),
                             reason=f"frame larger than the {limit}-byte limit", error_code="207")

    def _message(self, raw: bytes, peer: str) -> defer.Deferred:
        header = hl7.peek(raw, **self.charsets)
        error, channel, kind = header.error, None, REJECTED_HEADER
        if error is None:
            error, kind = over_limits(raw, header, self.limits), REJECTED_LIMITS
        if error is None:
            (channel, error), kind = self.route(header), REJECTED_UNROUTED
        if error is None:
            ack = hl7.build_ack(header, hl7.ack_code(header, "accept"), control_id=self.control_ids())
        else:
            ack = hl7.build_ack(header, hl7.ack_code(header, "reject"), control_id=self.control_ids(),
                                reason=error.reason, error_code=error.code)
        item = Incoming(
            raw=raw, listener=self.listener, peer=peer, ack=ack,
            state=REJECTED if error else RECEIVED, error=error.reason if error else None,
            sending_application=header.sending_application,
            sending_facility=header.sending_facility,
            receiving_application=header.receiving_application,
            receiving_facility=header.receiving_facility,
            message_type=header.message_type, trigger_event=header.trigger_event,
            control_id=header.control_id, version=header.version,
            channel=channel.name if channel else None,
            conflict_ack=ConflictAck(header),
            patients=self._patients(raw, header),
        )
        d = self.committer.submit(item)
        d.addCallback(self._stored, item, peer, kind)
        if channel is not None and channel.source.ack_mode == "processed":
            d.addCallback(self._processed, item, header, channel)
        return d

    def _patients(self, raw: bytes, header) -> tuple[str, ...]:
        """The patient index entries of a message: never the identifiers themselves."""
        if self.keys is None:
            return ()
        return tuple(self.keys.patient_hash(i, a) for i, a in patient_ids(raw, header))

    def _processed(self, stored: tuple, item: Incoming, header, channel) -> defer.Deferred | bytes:
        """ack_mode = "processed": answer with what the destinations made of it."""
        ack, outcome = stored
        if outcome.kind != STORED or item.state != RECEIVED:
            return stored
        d = self.runtime.outcome(outcome.message_id, channel.source.processed_timeout)

        def answer(result):
            ok, reason = result
            if ok:
                return hl7.build_ack(header, "AA", control_id=self.control_ids()), outcome
            return hl7.build_ack(header, "AE", control_id=self.control_ids(),
                                 reason=reason or "not delivered", error_code="207"), outcome
        return d.addCallback(answer)

    def _stored(self, outcome: Outcome, item: Incoming, peer: str, kind: str) -> tuple[bytes, Outcome]:
        """Count and log what the commit made of a message; `kind` is why it was rejected, if it was."""
        if outcome.kind == DUPLICATE:
            self.counts["duplicates"] += 1
            log.info("duplicate {type}^{trigger} {control_id!r} from {peer}: answered as message {id}",
                     type=item.message_type, trigger=item.trigger_event,
                     control_id=item.control_id, peer=peer, id=outcome.message_id)
        elif outcome.kind == CONFLICT:
            self.counts["conflicts"] += 1
            self.metrics.error(REJECTED_CONFLICT)
            log.warn("control id {control_id!r} from {peer} reused with different content: "
                     "stored as rejected message {id}",
                     control_id=item.control_id, peer=peer, id=outcome.message_id)
        elif item.state == REJECTED:
            self.counts["rejected"] += 1
            self.metrics.error(kind)
            log.warn("rejected message {id} from {peer}: {reason}",
                     id=outcome.message_id, peer=peer, reason=item.error)
        else:
            self.counts["received"] += 1
            if logging.debug_enabled:
                log.debug("stored {type}^{trigger} {control_id!r} from {peer} as message {id}",
                          type=item.message_type, trigger=item.trigger_event,
                          control_id=item.control_id, peer=peer, id=outcome.message_id)
            if item.channel is not None and self.runtime is not None:
                self.runtime.received(outcome.message_id, item.raw, item.channel)
        return outcome.ack, outcome

"""A stand-in downstream system: answers every frame, says what it got, optionally keeps it.

For trying a channel out before the real receiving system is there, the way an
analyst would point a feed at a test port.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from twisted.internet import protocol

from .. import hl7
from .framing import MLLPReceiver


class TestReceiverProtocol(MLLPReceiver):
    IDLE_TIMEOUT = 3600.0

    def frameReceived(self, payload: bytes):
        factory = self.factory
        header = hl7.peek(payload)
        factory.count += 1
        kind = f"{header.message_type}^{header.trigger_event}".rstrip("^") or "?"
        factory.echo(f"{datetime.now():%H:%M:%S}  {self.transport.getPeer().host}  {kind:<8} "
                     f"{header.control_id or '-':<20} {len(payload)} bytes")
        if factory.save is not None:
            name = f"{factory.count:06d}-{''.join(c for c in header.control_id if c.isalnum())[:40]}.hl7"
            (factory.save / name).write_bytes(payload)
        code = factory.answer if header.error is None else "AR"
        reason = "" if code == "AA" else (header.error.reason if header.error else "answered by --answer")
        self.sendFrame(hl7.build_ack(header, code, control_id=f"R{factory.count}", reason=reason))


class TestReceiverFactory(protocol.Factory):
    protocol = TestReceiverProtocol
    noisy = False

    def __init__(self, answer: str, save: Path | None, echo):
        self.answer, self.save, self.echo = answer, save, echo
        self.count = 0

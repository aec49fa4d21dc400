"""Why a message cannot be accepted, in the terms an ACK/NAK carries (HL7 table 0357)."""

from __future__ import annotations

#: HL7 table 0357 (message error condition codes) for the codes this engine emits.
TABLE_0357 = {
    "0": "Message accepted",
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "206": "Application record locked",
    "207": "Application internal error",
}


class HL7Error(Exception):
    """A message-level problem, reported to the sender in MSA/ERR.

    ``reason`` names the field but never quotes message content, so it is safe
    to log and to send back.
    """

    def __init__(self, code: str, reason: str):
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason

    def __reduce__(self):   # pickled with a message's header, e.g. to the store's writer process
        return type(self), (self.code, self.reason)

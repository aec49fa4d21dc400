"""HL7 v2 messages: peek at a frame's MSH, parse lazily, read by analyst paths, answer with ACKs.

Pure standard library. ``peek`` is the hot path run on every received frame and
never raises; ``parse`` builds the lazy message model; ``build_ack`` answers.
"""

from .ack import ack_code, build_ack, build_batch_ack
from .batch import is_batch, split_file, split_messages
from .charset import decode, encode
from .errors import HL7Error
from .escape import Delimiters, escape, unescape
from .header import Header, peek
from .message import Message, Segment, parse

__all__ = [
    "Delimiters", "HL7Error", "Header", "Message", "Segment",
    "ack_code", "build_ack", "build_batch_ack", "decode", "encode", "escape",
    "is_batch", "parse", "peek", "split_file", "split_messages", "unescape",
]

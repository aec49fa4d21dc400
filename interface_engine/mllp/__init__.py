"""MLLP: framing with limits, the listener and a client. Knows sockets, not channels."""

from .client import MLLPClient, MLLPError
from .framing import END_BLOCK, START_BLOCK, MLLPReceiver, frame

__all__ = ["MLLPClient", "MLLPError", "MLLPReceiver", "START_BLOCK", "END_BLOCK", "frame"]

"""FHS/BHS batches: recognising one and cutting it into its messages.

Messages are cut as exact byte slices, so each is stored and acknowledged with
the bytes its sender wrote. Segment ids count only at a line start (after CR
or LF), never inside a field. A batch may lack its BTS/FTS trailers: the last
message then runs to the end of the input.
"""

from __future__ import annotations

import re

from .charset import decode
from .header import locate

_BOUNDARY = re.compile(rb"(?<=[\r\n])(?:MSH|BHS|FHS|BTS|FTS)")
_LINE_MSH = re.compile(rb"(?<=[\r\n])MSH")
_EOL = re.compile(rb"[\r\n]+")


def is_batch(raw: bytes) -> bool:
    """Whether the first segment (after a BOM and whitespace) is FHS or BHS."""
    start = locate(raw)[0]
    return raw[start:start + 3] in (b"FHS", b"BHS")


def split_messages(raw: bytes) -> list[bytes]:
    """The messages of a batch as byte slices (FHS/BHS/BTS/FTS left out); ``[raw]`` for a lone message."""
    if not is_batch(raw):
        return [raw]
    messages = []
    start = None
    for m in _BOUNDARY.finditer(raw):
        if start is not None:
            messages.append(raw[start:m.start()])
        start = m.start() if m.group() == b"MSH" else None
    if start is not None:
        messages.append(raw[start:])
    return messages


def batch_header_lines(raw: bytes, encoding: str) -> dict[str, str]:
    """The first FHS and BHS lines before the first message, decoded, keyed by segment id."""
    start = locate(raw)[0]
    first_msh = _LINE_MSH.search(raw, start)
    end = first_msh.start() if first_msh is not None else len(raw)
    lines: dict[str, str] = {}
    for line in _EOL.split(raw[start:end]):
        if line[:3] in (b"FHS", b"BHS"):
            lines.setdefault(line[:3].decode("ascii"), decode(line, encoding))
    return lines


_MESSAGE_START = re.compile(rb"(?:^|(?<=[\r\n]))(?=MSH)")


def split_file(data: bytes) -> list[bytes]:
    """The messages of a file as exact byte slices: a batch's messages, or one per MSH.

    Anything before the first MSH (a BOM, a blank line) stays with the first message,
    so that nothing of the input is lost; a file without MSH is one (bad) message.
    """
    if is_batch(data):
        return split_messages(data)
    starts = [m.start() for m in _MESSAGE_START.finditer(data)]
    if not starts:
        return [data] if data.strip() else []
    starts[0] = 0
    return [data[a:b] for a, b in zip(starts, starts[1:] + [len(data)])]

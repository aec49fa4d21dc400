"""Analyst paths (``PID-5[2].1``, ``OBX[3]-5``) and the value rule they read by.

Grammar: ``SEG[occurrence]-field[repetition].component.subcomponent``, every
index 1-based, everything after the field optional; read from a segment the
path may leave out ``SEG-`` (and may not name an occurrence). Without ``[repetition]`` the first
repetition is meant, except that a bare field path (``PID-3``) names the whole
field with all its repetitions.

Value rule: a path naming a leaf (its text holds no repetition, component or
sub-component separator) gives the decoded text, escape sequences resolved.
A path naming something composite gives the message's encoded text, escapes
intact, so it can be copied into HL7 output as is. Missing parts read as ''.
An explicit HL7 null reads as its two quote characters ``""``.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import NamedTuple

from .escape import Delimiters

_PATH = re.compile(r"(?:([A-Z0-9]{3})(?:\[(\d+)\])?-)?(\d+)(?:\[(\d+)\])?(?:\.(\d+)(?:\.(\d+))?)?")


class Path(NamedTuple):
    segment: str  # '' when the path is relative to a segment
    occurrence: int | None
    field: int
    repetition: int | None
    component: int | None
    subcomponent: int | None


@lru_cache(maxsize=2048)
def parse_path(path: str) -> Path:
    """Parse an analyst path; ValueError says what is wrong with it."""
    m = _PATH.fullmatch(path) if isinstance(path, str) else None
    if m is None:
        raise ValueError(f"malformed HL7 path {path!r}: expected SEG[n]-field[r].component.subcomponent "
                         "with 1-based numbers, e.g. PID-3, PID-5[2].1, OBX[3]-5, PID-3.4.2")
    seg, occ, fld, rep, comp, sub = m.groups()
    numbers = [int(x) if x is not None else None for x in (occ, fld, rep, comp, sub)]
    if 0 in numbers:
        raise ValueError(f"malformed HL7 path {path!r}: indices are 1-based, 0 is not allowed")
    return Path(seg or "", *numbers)


def _nth(value: str, sep: str, n: int) -> str:
    if sep and sep in value:
        parts = value.split(sep, n)
        return parts[n - 1] if n <= len(parts) else ""
    return value if n == 1 else ""


def pick(field: str, rep: int | None, comp: int | None, sub: int | None,
         d: Delimiters, encoding: str) -> str:
    """Read part of one field's encoded text by the value rule above."""
    if rep is None and comp is None:
        for c in d.structural:
            if c in field:
                return field
        return d.unescape(field, encoding)
    value = _nth(field, d.repetition_sep, rep or 1)
    if comp is None:
        seps = (d.component_sep, d.subcomponent_sep)
    else:
        value = _nth(value, d.component_sep, comp)
        if sub is None:
            seps = (d.subcomponent_sep,)
        else:
            value = _nth(value, d.subcomponent_sep, sub)
            seps = ()
    for c in seps:
        if c and c in value:
            return value
    return d.unescape(value, encoding)

"""``patient_ids``: the identifiers in PID-3, read straight from a frame's bytes.

Ingest runs it on every stored message to fill the patient index, so it does not
parse: it finds each PID line, splits only PID-3 and unescapes only the parts it
returns, with the separators the message itself declares in MSH-1/MSH-2.
"""

from __future__ import annotations

from .header import Header


def patient_ids(raw: bytes, header: Header) -> list[tuple[str, str]]:
    """(CX.1 identifier, first component of CX.4 assigning authority) for every PID-3 repetition."""
    fs = header.field_sep
    if not fs or not fs.isascii():
        return []
    d = header.delimiters
    marker = b"PID" + fs.encode("ascii")
    found: list[tuple[str, str]] = []
    pos = raw.find(marker)
    while pos >= 0:
        if pos > 0 and raw[pos - 1] in b"\r\n":
            end = raw.find(b"\r", pos)
            line = raw[pos:end if end >= 0 else len(raw)]
            lf = line.find(b"\n")
            if lf >= 0:
                line = line[:lf]
            fields = line.split(marker[3:], 4)
            if len(fields) > 3 and fields[3]:
                found.extend(_cx_list(fields[3], d, header._line_codec))
        pos = raw.find(marker, pos + 4)
    return found


def _cx_list(field: bytes, d, codec: str) -> list[tuple[str, str]]:
    text = field.decode(codec, errors="replace")
    reps = text.split(d.repetition_sep) if d.repetition_sep else [text]
    result = []
    for rep in reps:
        parts = rep.split(d.component_sep) if d.component_sep else [rep]
        identifier = d.unescape(parts[0], codec) if parts[0] else ""
        if not identifier.strip() or identifier == '""':
            continue
        authority = parts[3] if len(parts) > 3 else ""
        if authority and d.subcomponent_sep:
            authority = authority.split(d.subcomponent_sep, 1)[0]
        result.append((identifier, d.unescape(authority, codec) if authority else ""))
    return result

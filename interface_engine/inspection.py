"""What `messages search`, `messages show` and `status` print: tables for people, JSON for scripts.

The store answers the questions (store/search.py); this module turns options into
criteria and rows into text.
"""

from __future__ import annotations

import json
import re
from datetime import datetime

from . import hl7
from .hl7.fieldnames import field_name
from .store.search import (DELIVERY_STATES, MESSAGE_STATES, Criteria, SearchError, Status,
                           parse_time, split_pair)


def criteria(*, channel=None, state=None, since=None, until=None, type_=None, control_id=None,
             sender=None, destination=None, destination_state=None, patient=None, authority=None,
             keys=None, limit=50, before=None, now: datetime | None = None) -> Criteria:
    """Criteria from the command's options; raises SearchError naming the option to fix."""
    message_type = trigger = application = facility = None
    if type_ is not None:
        message_type, trigger = split_pair(type_, "^")
    if sender is not None:
        application, facility = split_pair(sender, "|")
    if authority is not None and patient is None:
        raise SearchError("--authority needs --patient ID")
    return Criteria(
        channel=channel, state=state,
        since=parse_time(since, "--since", now) if since is not None else None,
        until=parse_time(until, "--until", now) if until is not None else None,
        message_type=message_type, trigger_event=trigger, control_id=control_id,
        sending_application=application, sending_facility=facility,
        destination=destination, destination_state=destination_state,
        patient_hash=keys.patient_hash(patient, authority or "") if patient is not None else None,
        before=before, limit=limit)


def jsonable(row: dict) -> dict:
    """A row without bytes, times as ISO 8601 UTC."""
    return {k: (v.isoformat() + "Z" if isinstance(v, datetime) else v)
            for k, v in row.items() if not isinstance(v, bytes)}


def table(header: tuple[str, ...], rows: list[tuple], width: int = 40) -> str:
    cells = [header] + [tuple("" if v is None else str(v) for v in row) for row in rows]
    widths = [min(width, max(len(r[i]) for r in cells)) for i in range(len(header))]
    return "\n".join("  ".join(c[:width].ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def search_table(rows: list[dict]) -> str:
    return table(("id", "received_at", "state", "channel", "type", "control_id", "sender", "peer"), [(
        r["id"], r["received_at"].strftime("%Y-%m-%d %H:%M:%S"), r["state"], r["channel"] or "-",
        f"{r['message_type']}^{r['trigger_event']}".strip("^"), r["control_id"],
        f"{r['sending_application']}|{r['sending_facility']}".strip("|"), r["peer"],
    ) for r in rows])


def next_page_hint(rows: list[dict], limit: int) -> str | None:
    if len(rows) == limit:
        return f"more may match: add --before {rows[-1]['id']} for the next page"
    return None


# -- show -------------------------------------------------------------------------


def text_of(data: bytes | None) -> str | None:
    return None if data is None else data.decode("utf-8", errors="replace")


def segments(raw: bytes) -> list[dict]:
    """Each segment's valued fields with their names, read with the message's own separators."""
    header = hl7.peek(raw)
    text = raw.decode(header.encoding, errors="replace")
    fs = header.field_sep or "|"
    result = []
    for line in re.split(r"\r\n|\r|\n", text):
        line = line.strip("\x0b\x1c")
        if not line:
            continue
        name = line[:3]
        if name in ("MSH", "FHS", "BHS"):
            parts = [fs] + line[4:].split(fs)
        else:
            parts = line[4:].split(fs) if line[3:4] == fs else []
        fields = [{"field": f"{name}-{n}", "name": field_name(name, n), "value": value}
                  for n, value in enumerate(parts, 1) if value]
        result.append({"segment": name, "fields": fields})
    return result


def decision(row: dict, deliveries: list[dict]) -> str:
    """What the channel did with the message, in a few words."""
    if row["channel"] is None:
        return "stored only: no channel took it" if row["state"] != "rejected" else f"rejected: {row['error']}"
    if row["filter_reason"]:
        return f"filtered out: {row['filter_reason']}"
    if row["state"] == "received":
        return "not yet through its channel"
    taken = [d["destination"] for d in deliveries if d["state"] != "filtered"]
    return f"passed to {len(taken)} destination(s)" + (f": {', '.join(taken)}" if taken else "")


def show_json(row: dict, deliveries: list[dict]) -> str:
    return json.dumps(shown(row, deliveries), indent=2)


def shown(row: dict, deliveries: list[dict]) -> dict:
    """Everything about a message, content included: for those who may see it."""
    return {
        "message": jsonable(row), "raw": text_of(row["raw"]), "answer": text_of(row["ack"]),
        "segments": segments(row["raw"]), "channel": row["channel"],
        "filter_reason": row["filter_reason"], "decision": decision(row, deliveries),
        "deliveries": [jsonable({k: v for k, v in d.items() if k != "attempt_log"})
                       | {"output": text_of(d["output"]), "response": text_of(d["response"]),
                          "attempts": [jsonable(a) | {"response": text_of(a["response"])}
                                       for a in d["attempt_log"]]}
                       for d in deliveries],
    }


#: What a delivery shows without content: a far side's error text may quote the message.
_DELIVERY_METADATA = ("id", "destination", "state", "attempts", "next_attempt_at", "created_at",
                      "updated_at", "replay_of", "replay_id")


def outline(row: dict, deliveries: list[dict]) -> dict:
    """A message without its content (raw, outputs, answers, far-side error texts)."""
    return {
        "message": jsonable({k: v for k, v in row.items() if k not in ("raw", "ack")}),
        "channel": row["channel"], "filter_reason": row["filter_reason"],
        "decision": decision(row, deliveries),
        "deliveries": [jsonable({k: d[k] for k in _DELIVERY_METADATA}) for d in deliveries],
    }


def show_segments(raw: bytes) -> str:
    lines = []
    for seg in segments(raw):
        lines.append(f"  {seg['segment']}")
        for f in seg["fields"]:
            label = f"{f['field']:8} {f['name']}".rstrip()
            lines.append(f"    {label[:48]:48}  {f['value']}")
    return "\n".join(lines)


# -- status -----------------------------------------------------------------------


def status_json(s: Status) -> str:
    return json.dumps({
        "channels": [{"channel": c, **{state: n.get(state, 0) for state in MESSAGE_STATES}}
                     for c, n in sorted(s.channels.items(), key=lambda i: (i[0] is None, i[0] or ""))],
        "destinations": [{"channel": c, "destination": d, **v}
                         for (c, d), v in sorted(s.destinations.items())],
    }, indent=2)


def status_table(s: Status) -> str:
    channels = table(("channel",) + MESSAGE_STATES, [
        (c if c is not None else "(none)",) + tuple(n.get(state, 0) for state in MESSAGE_STATES)
        for c, n in sorted(s.channels.items(), key=lambda i: (i[0] is None, i[0] or ""))])
    destinations = table(("channel", "destination") + DELIVERY_STATES + ("queue", "oldest"), [
        (c, d) + tuple(v[state] for state in DELIVERY_STATES)
        + (v["queue_depth"], _age(v["oldest_queued_age_s"]))
        for (c, d), v in sorted(s.destinations.items())])
    return f"{channels}\n\n{destinations}"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"

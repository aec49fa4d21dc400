"""Channel dry runs and test cases: what a channel would do, without storing or sending anything.

Test cases live beside the channel files, one folder per case:

    channels/tests/<channel>/<case>/input.hl7         the message(s) fed in
    channels/tests/<channel>/<case>/expected/<dest>   the exact payload expected for destination <dest>
    .../expected/<dest>.path                          (file destinations) the expected target path
    .../expected/<dest>.filtered                      the destination's filter must refuse it
    .../expected/channel.filtered                     the channel's filter must refuse it

`--update` writes what the channel produces now as the new expectation, for review
in git like any other change.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

from .. import hl7
from ..store import ERROR, FILTERED
from .config import ChannelConfig
from .pipeline import decide
from .templating import Mappings


@dataclass
class Report:
    """One message through one channel."""

    label: str
    taken: bool = True
    note: str = ""
    filter_reason: str | None = None
    destinations: list = field(default_factory=list)   # NewDelivery per destination

    @property
    def failed(self) -> bool:
        return bool(self.note.startswith("rejected")) or any(d.state == ERROR for d in self.destinations)


def dry_run(channel: ChannelConfig, mappings: Mappings, data: bytes, label: str,
            charsets: dict | None = None) -> list[Report]:
    reports = []
    parts = hl7.split_file(data)
    for n, raw in enumerate(parts, 1):
        name = f"{label} #{n}" if len(parts) > 1 else label
        header = hl7.peek(raw, **(charsets or {}))
        if header.error is not None:
            reports.append(Report(name, False, f"rejected at ingest: {header.error.reason}"))
            continue
        kind = f"{header.message_type}^{header.trigger_event}".rstrip("^")
        name = f"{name} {kind} {header.control_id}".rstrip()
        if not channel.accepts(header.message_type, header.trigger_event):
            reports.append(Report(name, False, f"not taken: the channel takes "
                                               f"{', '.join(channel.source.message_types)}"))
            continue
        decision = decide(channel, mappings, hl7.parse(raw, **(charsets or {})))
        reports.append(Report(name, True, "", decision.filter_reason, list(decision.deliveries)))
    return reports


def show(report: Report) -> str:
    lines = [f"== {report.label}"]
    if not report.taken:
        lines.append(f"   {report.note}")
        return "\n".join(lines)
    if report.filter_reason:
        lines.append(f"   filtered by the channel ({report.filter_reason})")
        return "\n".join(lines)
    for d in report.destinations:
        if d.state == FILTERED:
            lines.append(f"-- {d.destination}: filtered ({d.error})")
        elif d.state == ERROR:
            lines.append(f"-- {d.destination}: ERROR {d.error}")
        else:
            lines.append(f"-- {d.destination}" + (f" -> {d.target}" if d.target else ""))
            lines.extend("   " + line for line in readable(d.output).splitlines())
    return "\n".join(lines)


def readable(payload: bytes) -> str:
    """A payload for the terminal: HL7 segments one a line, JSON indented, bad bytes replaced."""
    if payload[:1] in (b"{", b"["):
        try:
            return json.dumps(json.loads(payload), indent=2, ensure_ascii=False)
        except ValueError:
            pass
    return payload.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")


@dataclass
class CaseResult:
    name: str
    problems: list[str]


def cases_folder(channel: ChannelConfig) -> Path:
    return Path(channel.file).parent / "tests" / channel.name


def run_cases(channel: ChannelConfig, mappings: Mappings, *, update: bool = False,
              charsets: dict | None = None) -> list[CaseResult]:
    folder = cases_folder(channel)
    results = []
    for case in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
        source = case / "input.hl7"
        if not source.is_file():
            results.append(CaseResult(case.name, [f"{source} is missing"]))
            continue
        reports = dry_run(channel, mappings, source.read_bytes(), case.name, charsets)
        actual = _expectations(reports)
        expected_dir = case / "expected"
        errors = [f"{case.name}: {r.label}: ERROR {d.destination}: {d.error}"
                  for r in reports for d in r.destinations if d.state == ERROR]
        if update:
            _write(expected_dir, actual)
            results.append(CaseResult(case.name, errors))
            continue
        expected = {p.name: p.read_bytes() for p in expected_dir.iterdir()} if expected_dir.is_dir() else {}
        problems = list(errors)
        for name in sorted(set(expected) | set(actual)):
            if name not in actual:
                problems.append(f"{case.name}: expected/{name} was expected but not produced")
            elif name not in expected:
                problems.append(f"{case.name}: expected/{name} is missing; the channel produced:\n"
                                + _indent(readable(actual[name])))
            elif expected[name] != actual[name]:
                problems.append(f"{case.name}: expected/{name} differs:\n" + diff(expected[name], actual[name]))
        results.append(CaseResult(case.name, problems))
    return results


def _expectations(reports: list[Report]) -> dict[str, bytes]:
    """What a case folder's expected/ holds for these reports (one input message per case)."""
    out: dict[str, bytes] = {}
    for report in reports:
        if not report.taken:
            out["channel.filtered"] = report.note.encode() + b"\n"
        elif report.filter_reason:
            out["channel.filtered"] = report.filter_reason.encode() + b"\n"
        for d in report.destinations:
            if d.state == FILTERED:
                out[f"{d.destination}.filtered"] = (d.error or "").encode() + b"\n"
            elif d.state != ERROR:
                out[d.destination] = d.output
                if d.target:
                    out[f"{d.destination}.path"] = d.target.encode() + b"\n"
    return out


def _write(folder: Path, files: dict[str, bytes]):
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        if old.name not in files:
            old.unlink()
    for name, data in files.items():
        (folder / name).write_bytes(data)


def diff(expected: bytes, actual: bytes) -> str:
    lines = difflib.unified_diff(readable(expected).splitlines(), readable(actual).splitlines(),
                                 "expected", "actual", lineterm="")
    return _indent("\n".join(lines))


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())

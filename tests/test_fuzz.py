"""Hostile bytes against the framer, the parser and the ACK builder.

Property tests (hypothesis) run the same targets as the coverage-guided fuzzer
(`fuzz/run.py`, atheris); a bounded atheris run of each target is part of the
suite. Inputs the fuzzer once broke the engine with stay here as regressions.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.targets import ack, frame, parse
from tests.conftest import IN_CI, ROOT, unavailable

REGRESSIONS = sorted((ROOT / "tests" / "fuzz_regressions").iterdir())
# Inputs that crashed or hung other HL7 parsers.
KNOWN_KILLERS = [b"MSHH0\r", b"MSH|^|||||||^A|||2.2\r^AA", b"MSH", b"MSH|", b"MSH|^~\\&\r" * 3,
                 b"\x0bMSH|^~\\&|\x1c\r", b"MSH|^~\\&|" + b"^" * 100_000, b"MSH|^~\\&|" + b"~" * 100_000,
                 b"FHS|^~\\&\rBHS|^~\\&\rBTS\rFTS", b"MSH|^~\\&|A\rPID|" + b"|" * 50_000]

hl7ish = st.lists(st.sampled_from([b"MSH|^~\\&|", b"MSH", b"|", b"^", b"~", b"\\", b"&", b"\r", b"\n",
                                   b"\x0b", b"\x1c\r", b"\x1c", b"PID", b"OBX", b"FHS", b"BHS", b"A01",
                                   b"ADT^A01", b"2.5", b"\\X0D\\", b"\\E\\", b"\xff", b"\x00", b"abc"]),
                  max_size=60).map(b"".join)
anything = st.one_of(st.binary(max_size=2000), hl7ish)


@pytest.mark.parametrize("target", [frame, parse, ack])
@pytest.mark.parametrize("data", KNOWN_KILLERS + [p.read_bytes() for p in REGRESSIONS],
                         ids=[f"killer{i}" for i in range(len(KNOWN_KILLERS))] + [p.stem for p in REGRESSIONS])
def test_known_killers_are_handled_quickly(target, data):
    started = time.perf_counter()
    target(data)
    assert time.perf_counter() - started < 1.0


@settings(max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.too_slow])
@given(anything, st.integers(min_value=1, max_value=64))
def test_the_framer_finds_exactly_the_frames_whatever_the_reads(data, cut):
    assert frame(data, cut) == frame(data, len(data) or 1)


@settings(max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.too_slow])
@given(anything)
def test_peek_and_parse_raise_nothing_unexpected(data):
    parse(data)


@settings(max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.too_slow])
@given(anything)
def test_every_header_gets_a_well_formed_ack(data):
    ack(data)


@pytest.mark.parametrize("target", ["frame", "parse", "ack"])
def test_a_bounded_coverage_guided_run_finds_nothing(target, tmp_path):
    try:
        import atheris  # noqa: F401
    except ImportError:
        unavailable("atheris is not installed (pip install atheris) for the coverage-guided run")
    seconds = os.environ.get("IE_FUZZ_SECONDS", "20" if IN_CI else "5")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    result = subprocess.run(
        [sys.executable, str(ROOT / "fuzz" / "run.py"), target, f"-max_total_time={seconds}",
         "-timeout=1", "-rss_limit_mb=1024", f"-artifact_prefix={tmp_path}/", str(corpus),
         str(ROOT / "fuzz" / "seeds")],
        capture_output=True, text=True, timeout=int(seconds) * 3 + 60)
    findings = sorted(p.name for p in Path(tmp_path).glob("*-*") if p.is_file())
    assert result.returncode == 0 and not findings, (findings, result.stderr[-3000:])
    assert "Done" in result.stderr

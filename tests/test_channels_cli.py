"""`channels validate` and `channels test` as an analyst runs them."""

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "interface_engine", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd or tempfile.mkdtemp(), timeout=120)


GOOD = """
name = "adt"
[source]
type = "mllp"
listener = "default"
message_types = ["ADT"]
[filter]
when = "msg['MSH-9.2'] in ('A01', 'A08')"
[[destinations]]
name = "out"
type = "file"
path = "out/{{ msg['MSH-10'] }}.hl7"
template = "hl7/ok.hl7.j2"
"""


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "engine.toml").write_text('[[listeners]]\nname = "default"\nport = 0\n')
    (tmp_path / "channels").mkdir()
    (tmp_path / "mappings" / "hl7").mkdir(parents=True)
    (tmp_path / "mappings" / "hl7" / "ok.hl7.j2").write_text("{{ msg }}\n")
    return tmp_path


def test_a_good_channel_validates(workdir):
    (workdir / "channels" / "adt.toml").write_text(GOOD)
    result = cli("channels", "validate", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "ok  adt" in result.stdout


@pytest.mark.parametrize("change, fragments", [
    (("listener = \"default\"", "port = \"2575\""), ["adt.toml", "source.port", "expected an integer"]),
    (("[filter]", "[filterr]"), ["adt.toml", "filterr", "unknown key"]),
    (("type = \"file\"", "type = \"file\"\nretryy = 3"), ["destinations[0].retryy", "unknown key"]),
    (("hl7/ok.hl7.j2", "hl7/missing.hl7.j2"), ["destinations[0].template", "missing.hl7.j2"]),
    (("in ('A01', 'A08')", "in ('A01', "), ["filter.when", "expected a filter expression"]),
    (("type = \"file\"", "type = \"ftp\""), ["destinations[0].type", "file, mllp", "'ftp'"]),
    (("listener = \"default\"", "listener = \"nope\""), ["source.listener", "default", "'nope'"]),
    (("message_types = [\"ADT\"]", "message_types = [\"adt\"]"), ["source.message_types", "ADT^A01"]),
    (("template = \"hl7/ok.hl7.j2\"", "template = \"hl7/ok.hl7.j2\"\n[destinations.retry]\non_failure = \"retry\""),
     ["destinations[0].retry.on_failure", "block, skip"]),
    (("[source]", "[source\n"), ["not valid TOML", "line"]),
])
def test_broken_channel_files_give_one_precise_line(workdir, change, fragments):
    (workdir / "channels" / "adt.toml").write_text(GOOD.replace(*change))
    result = cli("channels", "validate", cwd=workdir)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_two_channels_claiming_one_type_on_one_listener(workdir):
    (workdir / "channels" / "a.toml").write_text(GOOD.replace('name = "adt"', 'name = "a"'))
    (workdir / "channels" / "b.toml").write_text(GOOD.replace('name = "adt"', 'name = "b"'))
    result = cli("channels", "validate", cwd=workdir)
    assert result.returncode == 1 and "'ADT' on this listener is already taken by channel 'a'" in result.stderr


def test_channels_test_dry_run_prints_decisions_and_outputs(workdir):
    (workdir / "channels" / "adt.toml").write_text(GOOD)
    msg = workdir / "m.hl7"
    msg.write_bytes(b"MSH|^~\\&|A|F|||20260101||ADT^A01|DRY1|P|2.5\rPID|1||X^^^GEN||DOE^JANE\r"
                    b"MSH|^~\\&|A|F|||20260101||ADT^A04|DRY2|P|2.5\r")
    result = cli("channels", "test", "adt", msg, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "-- out -> out/DRY1.hl7" in result.stdout and "PID|1||X^^^GEN||DOE^JANE" in result.stdout
    assert "filtered by the channel" in result.stdout
    assert not (workdir / "out").exists() and not (workdir / "var").exists()  # nothing written


def test_channels_test_cases_show_a_readable_diff(workdir):
    (workdir / "channels" / "adt.toml").write_text(GOOD)
    case = workdir / "channels" / "tests" / "adt" / "first"
    case.mkdir(parents=True)
    (case / "input.hl7").write_bytes(b"MSH|^~\\&|A|F|||20260101||ADT^A01|CASE1|P|2.5\rPID|1||X\r")
    assert cli("channels", "test", "adt", "--update", cwd=workdir).returncode == 0
    assert cli("channels", "test", "adt", cwd=workdir).returncode == 0
    (workdir / "mappings" / "hl7" / "ok.hl7.j2").write_text("{{ msg | hl7_set('PID-3', 'Y') }}\n")
    result = cli("channels", "test", "adt", cwd=workdir)
    assert result.returncode == 1
    assert "FAIL  first" in result.stdout and "-PID|1||X" in result.stdout and "+PID|1||Y" in result.stdout


@pytest.mark.parametrize("channel", ["adt", "lab", "adt-lab-to-fhir"])
def test_sample_channels_pass_their_test_cases(channel):
    result = cli("channels", "test", channel, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 failed" in result.stdout


def test_sample_channels_validate():
    result = cli("channels", "validate", cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "ok  adt" in result.stdout and "ok  lab" in result.stdout and "ok  adt-lab-to-fhir" in result.stdout


@pytest.mark.parametrize("channel", ["adt", "lab", "adt-lab-to-fhir"])
def test_every_corpus_message_through_the_sample_channels(corpus, channel):
    files = sorted(str(p) for p in corpus.rglob("*.hl7"))
    result = cli("channels", "test", channel, *files, cwd=ROOT)
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr == ""
    errors = [line for line in result.stdout.splitlines() if ": ERROR " in line]
    assert not errors, errors[:5]
    taken = result.stdout.count("\n-- ")
    assert taken > 10, "the corpus should exercise the channel's destinations"

"""The command line as a user runs it: real processes, real files, one-line errors."""

import json
import subprocess
import sys
import tempfile

import pytest

from interface_engine.mllp import MLLPClient
from tests.conftest import SCHEMA_HEAD
from tests.messages import adt_a01


def cli(*args, cwd=None, timeout=60):
    """Run the command as a user would, by default from an empty folder of its own."""
    return subprocess.run([sys.executable, "-m", "interface_engine", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd or tempfile.mkdtemp(), timeout=timeout)


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_send_prints_each_answer_and_exits_zero(engine_factory, tmp_path):
    engine = engine_factory()
    two = tmp_path / "two.hl7"
    two.write_bytes(adt_a01("S1", sep="\n") + adt_a01("S2", sep="\n"))
    result = cli("send", two, "--port", engine.port)
    assert result.returncode == 0, result.stderr
    assert [line.split("\t")[1:3] for line in result.stdout.splitlines()] == [["AA", "S1"], ["AA", "S2"]]


def test_send_exits_non_zero_on_a_rejection(engine_factory, tmp_path):
    engine = engine_factory()
    bad = tmp_path / "bad.hl7"
    bad.write_bytes(b"MSH|^~\\&|A|B|C|D|20260101||||P|2.5\r")
    result = cli("send", bad, "--port", engine.port)
    assert result.returncode == 1
    code, reason = result.stdout.split("\t")[1], result.stdout.split("\t")[3]
    assert code == "AR" and "MSH-9" in reason


def test_send_reports_an_unreachable_engine_in_one_line(tmp_path):
    f = tmp_path / "m.hl7"
    f.write_bytes(adt_a01())
    assert_one_line_error(cli("send", f, "--port", 1), "cannot connect to 127.0.0.1:1")


def test_send_reports_a_missing_file_in_one_line(tmp_path):
    assert_one_line_error(cli("send", tmp_path / "nope.hl7"), "nope.hl7")


def test_messages_list_and_show(engine_factory, tmp_path):
    engine = engine_factory()
    f = tmp_path / "m.hl7"
    f.write_bytes(adt_a01("LIST1"))
    assert cli("send", f, "--port", engine.port).returncode == 0
    listed = cli("messages", "list", "--config", engine.config_path, "--json")
    assert listed.returncode == 0, listed.stderr
    row = json.loads(listed.stdout.splitlines()[0])
    assert row["control_id"] == "LIST1" and row["state"] == "received" and "raw" not in row
    table = cli("messages", "list", "--config", engine.config_path)
    assert "LIST1" in table.stdout and "ADT^A01" in table.stdout
    shown = cli("messages", "show", row["id"], "--config", engine.config_path)
    assert "PID|1||MRN100001" in shown.stdout and "MSA|AA|LIST1" in shown.stdout
    raw = subprocess.run([sys.executable, "-m", "interface_engine", "messages", "show", str(row["id"]),
                          "--raw", "--config", str(engine.config_path)], capture_output=True)
    assert raw.stdout == adt_a01("LIST1")
    missing = cli("messages", "show", 999999, "--config", engine.config_path)
    assert_one_line_error(missing, "no message with id 999999")


def test_db_upgrade_creates_then_reports_current(tmp_path):
    config = tmp_path / "engine.toml"
    config.write_text('[store]\nurl = "sqlite:///var/s.db"\n')
    first = cli("db", "upgrade", "--config", config, cwd=tmp_path)
    assert first.returncode == 0 and f"from revision none to {SCHEMA_HEAD}" in first.stdout
    assert (tmp_path / "var" / "s.db").exists()
    again = cli("db", "upgrade", "--config", config, cwd=tmp_path)
    assert f"already at revision {SCHEMA_HEAD}" in again.stdout


@pytest.mark.parametrize("text, fragments", [
    ("[store]\nurl = 5\n", ["store.url", "expected a non-empty string"]),
    ("[[listeners]]\nport = 99999\n", ["listeners[0].port", "between 0 and 65535"]),
    ("[[listeners]]\nportt = 2575\n", ["listeners[0].portt", "unknown key"]),
    ("[[listeners]]\nack_mode = \"maybe\"\n", ["listeners[0].ack_mode", "stored"]),
    ("[store]\nduplicate_window = \"soon\"\n", ["store.duplicate_window", "duration"]),
    ("[engine\n", ["not valid TOML", "line 1"]),
    ("[store]\nurl = \"mysql://x\"\n", ["store.url", "sqlite"]),
])
def test_config_errors_name_the_file_and_key(tmp_path, text, fragments):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    assert_one_line_error(cli("run", "--config", config), "bad.toml", *fragments)


def test_missing_config_says_what_to_do(tmp_path):
    assert_one_line_error(cli("run", "--config", tmp_path / "none.toml"), "--config")


def test_port_in_use_is_one_line(engine_factory, tmp_path):
    engine = engine_factory()
    config = tmp_path / "second.toml"
    config.write_text(f'[store]\nurl = "sqlite:///{tmp_path}/other.db"\n'
                      f'[admin]\nport = 0\n[[listeners]]\nport = {engine.port}\n')
    assert_one_line_error(cli("run", "--config", config), f"cannot listen on 127.0.0.1:{engine.port}")


def test_unreachable_postgres_is_one_line(tmp_path):
    config = tmp_path / "pg.toml"
    (tmp_path / "pw").write_text("secret\n")
    config.write_text('[store]\nurl = "postgresql+psycopg://nobody@127.0.0.1:1/none"\n'
                      f'password = "file:{tmp_path / "pw"}"\n[[listeners]]\nport = 0\n')
    result = cli("run", "--config", config)
    assert_one_line_error(result, "cannot connect to the store")
    assert "secret" not in result.stderr


def test_python_m_and_console_script_are_the_same_command():
    result = cli("--help")
    assert result.returncode == 0 and "messages" in result.stdout and "send" in result.stdout


def test_store_files_are_private(engine_factory, tmp_path):
    import stat

    engine = engine_factory()
    with MLLPClient("127.0.0.1", engine.port) as c:
        c.send(adt_a01("PERM1"))
    for name in ("store.db", "store.db-wal"):
        mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
        assert mode == 0o600, f"{name} is {oct(mode)}"


def test_receive_answers_prints_and_saves(tmp_path):
    import re
    import time

    from interface_engine import hl7

    proc = subprocess.Popen([sys.executable, "-u", "-m", "interface_engine", "receive", "--port", "0",
                             "--save", str(tmp_path / "got")], stdout=subprocess.PIPE, text=True)
    try:
        port = int(re.search(r":(\d+),", proc.stdout.readline()).group(1))
        with MLLPClient("127.0.0.1", port) as c:
            ack = hl7.parse(c.send(adt_a01("RECV1")))
        assert (ack["MSA-1"], ack["MSA-2"]) == ("AA", "RECV1")
        line = proc.stdout.readline()
        assert "ADT^A01" in line and "RECV1" in line
        assert (tmp_path / "got" / "000001-RECV1.hl7").read_bytes() == adt_a01("RECV1")
    finally:
        proc.terminate()
        proc.wait(10)

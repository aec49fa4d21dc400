"""Encryption at rest: contents sealed to their row, clear errors without the right key, rotation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from interface_engine import keys
from interface_engine.mllp import MLLPClient
from interface_engine.store import Attempt, Incoming, NewDelivery, Processed, Store, StoreError, utcnow
from interface_engine.store.cipher import Cipher
from interface_engine.store.schema import attempts, deliveries, messages
from tests.conftest import canary_forms
from tests.messages import adt_a01
from tests.receiver import Receiver
from tests.test_cli import assert_one_line_error, cli

#: Planted in PID-3, PID-5, PID-19 and OBX-5 of every message of the 10,000-message run.
CANARIES = ("ZQMRN4417", "ZQFAMILY^ZQGIVEN", "912-00-4417", "ZQRESULT88")


def canary_message(control_id: str) -> bytes:
    return ("\r".join([
        f"MSH|^~\\&|LAB|HOSP|ENGINE|HUB|20260101120000||ORU^R01^ORU_R01|{control_id}|P|2.5.1",
        f"PID|1||{CANARIES[0]}^^^GEN^MR||{CANARIES[1]}||19800101|F|||||||||||{CANARIES[2]}",
        "OBR|1|ORD1|FIL1|11529-5^SURGICAL PATH^LN|||20260101110000",
        f"OBX|1|ST|22634-0^PATHOLOGY REPORT^LN||{CANARIES[3]}||||||F",
    ]) + "\r").encode()


def sealed_store(url: str, path: Path) -> tuple[Store, keys.Keys]:
    made = keys.create(path)
    store = Store(url, cipher=Cipher(made, reload=lambda: keys.load(path)))
    store.check_schema()
    return store, made


def incoming(raw: bytes, control_id: str) -> Incoming:
    return Incoming(raw=raw, listener="l", peer="127.0.0.1", state="received", ack=b"ACK",
                    channel="adt", control_id=control_id, message_type="ADT")


def stored_columns(store: Store, table, row_id: int, *columns) -> tuple:
    with store.engine.connect() as conn:
        return conn.execute(sa.select(*[table.c[c] for c in columns]).where(table.c.id == row_id)).one()


def fill(store: Store, count: int) -> list[int]:
    """Messages with a delivery each and one attempt: every sealed column holds a value."""
    ids = [o.message_id for o in store.write([incoming(adt_a01(f"E{i}"), f"E{i}") for i in range(count)])]
    store.save_processing([Processed(m, "adt", deliveries=(NewDelivery("out", "queued", b"OUT-%d" % m),))
                           for m in ids])
    queued = store.queue([("adt", "out", count)])[0]
    store.record_attempts([Attempt(d.id, d.message_id, utcnow(), 1.0, True, "sent",
                                   response=b"RESPONSE-%d" % d.message_id) for d in queued])
    return ids


def test_every_content_is_sealed_to_its_row_and_reads_back(store_url, tmp_path):
    store, made = sealed_store(store_url, tmp_path / "keys.json")
    (first, second) = fill(store, 2)
    raw, key = stored_columns(store, messages, first, "raw", "raw_key")
    assert key == made.active and b"MRN100001" not in raw and b"DOE" not in raw
    assert store.get_message(first)["raw"] == adt_a01("E0")
    (delivery,) = store.deliveries_of(first)
    assert delivery["output"] == b"OUT-%d" % first and delivery["response"] == b"RESPONSE-%d" % first
    assert delivery["attempt_log"][0]["response"] == b"RESPONSE-%d" % first
    output, response = stored_columns(store, deliveries, delivery["id"], "output", "response")
    assert b"OUT-" not in output and b"RESPONSE-" not in response


def test_a_ciphertext_moved_to_another_row_or_column_does_not_open(store_url, tmp_path):
    store, _ = sealed_store(store_url, tmp_path / "keys.json")
    first, second = fill(store, 2)
    with store.engine.begin() as conn:
        raw, key = conn.execute(sa.select(messages.c.raw, messages.c.raw_key).where(messages.c.id == first)).one()
        conn.execute(sa.update(messages).where(messages.c.id == second).values(raw=raw, raw_key=key))
        conn.execute(sa.update(deliveries).where(deliveries.c.message_id == first)
                     .values(response=deliveries.c.output, response_key=deliveries.c.output_key))
    with pytest.raises(StoreError, match=f"messages.raw of row {second} does not open"):
        store.get_message(second)
    with pytest.raises(StoreError, match="deliveries.response of row .* does not open"):
        store.deliveries_of(first)
    assert store.get_message(first)["raw"] == adt_a01("E0")


def test_without_the_right_key_every_reader_gets_a_clear_error(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store, made = sealed_store(url, tmp_path / "keys.json")
    (message_id,) = fill(store, 1)
    store.close()
    config = tmp_path / "engine.toml"
    config.write_text(f'[store]\nurl = "{url}"\n[keys]\nfile = "{tmp_path / "other.json"}"\n')
    keys.create(tmp_path / "other.json")       # a key file, but not the one the store was sealed with
    assert_one_line_error(cli("messages", "show", message_id, "--config", config),
                          f"sealed with data key {made.active}", "restore the key file")
    # The same id with another key behind it: refused as well, never opened to garbage.
    document = json.loads((tmp_path / "other.json").read_text())
    document["data"] = {"active": made.active, "keys": {made.active: {"key": document["keys"]["index"]}}}
    (tmp_path / "other.json").write_text(json.dumps(document))
    assert_one_line_error(cli("messages", "show", message_id, "--raw", "--config", config),
                          f"does not open with data key {made.active}")
    with pytest.raises(StoreError, match="needs the key file"):
        Store(url).get_message(message_id)


def test_a_running_engine_takes_up_a_rotated_key_and_old_rows_stay_readable(tmp_path, engine_factory):
    with Receiver() as downstream:
        (tmp_path / "channels").mkdir()
        (tmp_path / "channels" / "adt.toml").write_text(
            'name = "adt"\n[source]\ntype = "mllp"\nlistener = "test"\n[[destinations]]\nname = "out"\ntype = "mllp"\n'
            f'host = "127.0.0.1"\nport = {downstream.port}\n')
        engine = engine_factory(extra=f'[channels]\ndirectory = "{tmp_path / "channels"}"\n')
        store = engine.open_store()
        before = keys.load(tmp_path / "var" / "keys.json").active
        with MLLPClient("127.0.0.1", engine.port) as client:
            client.send(adt_a01("OLD1"))
        rotated = cli("keys", "rotate", "--config", engine.config_path)
        assert rotated.returncode == 0, rotated.stderr
        after = keys.load(tmp_path / "var" / "keys.json").active
        assert after != before and f"data key {after} added" in rotated.stdout
        deadline = time.monotonic() + 10
        while "now seals what is stored" not in engine.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        with MLLPClient("127.0.0.1", engine.port) as client:
            client.send(adt_a01("NEW1"))
        deadline = time.monotonic() + 10
        while len(downstream.received) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert downstream.control_ids() == ["OLD1", "NEW1"]
        with store.engine.connect() as conn:
            used = {k for (k,) in conn.execute(sa.select(messages.c.raw_key))}
            used |= {k for (k,) in conn.execute(sa.select(deliveries.c.output_key))}
        assert used == {after}, used      # old rows re-sealed, new ones sealed with the new key
        assert {store.get_message(m["id"])["raw"].split(b"|")[9] for m in store.list_messages()} == {
            b"OLD1", b"NEW1"}
        store.close()


def test_a_rotation_killed_halfway_resumes_and_then_the_old_key_can_be_retired(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store, made = sealed_store(url, tmp_path / "keys.json")
    for start in range(0, 3000, 500):
        store.write([incoming(adt_a01(f"R{i}"), f"R{i}") for i in range(start, start + 500)])
    store.close()
    config = tmp_path / "engine.toml"
    config.write_text(f'[store]\nurl = "{url}"\n[keys]\nfile = "{tmp_path / "keys.json"}"\n')
    old = made.active
    rotation = subprocess.Popen([sys.executable, "-m", "interface_engine", "keys", "rotate", "--batch", "20",
                                 "--config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    while "sealed" not in rotation.stdout.readline():   # the first batch is committed
        assert rotation.poll() is None, rotation.stderr.read()
    rotation.send_signal(signal.SIGKILL)
    rotation.wait()
    new = keys.load(tmp_path / "keys.json").active
    counts = dict(line.split()[:3:2] for line in cli("keys", "list", "--config", config).stdout.splitlines()[1:])
    assert 0 < int(counts[new]) < 3000 and int(counts[old]) + int(counts[new]) == 3000, counts
    assert_one_line_error(cli("keys", "retire", old, "--config", config), f"still seals {counts[old]}")
    resumed = cli("keys", "rotate", "--resume", "--config", config)
    assert resumed.returncode == 0, resumed.stderr
    assert keys.load(tmp_path / "keys.json").active == new      # --resume adds no key
    listing = cli("keys", "list", "--config", config).stdout
    assert f"{old:<10}" in listing and "can be retired" in listing
    retired = cli("keys", "retire", old, "--config", config)
    assert retired.returncode == 0, retired.stderr
    assert list(keys.load(tmp_path / "keys.json").data) == [new]
    reader = Store(url, cipher=Cipher(keys.load(tmp_path / "keys.json")))
    raws = [reader.get_message(i)["raw"] for i in range(1, 3001)]
    assert raws == [adt_a01(f"R{i}") for i in range(3000)]
    assert_one_line_error(cli("keys", "retire", new, "--config", config), "rotate first")
    document = (tmp_path / "keys.json").read_text()
    for result in (rotated_output := [listing, resumed.stdout, retired.stdout]):
        assert not any(key in result for key in json.loads(document)["data"]["keys"][new].values()
                       if len(key) > 20), rotated_output


def test_contents_stored_in_clear_before_encryption_are_sealed_by_a_resumed_rotation(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    clear = Store(url)
    clear.check_schema()
    ids = fill(clear, 3)
    clear.close()
    config = tmp_path / "engine.toml"
    config.write_text(f'[store]\nurl = "{url}"\n[keys]\nfile = "{tmp_path / "keys.json"}"\n')
    made = keys.create(tmp_path / "keys.json")
    reader = Store(url, cipher=Cipher(made))
    assert reader.get_message(ids[0])["raw"] == adt_a01("E0")          # readable before, in clear
    assert "(in clear)" in cli("keys", "list", "--config", config).stdout
    assert cli("keys", "rotate", "--resume", "--config", config).returncode == 0
    with reader.engine.connect() as conn:
        for table, key in ((messages, "raw_key"), (deliveries, "output_key"), (deliveries, "response_key"),
                           (attempts, "response_key")):
            assert {k for (k,) in conn.execute(sa.select(table.c[key]))} == {made.active}
    assert reader.get_message(ids[2])["raw"] == adt_a01("E2")
    assert reader.deliveries_of(ids[1])[0]["attempt_log"][0]["response"] == b"RESPONSE-%d" % ids[1]


def test_a_key_file_from_before_encryption_gets_a_data_key_at_the_first_run(tmp_path):
    path = tmp_path / "keys.json"
    made = keys.create(path)
    document = json.loads(path.read_text())
    del document["data"]
    path.write_text(json.dumps(document))
    assert keys.load(path).active is None
    upgraded, done = keys.load_or_create(path)
    assert done == "added a data key to" and upgraded.active in upgraded.data
    assert (upgraded.index, upgraded.audit) == (made.index, made.audit)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"


@pytest.mark.slow
def test_no_canary_reaches_the_database_files_after_10000_messages(tmp_path, engine_factory):
    """PID-3, PID-5, PID-19 and OBX-5 of 10,000 messages, their outputs and the answers to them."""
    with Receiver() as downstream:
        (tmp_path / "channels").mkdir()
        (tmp_path / "out").mkdir()
        (tmp_path / "channels" / "lab.toml").write_text(
            'name = "lab"\n[source]\ntype = "mllp"\nlistener = "test"\n'
            f'[[destinations]]\nname = "archive"\ntype = "file"\npath = "{tmp_path}/out/{{{{ msg[\'MSH-10\'] }}}}.hl7"\n'
            f'[[destinations]]\nname = "forward"\ntype = "mllp"\nhost = "127.0.0.1"\nport = {downstream.port}\n')
        engine = engine_factory(extra=f'[channels]\ndirectory = "{tmp_path / "channels"}"\n')
        store = engine.open_store()
        with MLLPClient("127.0.0.1", engine.port) as client:
            for i in range(10_000):
                assert b"MSA|AA|C" in client.send(canary_message(f"C{i:05d}"))
        deadline = time.monotonic() + 300
        while store.count_deliveries(state="sent") < 20_000 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert store.count_deliveries(state="sent") == 20_000
        files = {path.name: path.read_bytes() for path in tmp_path.iterdir()
                 if path.name.startswith("store.db")}
        assert "store.db-wal" in files            # read while the engine runs: the WAL holds recent pages
        assert engine.stop() == 0
    files |= {f"{path.name} (stopped)": path.read_bytes() for path in tmp_path.iterdir()
              if path.name.startswith("store.db")}
    assert store.get_message(10_000)["raw"] == canary_message("C09999")   # sealed, not lost
    assert CANARIES[0].encode() in (tmp_path / "out" / "C00042.hl7").read_bytes()  # the canaries were sent
    found = [f"{canary} ({form}) in {name}" for name, data in files.items() for canary in CANARIES
             for form, text in canary_forms(canary).items() if len(text) >= 6 and text.encode() in data]
    assert not found, found
    store.close()

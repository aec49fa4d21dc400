"""`interface-engine replay` against a real engine: real sockets, a real receiver, real files, real FHIR."""

import getpass
import json
import subprocess
import sys
import uuid

from datetime import timedelta

import pytest
import sqlalchemy as sa

from interface_engine.store.replay import get_replay
from interface_engine.store.schema import messages
from tests.fhir.test_fhir_e2e import fhir_engine, patients, search, send, settled  # noqa: F401 (fixture)
from tests.messages import adt_a01, oru_r01
from tests.receiver import Receiver
from tests.test_channels_e2e import Setup
from tests.test_cli import assert_one_line_error, cli

CHANGED = "{{ msg | hl7_set('MSH-5', 'CHANGED') }}\n"


def three_destinations(port: int, tmp_path) -> str:
    return f"""
name = "adt"
[source]
type = "mllp"
listener = "test"
message_types = ["ADT"]
[[destinations]]
name = "downstream"
type = "mllp"
host = "127.0.0.1"
port = {port}
template = "hl7/forward.hl7.j2"
[[destinations]]
name = "archive-a"
type = "file"
path = "{tmp_path}/a/{{{{ msg['MSH-10'] }}}}.hl7"
[[destinations]]
name = "archive-b"
type = "file"
path = "{tmp_path}/b/{{{{ msg['MSH-10'] }}}}.hl7"
template = "hl7/forward.hl7.j2"
"""


@pytest.fixture
def engine(tmp_path, engine_factory, store_url):
    setup = Setup(tmp_path, engine_factory)
    with Receiver() as downstream:
        setup.downstream = downstream
        setup.channel("adt", three_destinations(downstream.port, tmp_path))
        extra = f'[channels]\ndirectory = "{setup.channels}"\nmappings = "{setup.mappings}"\n'
        setup.engine = engine_factory(store_url=store_url, extra=extra)
        setup.store = setup.engine.open_store()
        yield setup
        setup.store.close()


def sent(setup, *control_ids) -> list[int]:
    """Send, wait until every delivery is sent; the stored ids, in order."""
    assert [a[0] for a in setup.send(*[adt_a01(cid) for cid in control_ids])] == ["AA"] * len(control_ids)
    setup.wait(lambda: setup.store.count_deliveries(state="sent") == 3 * len(control_ids),
               what="every delivery sent")
    return sorted(m["id"] for m in setup.store.list_messages())


def replay(setup, *args):
    return cli("replay", *args, "--config", setup.engine.config_path)


def history(setup, message_id) -> list[dict]:
    return [d for d in setup.store.deliveries_of(message_id) if d["replay_id"] is None]


def test_replay_to_one_named_destination_of_three_touches_only_that_one(engine, tmp_path):
    first, second = sent(engine, "R1", "R2")
    before = history(engine, first)
    for f in (tmp_path / "a").iterdir():
        f.unlink()
    for f in (tmp_path / "b").iterdir():
        f.unlink()
    result = replay(engine, first, "--destination", "downstream")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("1 message(s), 1 delivery(ies) queued, 0 filtered, 0 error(s)")
    assert engine.downstream.wait_for(3, timeout=15)
    engine.wait(lambda: engine.store.count_deliveries(state="sent") == 7, what="the replay sent")
    assert engine.downstream.control_ids() == ["R1", "R2", "R1"]
    assert engine.downstream.received[2] == engine.downstream.received[0]
    # the other two destinations were not touched: no new delivery, no file written again
    assert not list((tmp_path / "a").iterdir()) and not list((tmp_path / "b").iterdir())
    for name, count in (("downstream", 3), ("archive-a", 2), ("archive-b", 2)):
        assert engine.store.count_deliveries(destination=name) == count
    # history kept: the original rows as they were, the new one linked to it and to the replay
    assert history(engine, first) == before
    new = [d for d in engine.store.deliveries_of(first) if d["replay_id"] is not None]
    assert len(new) == 1 and new[0]["destination"] == "downstream" and new[0]["state"] == "sent"
    assert new[0]["replay_of"] == next(d["id"] for d in before if d["destination"] == "downstream")
    assert [a["outcome"] for a in new[0]["attempt_log"]] == ["sent"]
    # an idle queue is read again within a second: the replay did not wait for other traffic
    assert (new[0]["attempt_log"][0]["started_at"] - new[0]["created_at"]).total_seconds() < 1.5
    record = get_replay(engine.store, new[0]["replay_id"])
    assert (record["actor"], record["mapping"], record["destinations"]) == \
        (getpass.getuser(), "current", "downstream")
    assert (record["messages"], record["deliveries"]) == (1, 1)
    assert record["selection"] == f"1 message(s): {first}"
    assert engine.store.get_message(first)["state"] == "sent"


def test_dry_run_with_a_changed_template_shows_the_diff_and_changes_nothing(engine):
    (message_id,) = sent(engine, "D1")
    (engine.mappings / "hl7" / "forward.hl7.j2").write_text(CHANGED)
    deliveries = engine.store.count_deliveries()
    result = replay(engine, message_id, "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"message {message_id} -> downstream: would send (repeats delivery " in out
    old = next(line for line in out.splitlines() if line.startswith("  -MSH|"))
    new = next(line for line in out.splitlines() if line.startswith("  +MSH|"))
    assert "|DOWNSTREAM|" in old and "|CHANGED|" in new
    assert "  +++ now" in out and "  --- delivery " in out
    archive_a = out.split(f"message {message_id} -> archive-a:")[1].splitlines()
    assert archive_a[1] == "  unchanged"   # no template: the stored bytes, as before
    assert out.splitlines()[-1] == ("dry run: 1 message(s), 3 delivery(ies) would be queued, 0 filtered, "
                                    "0 error(s); nothing was changed")
    assert engine.store.count_deliveries() == deliveries
    assert get_replay(engine.store, 1) is None
    assert len(engine.downstream.received) == 1


def test_original_mapping_sends_the_old_output_current_the_new(engine):
    (message_id,) = sent(engine, "O1")
    before = history(engine, message_id)
    (engine.mappings / "hl7" / "forward.hl7.j2").write_text(CHANGED)
    result = replay(engine, message_id, "--destination", "downstream", "--mapping", "original")
    assert result.returncode == 0, result.stderr
    assert engine.downstream.wait_for(2, timeout=15)
    assert engine.downstream.received[1] == engine.downstream.received[0]
    result = replay(engine, message_id, "--destination", "downstream")
    assert result.returncode == 0, result.stderr
    assert engine.downstream.wait_for(3, timeout=15)
    assert b"|CHANGED|" in engine.downstream.received[2]
    assert history(engine, message_id) == before
    replays = [d["replay_id"] for d in engine.store.deliveries_of(message_id) if d["replay_id"]]
    assert len(set(replays)) == 2
    assert get_replay(engine.store, replays[0])["mapping"] == "original"


def test_everything_a_listing_selects_is_replayed_through_stdin(engine):
    ids = sent(engine, "S1", "S2", "S3")
    listed = cli("messages", "list", "--json", "--config", engine.engine.config_path)
    result = subprocess.run([sys.executable, "-m", "interface_engine", "replay", "--ids-from", "-",
                             "--destination", "archive-b", "--rate", "10",
                             "--config", str(engine.engine.config_path)],
                            input=listed.stdout, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "3 message(s), 3 delivery(ies) queued" in result.stdout
    engine.wait(lambda: engine.store.count_deliveries(destination="archive-b", state="sent") == 6,
                what="the replay sent")
    record = get_replay(engine.store, 1)
    assert record["selection"] == f"3 message(s): {ids[0]}-{ids[2]} (from stdin)"
    queued = sorted(d["created_at"] for i in ids for d in engine.store.deliveries_of(i) if d["replay_id"])
    assert (queued[-1] - record["at"]).total_seconds() >= 0.2   # --rate 10: the third at 0.2 s


def test_a_bad_selection_is_one_line_and_changes_nothing(engine, tmp_path):
    (message_id,) = sent(engine, "E1")
    deliveries = engine.store.count_deliveries()
    assert_one_line_error(replay(engine, message_id, "--destination", "nowhere"),
                          "channel 'adt' has no destination 'nowhere'", "downstream, archive-a, archive-b")
    assert_one_line_error(replay(engine, 999999), "no message with id 999999")
    assert_one_line_error(replay(engine), "no message ids given")
    ids = tmp_path / "ids.txt"
    ids.write_text(f"{message_id}\nnot an id\n")
    assert_one_line_error(replay(engine, "--ids-from", ids), "ids.txt line 2", '"id"')
    assert_one_line_error(replay(engine, "--ids-from", tmp_path / "none.txt"), "none.txt: No such file")
    assert engine.store.count_deliveries() == deliveries
    assert get_replay(engine.store, 1) is None


def test_a_message_whose_contents_were_pruned_cannot_be_replayed(engine):
    (message_id,) = sent(engine, "P1")
    with open(engine.engine.config_path, "a") as f:
        f.write('[retention]\n[[retention.rules]]\nstates = ["sent"]\ncontent_after = "1ms"\n')
    assert cli("db", "prune", "--config", engine.engine.config_path).returncode == 0
    original = replay(engine, message_id, "--mapping", "original", "--destination", "downstream")
    assert original.returncode == 1
    assert f"message {message_id}: no earlier output for downstream: removed by retention" in original.stderr
    assert "0 message(s), 0 delivery(ies) queued, 0 filtered, 1 error(s)" in original.stdout
    current = replay(engine, message_id)
    assert current.returncode == 1 and "its content was removed by retention" in current.stderr
    assert engine.store.count_deliveries() == 3


def test_replayed_fhir_messages_create_no_duplicates(fhir_engine):
    engine = fhir_engine
    mrn, order = f"MRN{uuid.uuid4().hex[:10].upper()}", f"ORD{uuid.uuid4().hex[:8].upper()}"
    send(engine, adt_a01("FR1", mrn=mrn), oru_r01("FR2", mrn=mrn, order=order))
    settled(engine, 2)

    def resources():
        (patient,) = patients(engine, mrn)
        subject = f"subject=Patient/{patient['id']}"
        found = {kind: sorted(e["resource"]["id"] for e in search(engine, f"{kind}?{subject}").get("entry", []))
                 for kind in ("Observation", "DiagnosticReport")} | {"Patient": [patient["id"]]}
        provenance = search(engine, f"Provenance?target=Patient/{patient['id']}").get("entry", [])
        return found | {"Provenance": sorted(e["resource"]["id"] for e in provenance)}
    first = resources()
    assert len(first["Observation"]) == 2 and len(first["DiagnosticReport"]) == 1
    assert len(first["Provenance"]) == 2   # one per source message
    ids = [str(m["id"]) for m in engine.store.list_messages()]
    for mapping in ("current", "original"):
        result = cli("replay", *ids, "--mapping", mapping, "--config", engine.config_path)
        assert result.returncode == 0, result.stderr
    settled(engine, 6)
    assert resources() == first
    replayed = [d for i in ids for d in engine.store.deliveries_of(int(i)) if d["replay_id"]]
    assert len(replayed) == 4 and all(d["state"] == "sent" for d in replayed)
    assert all(json.loads(d["output"])["type"] == "transaction" for d in replayed)


def test_a_message_deleted_while_a_replay_runs_is_reported(engine):
    from interface_engine import config as config_module
    from interface_engine.config import RetentionRule
    from interface_engine.engine import load_channel_set
    from interface_engine.replay import Replay
    from interface_engine.store.retention import prune

    kept, gone = sent(engine, "G1", "G2")
    config = config_module.load(engine.engine.config_path)
    job = Replay(engine.store, *load_channel_set(config), {}, destinations=("archive-a",))
    selected = job.select([kept, gone])
    with engine.store.engine.begin() as conn:  # make G2 the only one old enough
        conn.execute(sa.update(messages).where(messages.c.id == gone)
                     .values(received_at=messages.c.received_at - timedelta(days=2)))
    assert prune(engine.store, [RetentionRule("*", ("sent",), None, 86400.0)])
    job.begin("test")
    for message_id, channel in selected:
        job.replay(message_id, channel)
    assert job.tally.errors == [f"message {gone}: it was deleted (by retention) since the replay began"]
    assert (job.record.messages, job.record.deliveries) == (1, 1)

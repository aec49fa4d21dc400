"""The post-processor: loose template JSON to a replay-safe transaction Bundle."""

import json

import pytest

from interface_engine.fhir.bundle import (
    BundleError, NotJSON, PrunedDict, PrunedList, build, prune, to_bytes, transaction,
)

SOURCE = {"application": "ADT_APP", "facility": "GEN", "control_id": "C1", "sha256": "ab",
          "type": "ADT^A01", "recorded": "2026-01-01T12:00:00-05:00"}


def test_prune_drops_empty_values_at_every_depth():
    assert prune({"a": None, "b": "", "c": [], "d": {}, "e": [{"f": None}], "g": {"h": ""},
                  "i": 0, "j": False, "k": ["x", None]}) == {"i": 0, "j": False, "k": ["x"]}


class Text(str):
    pass


def test_prune_gives_plain_json_values_in_the_order_given():
    value = {"b": (1, Text("x"), 2.5, True), "a": {"d": "", "c": [None, {"f": 1, "e": 2}]}, "z": None}
    assert json.dumps(prune(value)) == '{"b": [1, "x", 2.5, true], "a": {"c": [{"f": 1, "e": 2}]}}'
    assert type(prune(value)["b"][1]) is str


def _entries(bundle: bytes) -> list[str]:
    return [json.dumps(e["resource"]) for e in json.loads(bundle, object_pairs_hook=dict)["entry"]]


@pytest.mark.parametrize("sort_keys", [True, False])
def test_the_bundle_as_json_is_the_built_bundle_written_out(sort_keys):
    """transaction() writes what to_bytes(build()) would: a template's keys sorted as tojson would have
    (sort_keys), parsed JSON's in their order; merged resources as merge leaves them."""
    rendered = {"resources": [
        {"resourceType": "Patient", "id": "p1", "name": [{"given": ["A"], "family": "Z"}], "gender": "",
         "address": [{"line": ["1"], "city": "X"}]},
        {"resourceType": "Practitioner", "id": "d1", "name": [{"family": "W"}]},
        {"resourceType": "Patient", "id": "p1", "birthDate": "2000", "name": [{"family": "Y"}], "active": True},
        {"resourceType": "Patient", "id": "p1", "telecom": [{"value": "1", "system": "phone"}]},
        {"resourceType": "Location", "id": "l1", "name": "ward é", "description": None},
    ]}
    out = transaction(rendered, SOURCE, sort_keys=sort_keys)
    assert out == to_bytes(build(rendered, SOURCE, sort_keys=sort_keys))
    patient, practitioner, location, _ = _entries(out)
    if sort_keys:
        assert practitioner == '{"id": "d1", "name": [{"family": "W"}], "resourceType": "Practitioner"}'
        assert patient == ('{"address": [{"city": "X", "line": ["1"]}], "id": "p1", "name": [{"family": "Z", '
                           '"given": ["A"]}, {"family": "Y"}], "resourceType": "Patient", "active": true, '
                           '"birthDate": "2000", "telecom": [{"system": "phone", "value": "1"}]}')
    else:
        assert practitioner == '{"resourceType": "Practitioner", "id": "d1", "name": [{"family": "W"}]}'
        assert patient.startswith('{"resourceType": "Patient", "id": "p1", "name": [{"given": ["A"], "family": "Z"}')
    assert json.loads(out)["entry"][2]["request"] == {"method": "PUT", "url": "Location/l1"}
    assert out.decode("utf-8").count("ward é") == 1


def _deep(depth: int):
    value = {"end": 1}
    for _ in range(depth):
        value = {"in": [value]}
    return value


@pytest.mark.parametrize("sort_keys", [True, False])
@pytest.mark.parametrize("value", [
    1e-7, -2.5e-05, 9.999e-05, 0.0001, 1e-4 + 1e-20, 5e-324, 0.0, -0.0, 1.5, 1e15, 1e16, 1.7976931348623157e308,
    2 ** 63, 2 ** 64 - 1, 2 ** 64, -2 ** 63, -2 ** 63 - 1, 10 ** 30, "0.00001 e-5", "é \u2028 \x7f \x00 \x1f",
    _deep(300),
])
def test_numbers_and_text_are_written_as_the_standard_library_writes_them(value, sort_keys):
    """The Bundle's JSON is written by orjson where it writes the same bytes as json, by json elsewhere."""
    rendered = {"resources": [{"resourceType": "Observation", "id": "o1", "value": value, "b": [value], "a": 1}]}
    expected = json.dumps(prune(rendered["resources"][0]), ensure_ascii=False, separators=(",", ":"),
                          sort_keys=sort_keys).encode()
    assert f'{{"resource":{expected.decode()},'.encode() in transaction(rendered, SOURCE, sort_keys=sort_keys)
    assert transaction(rendered, SOURCE, sort_keys=sort_keys) == to_bytes(build(rendered, SOURCE,
                                                                                sort_keys=sort_keys))


@pytest.mark.parametrize("sort_keys", [True, False])
def test_values_the_helpers_built_pruned_are_written_as_plain_ones(sort_keys):
    """prune keeps a PrunedDict or PrunedList as it is; sorted, merged and written as a dict or list."""
    def resources(d, lst):
        return {"resources": [
            {"resourceType": "Patient", "id": "p1", "name": lst([d(family="Z", given=["A"])]), "x": None},
            {"resourceType": "Patient", "id": "p1", "maritalStatus": d(text="M", coding=lst([d(code="M")])),
             "name": lst([d(use="official", family="Y")])},
            {"resourceType": "Patient", "id": "p2", "maritalStatus": d(text="S", coding=lst([d(code="S")]))},
        ]}

    marked = resources(PrunedDict, PrunedList)
    assert prune(marked["resources"][1]["name"]) is marked["resources"][1]["name"]
    assert prune(PrunedList()) is None
    assert transaction(marked, SOURCE, sort_keys=sort_keys) == transaction(resources(dict, list), SOURCE,
                                                                          sort_keys=sort_keys)


def test_keys_that_are_not_all_text_are_not_json_even_when_they_cannot_be_sorted():
    with pytest.raises(NotJSON):
        transaction({"resources": [{"resourceType": "Patient", "id": "p1", "x": {1: "a", "b": 2}}]}, SOURCE,
                    sort_keys=True)


@pytest.mark.parametrize("value", [
    {"a": float("nan")}, {"a": [float("inf")]}, {"a": -float("inf")}, {1: "x"}, {"a": {None: 1}}, {"a": {1, 2}},
    {"a": object()}, {"a": b"bytes"},
])
def test_prune_refuses_what_json_cannot_carry(value):
    with pytest.raises(NotJSON):
        prune(value)


def test_prune_refuses_nesting_deeper_than_python_walks():
    value = []
    for _ in range(100_000):
        value = [value, 1]
    with pytest.raises(NotJSON, match="nested too deeply"):
        prune(value)


def test_a_resource_that_is_not_an_object_is_an_error_not_a_crash():
    with pytest.raises(BundleError, match=r"resources\[0\] is not a resource"):
        build({"resources": ["text"]}, SOURCE)


def test_text_that_is_not_unicode_is_refused():
    with pytest.raises(NotJSON):
        to_bytes({"a": "\ud800"})
    with pytest.raises(NotJSON):
        transaction({"resources": [{"resourceType": "Patient", "id": "p1", "a": "\ud800"}]}, SOURCE, sort_keys=True)


def test_resources_become_put_entries_and_a_provenance_is_added():
    bundle = build({"resources": [
        {"resourceType": "Patient", "id": "p1", "name": [{"family": "DOE"}], "birthDate": None},
        {"resourceType": "Encounter", "id": "e1", "status": "in-progress",
         "subject": {"reference": "Patient/p1"}},
    ]}, SOURCE)
    assert bundle["type"] == "transaction"
    requests = [e["request"] for e in bundle["entry"]]
    assert requests[:2] == [{"method": "PUT", "url": "Patient/p1"}, {"method": "PUT", "url": "Encounter/e1"}]
    assert "birthDate" not in bundle["entry"][0]["resource"]
    provenance = bundle["entry"][-1]["resource"]
    assert provenance["resourceType"] == "Provenance"
    assert provenance["target"] == [{"reference": "Patient/p1"}, {"reference": "Encounter/e1"}]
    assert provenance["entity"][0]["what"]["identifier"]["value"] == "C1"
    assert provenance["recorded"] == "2026-01-01T12:00:00-05:00"


def test_same_message_gives_the_same_bundle_ids():
    rendered = {"resources": [{"resourceType": "Patient", "id": "p1"}]}
    ids = lambda b: [e["request"]["url"] for e in b["entry"]]
    assert ids(build(rendered, SOURCE)) == ids(build(rendered, dict(SOURCE)))
    assert ids(build(rendered, SOURCE)) != ids(build(rendered, SOURCE | {"control_id": "C2"}))


def test_resources_with_the_same_id_are_merged():
    bundle = build({"resources": [
        {"resourceType": "Practitioner", "id": "dr1", "name": [{"family": "WELBY"}]},
        {"resourceType": "Practitioner", "id": "dr1", "name": [{"family": "WELBY"}],
         "identifier": [{"value": "1234"}]},
    ]}, SOURCE)
    practitioners = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Practitioner"]
    assert practitioners == [{"resourceType": "Practitioner", "id": "dr1", "name": [{"family": "WELBY"}],
                              "identifier": [{"value": "1234"}]}]


@pytest.mark.parametrize("rendered, fragment", [
    ({"entry": []}, "must render"),
    ({"resources": []}, "nothing to send"),
    ({"resources": [{"id": "x"}]}, "resourceType"),
    ({"resources": [{"resourceType": "Patient"}]}, "deterministic"),
    ({"resources": [{"resourceType": "Patient", "id": "bad id!"}]}, "valid id"),
])
def test_unusable_template_output_is_a_clear_error(rendered, fragment):
    with pytest.raises(BundleError, match=fragment):
        build(rendered, SOURCE)


def _fhir_delivery(tmp_path, template: str):
    from interface_engine import hl7
    from interface_engine.channels.config import ChannelConfig, DestinationConfig, SourceConfig
    from interface_engine.channels.pipeline import prepare
    from interface_engine.channels.templating import Mappings
    from tests.messages import adt_a01

    (tmp_path / "t.fhir.json.j2").write_text(template, encoding="utf-8")
    destination = DestinationConfig(name="fhir", type="fhir", template="t.fhir.json.j2", url="http://fhir.invalid")
    channel = ChannelConfig(name="c", file="c.toml", source=SourceConfig(type="mllp"), destinations=(destination,))
    raw = adt_a01("B1")
    return prepare(channel, destination, Mappings(tmp_path), hl7.parse(raw), raw)


PATIENT = '{"resourceType": "Patient", "id": "p1", "gender": "female"'


@pytest.mark.parametrize("values", ["{}", '{"name": [{"text": msg["PID-5.1"]}]}'])
def test_a_template_value_and_its_json_text_give_the_same_bundle(tmp_path, values):
    by_value = _fhir_delivery(tmp_path, '{{ {"resources": [dict(%s}, **%s)]} | tojson }}' % (PATIENT, values))
    by_text = _fhir_delivery(tmp_path, '{"resources": [{{ dict(%s}, **%s) | tojson }}]}' % (PATIENT, values))
    assert by_value.state == by_text.state == "queued" and by_value.output == by_text.output
    assert b'"resource":{"gender":"female","id":"p1",' in by_value.output  # keys sorted, as tojson sorts them


def test_values_json_cannot_carry_as_built_go_the_json_render_way(tmp_path):
    # a dict with number keys: tojson writes "1"; the json render decides, as it did before
    queued = _fhir_delivery(tmp_path, '{{ {"resources": [dict(%s}, extension={1: "x"})]} | tojson }}' % PATIENT)
    assert queued.state == "queued" and b'"extension":{"1":"x"}' in queued.output
    failed = _fhir_delivery(tmp_path, '{%% set n = (msg["MSH-99"] ~ "nan") | float %%}{{ {"resources": [dict(%s}, x=n)]} | tojson }}'
                            % PATIENT)
    assert failed.state == "error" and "did not render valid JSON: NaN and Infinity are not JSON" in failed.error


@pytest.mark.parametrize("sort_keys", [True, False])
def test_one_value_given_twice_is_one_resource_as_a_copy_of_it_would_be(sort_keys):
    """A helper gives the same dict for the same XCN twice in a segment; the Bundle is the one an
    equal copy would give (merged into the first, it adds nothing)."""
    doctor = {"resourceType": "Practitioner", "id": "d1", "name": [{"given": ["A"], "family": "W"}], "x": None}
    patient = {"resourceType": "Patient", "id": "p1", "generalPractitioner": [{"reference": "Practitioner/d1"}]}
    same = transaction({"resources": [doctor, patient, doctor]}, SOURCE, sort_keys=sort_keys)
    copied = transaction({"resources": [doctor, patient, dict(doctor)]}, SOURCE, sort_keys=sort_keys)
    assert same == copied == to_bytes(build({"resources": [doctor, patient, dict(doctor)]}, SOURCE,
                                            sort_keys=sort_keys))
    assert [e["request"]["url"] for e in json.loads(same)["entry"]][:2] == ["Practitioner/d1", "Patient/p1"]

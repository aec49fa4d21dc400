"""The post-processor: loose template JSON to a replay-safe transaction Bundle."""

import pytest

from interface_engine.fhir.bundle import BundleError, build, prune

SOURCE = {"application": "ADT_APP", "facility": "GEN", "control_id": "C1", "sha256": "ab",
          "type": "ADT^A01", "recorded": "2026-01-01T12:00:00-05:00"}


def test_prune_drops_empty_values_at_every_depth():
    assert prune({"a": None, "b": "", "c": [], "d": {}, "e": [{"f": None}], "g": {"h": ""},
                  "i": 0, "j": False, "k": ["x", None]}) == {"i": 0, "j": False, "k": ["x"]}


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

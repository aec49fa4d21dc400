"""The template helpers, each through a template as analysts call them."""

from __future__ import annotations

import uuid

import pytest
from lxml import etree

from interface_engine import hl7
from interface_engine.channels.helpers import ENGINE_NAMESPACE, Encoded
from interface_engine.channels.templating import Mappings, TemplateError

LINES = [
    "MSH|^~\\&|LAB_APP|GENERAL_HOSP|ENGINE|HUB|20260101120000||ORU^R01^ORU_R01|MSG00002|P|2.5.1",
    "PID|1||MRN100001^^^GEN&1.2.3&ISO^MR~SSN0001^^^SSA^SS||DOE^JANE^Q||19800101|F|||||555\\T\\0100",
    "ZPI|1|LOCAL",
    "OBR|1||ORD1|GLU^GLUCOSE^L|||202601151230",
    "OBX|1|NM|GLU^GLUCOSE^L||5.5|mmol/L|3.9-5.5|N|||F|||20260115123045.12",
    "NTE|1||a comment",
    "ZPX|2|MORE",
    "OBX|2|ST|NOTE^NOTE^L||x \\F\\ y\\E\\z||||||F",
]
RAW = ("\r".join(LINES) + "\r").encode()


@pytest.fixture
def msg() -> hl7.Message:
    return hl7.parse(RAW)


@pytest.fixture
def mappings(tmp_path) -> Mappings:
    tables = tmp_path / "tables"
    tables.mkdir()
    (tables / "sex.csv").write_text("\ufeffcode,display,system\nF,female,http://hl7.org/fhir/administrative-gender\n"
                                    "M , male ,http://hl7.org/fhir/administrative-gender\n\n"
                                    'U,"unknown, or not stated"\n', encoding="utf-8")
    (tables / "nocode.csv").write_text("key,display\nF,female\n")
    (tables / "dup.csv").write_text("code,display\nF,female\nF,again\n")
    return Mappings(tmp_path, timezone="America/New_York")


def render(mappings: Mappings, source: str, msg, **options) -> str:
    return mappings.render_string(source, msg, **options)


# hl7_datetime / hl7_instant

@pytest.mark.parametrize(("value", "expected"), [
    ("2026", "2026"),
    ("202601", "2026-01"),
    ("20260115", "2026-01-15"),
    ("2026011512", "2026-01-15T12:00:00-05:00"),
    ("202601151230", "2026-01-15T12:30:00-05:00"),             # winter: EST
    ("202607151230", "2026-07-15T12:30:00-04:00"),             # summer: EDT
    ("20260715123045", "2026-07-15T12:30:45-04:00"),
    ("20260715123045.1", "2026-07-15T12:30:45.1-04:00"),
    ("20260715123045.1234", "2026-07-15T12:30:45.1234-04:00"),
    ("202601151230+0100", "2026-01-15T12:30:00+01:00"),        # own offset kept
    ("20260115123045-0330", "2026-01-15T12:30:45-03:30"),
    ("20260115123045+0000", "2026-01-15T12:30:45+00:00"),
    ("20260115-0500", "2026-01-15"),                           # a date never gets a zone
    ("202601-0500", "2026-01"),
    (" 20260115 ", "2026-01-15"),
    ("20240229", "2024-02-29"),
    ("202603080230", "2026-03-08T02:30:00-05:00"),             # in the spring-forward gap: earlier offset
    ("", ""), ("abc", ""), ("2026011", ""), ("20261301", ""), ("20260230", ""), ("20250229", ""),
    ("2026011524", ""), ("202601151260", ""), ("20260115123060", ""), ("20260115123045.", ""),
    ("202601151230+2400", ""), ("202601151230+0160", ""), ("202601151230+01", ""), ("0000", ""),
    ("2026-01-15", ""), ("20260115^D", ""), ("２０２６", ""),
])
def test_hl7_datetime(mappings, msg, value, expected):
    assert render(mappings, "{{ v | hl7_datetime }}", msg, variables={"v": value}) == expected
    assert render(mappings, "{{ hl7_datetime(v) }}", msg, variables={"v": value}) == expected


def test_hl7_datetime_offsets_of_whole_minutes_are_rounded_down(mappings, msg):
    """New York's local mean time before 1883 was 4:56:02 behind UTC: written as whole minutes, -04:57."""
    assert render(mappings, "{{ '185001011200' | hl7_datetime }}", msg) == "1850-01-01T12:00:00-04:57"
    assert render(mappings, "{{ '185001011200' | hl7_datetime }}", msg, timezone="Asia/Kolkata") \
        == "1850-01-01T12:00:00+05:53"


def test_hl7_datetime_uses_the_render_time_zone(mappings, msg):
    source = "{{ '202601151230' | hl7_datetime }} {{ msg['OBR-7'] | hl7_datetime }} {{ '20260115' | hl7_datetime }}"
    assert render(mappings, source, msg) == "2026-01-15T12:30:00-05:00 " * 2 + "2026-01-15"
    assert render(mappings, source, msg, timezone="Europe/Paris") == "2026-01-15T12:30:00+01:00 " * 2 + "2026-01-15"
    assert render(mappings, source, msg, timezone="UTC") == "2026-01-15T12:30:00+00:00 " * 2 + "2026-01-15"


def test_hl7_datetime_of_missing_or_odd_values(mappings, msg):
    source = "[{{ msg['PV1-44.1'] | hl7_datetime }}][{{ none | hl7_datetime }}][{{ 2026 | hl7_datetime }}]"
    assert render(mappings, source, msg) == "[][][2026]"


@pytest.mark.parametrize(("precision", "expected"), [
    ("year", "2026"), ("month", "2026-01"), ("day", "2026-01-15"), ("second", "2026-01-15T12:30:45-05:00"),
])
def test_hl7_datetime_precision(mappings, msg, precision, expected):
    value = "20260115123045.12"
    assert render(mappings, "{{ v | hl7_datetime(p) }}", msg, variables={"v": value, "p": precision}) == expected
    assert render(mappings, "{{ '2026' | hl7_datetime(p) }}", msg, variables={"p": precision}) == "2026"


def test_hl7_datetime_bad_precision(mappings, msg):
    with pytest.raises(TemplateError, match="precision is one of year, month, day, second"):
        render(mappings, "{{ '2026' | hl7_datetime('minute') }}", msg)


@pytest.mark.parametrize(("value", "expected"), [
    ("20260115123045", "2026-01-15T12:30:45-05:00"),
    ("20260715123045.12", "2026-07-15T12:30:45.12-04:00"),
    ("20260115123045+0100", "2026-01-15T12:30:45+01:00"),
    ("202601151230", ""), ("20260115", ""), ("2026", ""), ("junk", ""), ("", ""),
])
def test_hl7_instant(mappings, msg, value, expected):
    assert render(mappings, "{{ v | hl7_instant }}", msg, variables={"v": value}) == expected


def test_hl7_instant_from_the_message(mappings, msg):
    assert render(mappings, "{{ msg['OBX-14'] | hl7_instant }}", msg) == "2026-01-15T12:30:45.12-05:00"


# lookup

def test_lookup(mappings, msg):
    assert render(mappings, "{{ msg['PID-8'] | lookup('sex') }}", msg) == "female"
    assert render(mappings, "{{ lookup(msg['PID-8'], 'sex', column='system') }}", msg) == (
        "http://hl7.org/fhir/administrative-gender")
    assert render(mappings, "{{ 'M' | lookup('sex') }}|{{ ' M ' | lookup('sex') }}", msg) == "male|male"
    assert render(mappings, "{{ 'U' | lookup('sex') }}|{{ 'U' | lookup('sex', column='system') }}|", msg) == (
        "unknown, or not stated||")


def test_lookup_missing_code(mappings, msg):
    assert render(mappings, "{{ 'X' | lookup('sex') }}", msg) == "UNMAPPED:sex:X"
    assert render(mappings, "{{ msg['PID-99'] | lookup('sex') }}", msg) == "UNMAPPED:sex:"
    assert render(mappings, "{{ 'X' | lookup('sex', 'unknown') }}", msg) == "unknown"
    assert render(mappings, "[{{ 'X' | lookup('sex', default='') }}]", msg) == "[]"
    assert render(mappings, "{{ 'f' | lookup('sex') }}", msg) == "UNMAPPED:sex:f"


@pytest.mark.parametrize(("source", "reason"), [
    ("{{ 'F' | lookup('nope') }}", "code table 'nope' not found"),
    ("{{ 'F' | lookup('sex', column='colour') }}", "code table 'sex' has no such column; it has code, display, system"),
    ("{{ 'F' | lookup('nocode') }}", "code table 'nocode' has no 'code' column"),
    ("{{ 'F' | lookup('dup') }}", "code table 'dup' repeats a code on line 3"),
    ("{{ 'F' | lookup('a b') }}", "a table name is letters"),
    ("{{ 'F' | lookup(none) }}", "a table name is letters"),
])
def test_lookup_errors(mappings, msg, source, reason):
    with pytest.raises(TemplateError, match=reason):
        render(mappings, source, msg)


def test_tables_are_read_once(mappings, msg, tmp_path):
    assert render(mappings, "{{ 'F' | lookup('sex') }}", msg) == "female"
    (tmp_path / "tables" / "sex.csv").write_text("code,display\nF,FEMALE\n")
    assert render(mappings, "{{ 'F' | lookup('sex') }}", msg) == "female"
    assert render(Mappings(tmp_path), "{{ 'F' | lookup('sex') }}", msg) == "FEMALE"


# uuid5

def test_uuid5_is_deterministic_forever(mappings, msg):
    source = "{{ uuid5('Patient', msg['PID-3.4.1'], msg['PID-3.1']) }}"
    assert render(mappings, source, msg) == "a474a480-4f11-50d5-9d57-a294dd850cbe"
    assert render(mappings, source, msg) == str(uuid.uuid5(ENGINE_NAMESPACE, "Patient|GEN|MRN100001"))
    assert render(mappings, "{{ uuid5('a', none, 1) }}", msg) == str(uuid.uuid5(ENGINE_NAMESPACE, "a||1"))
    assert render(mappings, "{{ uuid5('Patient', 'GEN', 'MRN100002') }}", msg) != render(mappings, source, msg)


# tojson

def test_tojson_in_the_sandbox(mappings, msg):
    assert render(mappings, "{{ {'b': msg['PID-5.1'], 'a': [1, none, true]} | tojson }}", msg) == (
        '{"a": [1, null, true], "b": "DOE"}')
    assert render(mappings, "{{ msg['PID-5'] | tojson }} {{ '<&>' | tojson }}", msg) == (
        '"DOE^JANE^Q" "\\u003c\\u0026\\u003e"')
    with pytest.raises(TemplateError, match="TypeError"):
        render(mappings, "{{ msg | tojson }}", msg)


# csv_row

@pytest.mark.parametrize(("source", "expected"), [
    ("{{ csv_row('a', 'b', 'c') }}", "a,b,c"),
    ("{{ ['a', 'b'] | csv_row }}", "a,b"),
    ("{{ csv_row(['a', 'b']) }}", "a,b"),
    ("{{ msg.segments('OBX') | map(attribute='name') | csv_row }}", "OBX,OBX"),
    ("{{ csv_row('a,b', 'say \"hi\"', 'line\\none', 'cr\\rhere', '') }}",
     '"a,b","say ""hi""","line\none","cr\rhere",'),
    ("{{ csv_row(none, 1, 2.5, true) }}", ",1,2.5,True"),
    ("{{ csv_row(msg['OBX[2]-5'], msg['PID-3']) }}", "x | y\\z,MRN100001^^^GEN&1.2.3&ISO^MR~SSN0001^^^SSA^SS"),
    ("{{ csv_row() }}", ""),
    ("{{ csv_row('only') }}", "only"),
])
def test_csv_row(mappings, msg, source, expected):
    assert mappings.render_string(source, msg) == expected


# hl7_set / hl7_drop

def test_hl7_set_and_drop(mappings, msg):
    out = render(mappings, "{{ msg | hl7_set('MSH-5', 'LAB') | hl7_set('MSH-6', 'LABFAC') | hl7_drop('Z*') }}", msg)
    expected = [LINES[0].replace("|ENGINE|HUB|", "|LAB|LABFAC|")] + [x for x in LINES[1:] if not x.startswith("Z")]
    assert out == "\r".join(expected)  # render_string strips the final CR
    assert msg.to_bytes() == RAW


def test_hl7_set_escapes_and_creates_fields(mappings, msg):
    out = hl7.parse(render(mappings, "{{ hl7_set(msg, 'PID-20.2', 'A|B^C\\rD') }}", msg))
    assert out["PID-20.2"] == "A|B^C\rD"
    assert out.segment("PID").text.startswith(LINES[1] + "|||||||^A\\F\\B\\S\\C\\X0D\\D")
    assert hl7.parse(render(mappings, "{{ msg | hl7_set('OBX[2]-5', none) }}", msg))["OBX[2]-5"] == ""


def test_a_chain_of_hl7_helpers_reads_as_if_each_step_were_parsed_anew(mappings):
    """The chain hands the message it wrote to the next helper instead of its text; that must not
    show: raw control characters in a line, written values and a new charset read the same."""
    raw = RAW.replace(b"a comment", b"a\x0bcomment\x1c").replace(b"P|2.5.1", b"P|2.5.1||||||UNICODE UTF-8")
    message = hl7.parse(raw)
    steps = ("hl7_set('MSH-5', 'LAB') | hl7_set('PID-5.2', 'JO|ANN') | hl7_set('MSH-18', '8859/1')"
             " | hl7_set('OBX[2]-5', 'caf\\xe9') | hl7_drop('ZP?')")
    chained = render(mappings, "{{ msg | " + steps + " }}", message)
    first, *rest = steps.split(" | ")
    anew = render(mappings, "{{ msg | " + first + " }}", message)
    for step in rest:   # each helper given the text alone, as a template variable: parsed again
        anew = render(mappings, "{{ text | " + step + " }}", message, variables={"text": Encoded(anew + "\r")})
    assert chained == anew
    assert "\\X0B\\comment\\X1C\\" in chained and "JO\\F\\ANN" in chained
    # A new charset reaches the next helper: \XE9\ is é in ISO 8859-1, not a character in UTF-8.
    latin = hl7.parse(RAW.replace(b"a comment", b"caf\\XE9\\"))
    xml = render(mappings, "{{ msg | hl7_set('MSH-18', '8859/1') | hl7_xml }}", latin)
    assert xml == render(mappings, "{{ text | hl7_xml }}", latin, variables={"text": Encoded(
        render(mappings, "{{ msg | hl7_set('MSH-18', '8859/1') }}", latin) + "\r")})
    assert "café" in xml


def test_hl7_drop_patterns(mappings, msg):
    for patterns, kept in [(["NTE"], "MSH PID ZPI OBR OBX ZPX OBX"), (["Z*", "NTE"], "MSH PID OBR OBX OBX"),
                           (["OB?"], "MSH PID ZPI NTE ZPX"), ([], "MSH PID ZPI OBR OBX NTE ZPX OBX")]:
        out = hl7.parse(render(mappings, "{{ msg | hl7_drop(*p) }}", msg, variables={"p": patterns}))
        assert " ".join(s.name for s in out.segments()) == kept


def test_hl7_drop_takes_continuation_lines_with_their_segment(mappings):
    wrapped = hl7.parse(RAW.replace(b"ZPI|1|LOCAL\r", b"ZPI|1|LOCAL\rcontinued text\r"))
    out = render(mappings, "{{ msg | hl7_drop('ZPI') }}", wrapped)
    assert "continued" not in out and "LOCAL" not in out and out.count("\r") == 6


@pytest.mark.parametrize(("source", "reason"), [
    ("{{ 'MSH|^~\\\\&|A' | hl7_set('MSH-5', 'x') }}", "hl7_set takes msg or the result of another hl7_\\* helper"),
    ("{{ msg['PID-3'] | hl7_drop('Z*') }}", "hl7_drop: the value is not a whole HL7 message"),
    ("{{ msg.segment('PID') | hl7_set('PID-5', 'x') }}", "hl7_set takes msg"),
    ("{{ msg | hl7_set('PID-5', msg['PID-3']) }}", "hl7_set writes one leaf value"),
    ("{{ msg | hl7_set('NK1-2', 'x') }}", "hl7_set: no NK1 segment number 1"),
    ("{{ msg | hl7_set('MSH-2', 'x') }}", "hl7_set: MSH-1 and MSH-2 are the delimiters"),
    ("{{ msg | hl7_set('PID', 'x') }}", "malformed HL7 path"),
    ("{{ msg | hl7_drop('M*') }}", "hl7_drop: MSH cannot be dropped"),
    ("{{ msg | hl7_drop(1) }}", "hl7_drop: patterns are segment ids"),
])
def test_hl7_set_and_drop_errors(mappings, msg, source, reason):
    with pytest.raises(TemplateError, match=reason):
        render(mappings, source, msg)


def test_hl7_helpers_keep_the_message_delimiters(mappings):
    odd = hl7.parse(b"MSH#$%!@#APP#FAC#####ORU$R01#1#P#2.5.1\rPID#1##MRN1##DOE$JANE\rZZZ#1\r")
    out = render(mappings, "{{ msg | hl7_set('PID-5.2', 'A#B|C') | hl7_drop('ZZZ') }}", odd)
    assert out == "MSH#$%!@#APP#FAC#####ORU$R01#1#P#2.5.1\rPID#1##MRN1##DOE$A!F!B|C"


# hl7_xml

def test_hl7_xml(mappings, msg):
    root = etree.fromstring(render(mappings, "{{ hl7_xml(msg) }}", msg))
    assert root.tag == "ORU_R01"
    assert [e.tag for e in root] == ["MSH", "PID", "ZPI", "OBR", "OBX", "NTE", "ZPX", "OBX"]
    msh = root.find("MSH")
    assert msh.findtext("MSH.1") == "|" and msh.findtext("MSH.2") == "^~\\&"
    assert msh.findtext("MSH.9/MSH.9.3") == "ORU_R01" and msh.find("MSH.8") is None
    pid = root.find("PID")
    reps = pid.findall("PID.3")
    assert len(reps) == 2
    assert reps[0].findtext("PID.3.1") == "MRN100001" and reps[0].find("PID.3.2") is None
    assert reps[0].findtext("PID.3.4/PID.3.4.2") == "1.2.3"
    assert reps[1].findtext("PID.3.4") == "SSA"
    assert pid.findtext("PID.8") == "F" and pid.findtext("PID.13") == "555&0100"
    assert root.findall("OBX")[1].findtext("OBX.5") == "x | y\\z"


def test_hl7_xml_root_name_fallback(mappings):
    for header, root in [(b"ADT^A01", "ADT_A01"), (b"ACK", "ACK"), (b"ADT^A01^bad name", "ADT_A01")]:
        m = hl7.parse(b"MSH|^~\\&|A|B|||||" + header + b"|1|P|2.3\rPID|1\r")
        assert etree.fromstring(render(mappings, "{{ msg | hl7_xml }}", m)).tag == root


def test_hl7_xml_refuses_what_xml_cannot_carry(mappings, msg):
    msg.set("PID-5.1", "A\x0bB")
    with pytest.raises(TemplateError, match="hl7_xml: a value holds a character that XML cannot carry"):
        render(mappings, "{{ hl7_xml(msg) }}", msg)
    numeric = hl7.parse(b"MSH|^~\\&|A|B|||||ADT^A01|1|P|2.3\r123|1\r")
    with pytest.raises(TemplateError, match="starts with a digit"):
        render(mappings, "{{ hl7_xml(msg) }}", numeric)


@pytest.mark.parametrize("parts", [(), ("Patient",), ("Patient", None, "MRN1"), ("Location", "", " "),
                                   ("Patient", "urn:oid:2.999.1", "ÉLODIE 漢字\u2028|x"), (1, 2.5, True)])
def test_uuid5_gives_the_ids_of_uuid_uuid5(parts):
    import uuid

    from interface_engine.channels.helpers import ENGINE_NAMESPACE, Encoded, uuid5

    name = "|".join("" if p is None else str(p) for p in parts)
    assert uuid5(*parts) == str(uuid.uuid5(ENGINE_NAMESPACE, name))


def test_uuid5_text_gives_the_ids_of_uuid_uuid5_for_any_namespace():
    import uuid

    from interface_engine.channels.helpers import uuid5_text

    for n in range(2000):  # every version and variant digit SHA-1 can give
        namespace = uuid.UUID(int=n * 0x9E3779B97F4A7C15 % (1 << 128))
        assert uuid5_text(namespace.bytes, f"name {n}") == str(uuid.uuid5(namespace, f"name {n}"))


def test_a_composite_read_once_gives_each_component_as_its_path_read():
    """The segment maps take an XCN's or a PL's components from one split; every value must be the
    path read's (resource ids are made of them): repetitions, sub-components, escapes, the null."""
    from interface_engine.channels.helpers import HelperError, TemplateMessage

    msg = hl7.parse(b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|1|P|2.5\r"
                    b"PV1|1|I|W^1^2^H&1.2&ISO||||123^Sm\\T\\ith^J^^^Dr^^^NPI&2.16&ISO^^^^L~\"\"^Doe|||||x\r"
                    b"MSH|^~\\&|A\r")
    pv1 = TemplateMessage(msg).segment("PV1")
    for field in ("PV1-3", "PV1-7", "PV1-7[1]", "PV1-7[2]", "PV1-7[3]", "3", "PV1-60"):
        read = pv1._components(field)
        for c in range(1, 16):
            for s in (1, 2, 3, 4):
                assert read(c, s) == pv1[f"{field}.{c}.{s}"], (field, c, s)
    assert pv1._components("PV1-7")(2) == "Sm&ith"
    for bad in ("PV1-7.1", "PID-7", "PV1[2]-7", "PV1-x"):
        with pytest.raises(HelperError):
            pv1._components(bad)

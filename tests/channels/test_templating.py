"""Mappings: output kinds, the hl7 escaping rule, errors, filters, the read-only message view."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from lxml import etree

from interface_engine import hl7
from interface_engine.channels.helpers import Encoded
from interface_engine.channels.templating import (
    OUTPUT_KINDS, Filter, Mappings, SandboxViolation, TemplateError, output_kind_for,
)

ADT_LINES = [
    "MSH|^~\\&|ADT_APP|GENERAL_HOSP|ENGINE|HUB|20260101120000||ADT^A01^ADT_A01|MSG00001|P|2.5.1",
    "EVN|A01|20260101120000",
    "PID|1||MRN100001^^^GEN&1.2.3&ISO^MR~SSN0001^^^SSA^SS||DOE^JANE^Q~ROE^JANE||19800101|F|||"
    "1 MAIN ST^^SPRINGFIELD^ST^00000||555\\T\\0100",
    "NK1|1|DOE^JOHN|SPO",
    "PV1|1|I|WARD1^101^A^GEN||||1234^WELBY^MARCUS",
    "ZPI|1|LOCAL^EXTENSION",
    "AL1|1|DA|PCN^PENICILLIN^L|SV|HIVES",
    "ZPI|2|MORE",
    "OBX|1|ST|CODE1^First||value one||||||F",
    "OBX|2|TX|CODE2^Second||a \\S\\ b||||||F",
]
ADT = ("\r".join(ADT_LINES) + "\r").encode()
HL7_HEADER = "MSH|^~\\&|ENGINE|HUB|LAB|LABFAC|20260101120000||ADT^A08|OUT1|P|2.5.1\n"


def make(tmp_path, files: dict[str, str], **options) -> Mappings:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return Mappings(tmp_path, **options)


@pytest.fixture
def msg() -> hl7.Message:
    return hl7.parse(ADT)


def with_value(value: str, path: str = "PID-5.1") -> hl7.Message:
    m = hl7.parse(ADT)
    m.set(path, value)
    return hl7.parse(m.to_bytes())


# output kinds

@pytest.mark.parametrize(("name", "kind"), [
    ("hl7/out.hl7.j2", "hl7"), ("out.hl7", "hl7"), ("OUT.HL7.J2", "hl7"), ("fhir/p.json.j2", "json"),
    ("x.xml.j2", "xml"), ("text/r.csv.j2", "text"), ("a.txt", "text"), ("a.json", "text"), ("hl7.j2", "text"),
])
def test_output_kind_by_name(name, kind):
    assert output_kind_for(name) == kind
    assert kind in OUTPUT_KINDS


def test_hl7_kind_line_ends_blank_lines_and_charset(tmp_path, msg):
    m = make(tmp_path, {"out.hl7.j2": HL7_HEADER + "\n\r\n   \nPID|1||{{ msg['PID-3.1'] }}\r\nEVN|A08\n\n"})
    assert m.render("out.hl7.j2", msg) == (HL7_HEADER.rstrip("\n") + "\rPID|1||MRN100001\rEVN|A08\r").encode()


def test_hl7_kind_encodes_with_the_message_charset(tmp_path):
    raw = ADT.replace(b"|2.5.1\r", b"|2.5.1||||||8859/1\r", 1).replace(b"DOE^JANE", "DØE^JANE".encode("latin-1"))
    latin = hl7.parse(raw)
    assert latin.encoding != "utf-8"
    m = make(tmp_path, {"out.hl7.j2": "PID|1||{{ msg['PID-5.1'] }}|{{ 'é' }}"})
    assert m.render("out.hl7.j2", latin) == "PID|1||DØE|é\r".encode("latin-1")
    m = make(tmp_path, {"euro.hl7.j2": "PID|1||{{ '€' }}"})
    with pytest.raises(TemplateError, match=r"charset \(latin-1\) cannot encode"):
        m.render("euro.hl7.j2", latin)


def test_hl7_kind_empty_output_is_empty(tmp_path, msg):
    m = make(tmp_path, {"none.hl7.j2": "{% if false %}PID|1{% endif %}\n\n"})
    assert m.render("none.hl7.j2", msg) == b""


INJECTIONS = ["A|B", "A^B", "A~B", "A&B", "A\\B", "A\rPID|X", "A\nOBX|1", "A\r\nB", "A\x0bB", "A\x1cB",
              "\x0b|^~\\&\r\n\x1c\r", "\\F\\", "\\X0D\\", "MSH|^~\\&|", "\x1c\r"]


@pytest.mark.parametrize("value", INJECTIONS)
def test_hl7_values_cannot_add_structure(tmp_path, value):
    message = with_value(value)
    assert message["PID-5.1"] == value
    m = make(tmp_path, {"out.hl7.j2": HL7_HEADER + "PID|1||{{ msg['PID-5.1'] }}^{{ msg['PID-5.1'] }}|X\n"
                                                   "NTE|1||{{ msg.segment('PID')['5.1'] }}|Y\n"})
    data = m.render("out.hl7.j2", message)
    assert b"\x0b" not in data and b"\x1c" not in data and data.count(b"\r") == 3
    out = hl7.parse(data)
    assert [s.name for s in out.segments()] == ["MSH", "PID", "NTE"]
    assert len(out.segment("PID").text.split("|")) == 5
    assert len(out.segment("NTE").text.split("|")) == 5
    assert out["PID-3"].count("^") == 1 and "~" not in out["PID-3"]
    assert out["PID-3.1"] == out["PID-3.2"] == out["NTE-3"] == value
    assert out["PID-4"] == "X" and out["NTE-4"] == "Y"


@pytest.mark.parametrize("value", ["A|B^C~D&E\\F", "A\rPID|X\nOBX|1\x0b\x1c"])
@pytest.mark.parametrize("expression", [
    "v | safe", "v | e", "v ~ ''", "msg['PID-3'] ~ v", "'%s' % v", "[msg['PID-3'], v] | join('|')",
    "v | upper | lower", "v | replace('x', 'y')", "v | trim", "v | tojson", "(v | safe) ~ msg['PID-3']",
    "csv_row(v, v)", "hl7_xml(msg)", "v | lookup('t', default=v)", "uuid5(v) ~ v", "m(v)", "caller_m(v)",
])
def test_hl7_escaping_cannot_be_bypassed(tmp_path, value, expression):
    """Markup, string operations and helpers: whatever carries the value is escaped in hl7 output."""
    message = with_value(value)
    m = make(tmp_path, {
        "tables/t.csv": "code,display\n",
        "out.hl7.j2": "{% macro m(x) %}{{ x }}{% endmacro %}"
                      "{% macro caller_m(x) %}{% call m2() %}{{ x }}{% endcall %}{% endmacro %}"
                      "{% macro m2() %}{{ caller() }}{% endmacro %}"
                      "{% set v = msg['PID-5.1'] %}" + HL7_HEADER + "PID|1||{{ " + expression + " }}|END\n"})
    if expression == "hl7_xml(msg)" and "\x0b" in value:
        with pytest.raises(TemplateError, match="XML cannot carry"):
            m.render("out.hl7.j2", message)
        return
    out = hl7.parse(m.render("out.hl7.j2", message))
    assert [s.name for s in out.segments()] == ["MSH", "PID"]
    assert out["PID-4"] == "END"
    field = out.segment("PID").text.split("|")[3]
    assert not set("^~&\r\n\x0b\x1c") & set(field)


def test_hl7_encoded_values_are_copied_as_is(tmp_path, msg):
    m = make(tmp_path, {"out.hl7.j2": HL7_HEADER +
                        "PID|1||{{ msg['PID-3'] }}||{{ msg['PID-5'] }}|{{ msg['PID-3.4'] }}|{{ msg['PID-13'] }}\n"
                        "{% for s in msg.segments('OBX') %}{{ s }}\n{% endfor %}"
                        "{% macro line(seg) %}{{ seg }}|{{ seg['1'] }}{% endmacro %}{{ line(msg.segment('AL1')) }}\n"})
    out = m.render("out.hl7.j2", msg).decode().split("\r")
    assert out[1] == ("PID|1||MRN100001^^^GEN&1.2.3&ISO^MR~SSN0001^^^SSA^SS||DOE^JANE^Q~ROE^JANE"
                      "|GEN&1.2.3&ISO|555\\T\\0100")
    assert out[2:4] == ADT_LINES[-2:]
    assert out[4] == ADT_LINES[6] + "|1"


def test_hl7_output_must_declare_the_message_delimiters(tmp_path):
    odd = hl7.parse(b"MSH#$%!@#APP#FAC#####ADT$A01#1#P#2.5.1\rPID#1##MRN1##A|B$C\r")
    assert odd["PID-5.1"] == "A|B"
    m = make(tmp_path, {"same.hl7.j2": "MSH#$%!@#E#H#####ADT$A08#2#P#2.5.1\nPID#1##{{ msg['PID-5.1'] }}#{{ 'x#y' }}",
                        "other.hl7.j2": HL7_HEADER + "PID|1||{{ msg['PID-5.1'] }}"})
    assert m.render("same.hl7.j2", odd).split(b"\r")[1] == b"PID#1##A|B#x!F!y"
    with pytest.raises(TemplateError, match="declares other delimiters"):
        m.render("other.hl7.j2", odd)


def test_hl7_framing_characters_in_template_text_are_refused(tmp_path, msg):
    m = make(tmp_path, {"out.hl7.j2": "PID|1\x0b"})
    with pytest.raises(TemplateError, match="0x0B or 0x1C"):
        m.render("out.hl7.j2", msg)


def test_hl7_set_and_drop_round_trip(tmp_path, msg):
    m = make(tmp_path, {"fwd.hl7.j2": "{{ msg | hl7_set('MSH-5', 'LAB') | hl7_set('MSH-6', 'LABFAC') "
                                      "| hl7_drop('Z*') }}\n"})
    expected = [ADT_LINES[0].replace("|ENGINE|HUB|", "|LAB|LABFAC|")] + [
        line for line in ADT_LINES[1:] if not line.startswith("ZPI")]
    assert m.render("fwd.hl7.j2", msg) == ("\r".join(expected) + "\r").encode()
    assert msg.to_bytes() == ADT


def test_json_kind(tmp_path, msg):
    m = make(tmp_path, {"p.json.j2": """{
  "resourceType": "Patient",
  "id": {{ uuid5('Patient', msg['PID-3.4.1'], msg['PID-3.1']) | tojson }},
  "name": [{"family": {{ msg['PID-5.1'] | tojson }}, "given": {{ [msg['PID-5.2'], msg['PID-5.3']] | tojson }}}],
  "birthDate": "{{ msg['PID-7'] | hl7_datetime }}",
  "note": "{{ msg['PID-3'] }}",
  "n": {{ msg.segments('OBX') | length }}
}"""})
    data = m.render("p.json.j2", msg)
    assert b"\n" not in data and b": " not in data
    value = json.loads(data)
    assert list(value) == ["resourceType", "id", "name", "birthDate", "note", "n"]
    assert value["name"] == [{"family": "DOE", "given": ["JANE", "Q"]}]
    assert value["birthDate"] == "1980-01-01" and value["n"] == 2
    assert value["note"] == msg["PID-3"]


@pytest.mark.parametrize("value", ['DOE", "admin": true, "x": "', 'A\\"B', "é\u2028\n\t</x>"])
def test_json_values_cannot_leave_their_string(tmp_path, value):
    m = make(tmp_path, {"p.json.j2": '{"a": "{{ msg[\'PID-5.1\'] }}", "b": {{ msg[\'PID-5.1\'] | tojson }}}'})
    assert json.loads(m.render("p.json.j2", with_value(value))) == {"a": value, "b": value}


def test_json_macro_output_is_kept(tmp_path, msg):
    m = make(tmp_path, {"p.json.j2": '{% macro code(c) %}{"code": {{ c | tojson }}}{% endmacro %}'
                                     '{"a": {{ code(msg["PID-8"]) }}}'})
    assert m.render("p.json.j2", msg) == b'{"a":{"code":"F"}}'


@pytest.mark.parametrize(("text", "reason"), [
    ('{"a": 1,}', "did not render valid JSON: Expecting property name"),
    ('{"a": 1} x', "Extra data at line 1 column 10"),
    ('{"a": 1, "a": 2}', "duplicate key"),
    ('{"a": NaN}', "NaN and Infinity"),
    ("", "Expecting value at line 1 column 1"),
])
def test_json_invalid_output(tmp_path, msg, text, reason):
    m = make(tmp_path, {"p.json.j2": text})
    with pytest.raises(TemplateError, match=reason) as e:
        m.render("p.json.j2", msg)
    assert str(e.value).startswith("template p.json.j2: ")


def test_render_value_hands_a_lone_tojson_value_over_unwritten(tmp_path, msg):
    m = make(tmp_path, {"p.json.j2": '{% set r = {"b": 1, "a": [msg["PID-5.1"], none]} %}\n  {{ r | tojson }}\n'})
    rendered = m.render_value("p.json.j2", msg)
    assert rendered.as_built and rendered.value == {"b": 1, "a": ["DOE", None]}
    assert list(rendered.value) == ["b", "a"]  # not sorted yet: tojson's sorting is the caller's
    assert json.loads(m.render("p.json.j2", msg)) == rendered.value


@pytest.mark.parametrize("text", [
    '{"a": {{ msg["PID-5.1"] | tojson }}, "b": 2}',                      # JSON written around values
    '{{ [1] | tojson }}{% set x %}{{ [2] | tojson }}{% endset %}',        # a second value, unused
    '{% set t = {"k": msg["PID-5.1"]} | tojson %}{{ {"n": t | length, "t": t ~ "", "s": t[:4], "in": "DOE" in t,'
    ' "eq": t == \'{"k": "DOE"}\', "up": t.upper()} | tojson }}',      # a tojson result read as text
    '{{ {"a": 1} | tojson(indent=2) }}',
    '{% macro m(v) %}{{ v | tojson }}{% endmacro %}{{ m([1, 2]) }}',
    '{"resources": []}',
])
def test_render_value_of_any_other_output_is_the_json_render(tmp_path, msg, text):
    m = make(tmp_path, {"p.json.j2": text})
    rendered = m.render_value("p.json.j2", msg)
    assert rendered.value == json.loads(m.render("p.json.j2", msg))


def test_render_value_reads_tojson_results_as_their_json_text(tmp_path, msg):
    m = make(tmp_path, {"p.json.j2": '{% set t = {"k": msg["PID-5.1"]} | tojson %}'
                                     '{{ {"n": t | length, "up": t.upper(), "s": t[2:3]} | tojson }}'})
    assert m.render_value("p.json.j2", msg).value == {"n": 12, "up": '{"K": "DOE"}', "s": "k"}


def test_render_value_fails_as_the_json_render_does(tmp_path, msg):
    m = make(tmp_path, {"p.json.j2": '{"a": 1,}', "q.json.j2": "{{ x.y | tojson }}"})
    with pytest.raises(TemplateError, match="template p.json.j2: did not render valid JSON"):
        m.render_value("p.json.j2", msg)
    with pytest.raises(TemplateError, match="template q.json.j2 line 1: undefined"):
        m.render_value("q.json.j2", msg)


def test_xml_kind(tmp_path):
    message = with_value('<b>&"x\'')
    m = make(tmp_path, {"p.xml.j2": '<?xml version="1.0" encoding="ISO-8859-1"?>\n'
                                    '<p name="{{ msg[\'PID-5.1\'] }}">{{ msg[\'PID-5.1\'] }} é</p>'})
    data = m.render("p.xml.j2", message)
    assert data.startswith(b"<?xml version='1.0' encoding='UTF-8'?>")
    root = etree.fromstring(data)
    assert root.text == '<b>&"x\' é' and root.get("name") == '<b>&"x\''


@pytest.mark.parametrize("text", ["<a><b></a>", "<a>", "", "<a/><b/>", "<a>\x0b</a>", "<a>&nbsp;</a>"])
def test_xml_invalid_output(tmp_path, msg, text):
    m = make(tmp_path, {"p.xml.j2": text})
    with pytest.raises(TemplateError, match="did not render well-formed XML"):
        m.render("p.xml.j2", msg)


def test_xml_entities_are_not_expanded(tmp_path, msg):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-MARKER")
    m = make(tmp_path, {
        "file.xml.j2": f'<!DOCTYPE x [<!ENTITY e SYSTEM "file://{secret}">]><x>&e;</x>',
        "net.xml.j2": '<!DOCTYPE x SYSTEM "http://127.0.0.1:9/x.dtd"><x/>',
        "laughs.xml.j2": '<!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]><x>&b;</x>',
    })
    for name in ("file.xml.j2", "net.xml.j2", "laughs.xml.j2"):
        with pytest.raises(TemplateError, match="DOCTYPE") as e:
            m.render(name, msg)
        assert "TOP-SECRET" not in str(e.value)


def test_xml_hl7_xml_is_not_escaped_twice(tmp_path, msg):
    m = make(tmp_path, {"v2.xml.j2": "<wrap>{{ hl7_xml(msg) }}</wrap>"})
    root = etree.fromstring(m.render("v2.xml.j2", msg))
    assert root[0].tag == "ADT_A01"
    assert root.find("ADT_A01/PID/PID.5/PID.5.1").text == "DOE"


def test_text_kind(tmp_path, msg):
    m = make(tmp_path, {"r.csv.j2": "{{ csv_row('id', 'name') }}\n"
                                    "{% for s in msg.segments('OBX') %}\n"
                                    "{{ csv_row(msg['PID-3.1'], s['5'], none) }}\n"
                                    "{% endfor %}\n"})
    assert m.render("r.csv.j2", msg) == b"id,name\nMRN100001,value one,\nMRN100001,a ^ b,\n"


def test_kind_can_be_forced(tmp_path, msg):
    m = make(tmp_path, {"t.j2": "PID|{{ msg['PID-13'] }}"})
    assert m.render("t.j2", msg) == b"PID|555&0100"
    assert m.render("t.j2", msg, kind="hl7") == b"PID|555\\T\\0100\r"
    with pytest.raises(TemplateError, match="unknown output kind"):
        m.render("t.j2", msg, kind="pdf")


def test_render_string(tmp_path, msg):
    m = make(tmp_path, {})
    path = "var/archive/{{ msg['MSH-4.1'] or 'unknown' }}/{{ msg['MSH-10'] or uuid5(msg.raw) }}.hl7\n"
    assert m.render_string(path, msg) == "var/archive/GENERAL_HOSP/MSG00001.hl7"
    assert m.render_string("  {{ channel.name }}-{{ x }} ", msg,
                           variables={"channel": {"name": "adt"}, "x": 1}) == "adt-1"


# the read-only view

PATHS = [f"{seg}-{f}{r}{c}" for seg in ("MSH", "PID", "OBX", "OBX[2]", "ZPI[2]", "ZZZ") for f in range(1, 15)
         for r in ("", "[1]", "[2]") for c in ("", ".1", ".2", ".4", ".4.2", ".1.1")]


def test_view_reads_like_the_model(tmp_path, msg):
    m = make(tmp_path, {})
    for path in PATHS:
        got = m.render_string(f"{{{{ msg[{path!r}] is string }}}}|{{{{ msg[{path!r}] }}}}", msg)
        assert got == f"True|{msg[path]}".strip(), path


@pytest.mark.parametrize(("path", "encoded"), [
    ("PID-3", True), ("PID-3.1", False), ("PID-3[2]", True), ("PID-3.4", True), ("PID-3.4.2", False),
    ("PID-5", True), ("PID-5.1", False), ("PID-13", False), ("OBX[2]-5", False), ("MSH-2", True),
    ("MSH-1", True), ("MSH-9", True), ("ZZZ-1", False),
])
def test_view_marks_composites_encoded(msg, path, encoded):
    from interface_engine.channels.helpers import TemplateMessage
    value = TemplateMessage(msg)[path]
    assert isinstance(value, Encoded) is encoded
    assert value == msg[path]


def test_view_segments_and_iteration(tmp_path, msg):
    m = make(tmp_path, {})
    assert m.render_string("{% for s in msg %}{{ s.name }} {% endfor %}", msg) == (
        "MSH EVN PID NK1 PV1 ZPI AL1 ZPI OBX OBX")
    assert m.render_string("{{ msg.segments('ZPI') | map(attribute='name') | join(',') }}", msg) == "ZPI,ZPI"
    assert m.render_string("{{ msg.segment('ZZZ') is none }} {{ msg['ZZZ-1'] == '' }}", msg) == "True True"
    assert m.render_string("{% set pid = msg.segment('PID') %}{{ pid['PID-5.2'] }} {{ pid.raw == pid | string }}",
                           msg) == "JANE True"
    assert m.render_string("{{ msg.raw == msg | string }}", msg) == "True"


# errors

def test_errors_name_template_and_line(tmp_path, msg):
    m = make(tmp_path, {"a.hl7.j2": "MSH|^~\\&|\n{% include 'b.j2' %}\n",
                        "b.j2": "line one\n\n{{ nope }}\n",
                        "c.hl7.j2": "X\n{% for s in msg %}\n{{ s['5.1'] | int / 0 }}\n{% endfor %}"})
    with pytest.raises(TemplateError) as e:
        m.render("a.hl7.j2", msg)
    assert (e.value.template, e.value.line) == ("b.j2", 3)
    assert str(e.value) == "template b.j2 line 3: undefined: 'nope' is undefined"
    with pytest.raises(TemplateError) as e:
        m.render("c.hl7.j2", msg)
    assert str(e.value).startswith("template c.hl7.j2 line 3: ZeroDivisionError")


def test_errors_never_quote_message_content(tmp_path):
    message = with_value("SECRETNAMÉ")
    m = make(tmp_path, {
        "tables/t.csv": "code,display\n",
        "1.j2": "{% set d = {'a': 1} %}{{ d[msg['PID-5.1']] }}",
        "2.j2": "{{ msg['PID-5.1'].encode('ascii') }}",
        "3.j2": "{{ msg['PID-5.1'] + 1 }}",
        "4.j2": "{{ msg['PID-5.1'] | lookup('t', column=msg['PID-5.1']) }}",
        "5.j2": "{{ msg[msg['PID-5.1']] }}",
        "6.j2": "{{ msg | hl7_set(msg['PID-5.1'], 'x') }}",
        "7.j2": "{{ {'_' ~ msg['PID-5.1']: 1}['_' ~ msg['PID-5.1']].x }}",
        "8.j2": "{{ ''[('_' ~ msg['PID-5.1'])] }}",
        "9.j2": "{{ msg['PID-5.1'] | hl7_datetime('x' ~ msg['PID-5.1']) }}",
    })
    for n in range(1, 10):
        with pytest.raises(TemplateError) as e:
            m.render(f"{n}.j2", message)
        text = str(e.value) + repr(e.value)
        assert "SECRET" not in text, text
        assert e.value.__cause__ is None and e.value.__context__ is None


def test_syntax_errors(tmp_path, msg):
    m = make(tmp_path, {"bad.j2": "ok\n{% if %}\n", "filt.j2": "{{ x | no_such_filter }}",
                        "inc.j2": "{% include 'missing.j2' %}", "good.hl7.j2": "{% import 'm.j2' as m %}{{ m.x() }}",
                        "m.j2": "{% macro x() %}X{% endmacro %}"})
    with pytest.raises(TemplateError, match=r"^template bad.j2 line 2: syntax error") as e:
        m.check_template("bad.j2")
    with pytest.raises(TemplateError, match="syntax error: No filter named 'no_such_filter'"):
        m.check_template("filt.j2")
    with pytest.raises(TemplateError, match="template 'missing.j2' not found"):
        m.check_template("inc.j2")
    with pytest.raises(TemplateError, match="^template nope.j2: not found$"):
        m.check_template("nope.j2")
    m.check_template("good.hl7.j2")
    with pytest.raises(TemplateError, match="line 2: syntax error"):
        m.render("bad.j2", msg)


def test_check_expression_and_path_template(tmp_path):
    m = make(tmp_path, {})
    m.check_expression("msg['MSH-9.1'] == 'ADT'")
    m.check_path_template("var/{{ msg['MSH-10'] }}.hl7")
    for bad in ("msg['MSH-9.1'] ==", "msg[", "a b", "{{ x }}", ""):
        with pytest.raises(TemplateError, match="^filter.*: syntax error"):
            m.check_expression(bad)
    with pytest.raises(TemplateError, match="^inline template line 1: syntax error"):
        m.check_path_template("var/{{ msg[ }}")


def test_unknown_time_zone(tmp_path, msg):
    with pytest.raises(ValueError, match="unknown time zone"):
        Mappings(tmp_path, timezone="Mars/Olympus")
    m = make(tmp_path, {})
    with pytest.raises(TemplateError, match="unknown time zone 'Nowhere'"):
        m.render_string("x", msg, timezone="Nowhere")


# filters

ADT_RULE = "msg['MSH-9.1'] == 'ADT' and msg['MSH-9.2'] in ('A01','A04','A08')"


def test_filter_expressions(tmp_path, msg):
    m = make(tmp_path, {})
    rule = m.filter(ADT_RULE)
    assert isinstance(rule, Filter) and rule.expression == ADT_RULE and m.filter(ADT_RULE) is rule
    assert rule(msg) is True
    a03 = hl7.parse(ADT.replace(b"ADT^A01^ADT_A01", b"ADT^A03^ADT_A03"))
    oru = hl7.parse(ADT.replace(b"ADT^A01^ADT_A01", b"ORU^R01^ORU_R01"))
    assert rule(a03) is False and rule(oru) is False
    assert m.filter("msg.segments('OBX') | length > 1")(msg) is True
    assert m.filter("msg['PID-7'] | hl7_datetime == '1980-01-01'")(msg) is True
    assert m.filter("channel.name == 'adt'")(msg, variables={"channel": {"name": "adt"}}) is True
    assert m.filter("msg['PV1-44.1'] | hl7_datetime")(msg) is False


def test_filter_runtime_errors(tmp_path, msg):
    m = make(tmp_path, {})
    for expression, reason in [("nope == 1", "undefined: 'nope' is undefined"),
                               ("msg['PID-5.1'] / 2", "TypeError"),
                               ("msg['NOT A PATH'] == ''", "malformed HL7 path"),
                               ("msg.nope", "TemplateMessage object has no attribute 'nope'"),
                               ("lookup('x', 'no_table')", "code table 'no_table' not found")]:
        with pytest.raises(TemplateError, match=reason) as e:
            m.filter(expression)(msg)
        assert str(e.value).startswith("filter")


def test_concurrent_rendering(tmp_path):
    """Delimiters and time zones belong to each render, whatever runs on other threads."""
    m = make(tmp_path, {"o.hl7.j2": "{{ msg['MSH-1'] }}{{ msg['MSH-2'] }}{{ msg['MSH-1'] }}\n"
                                    "PID{{ msg['MSH-1'] }}{{ msg['PID-5.1'] }}{{ msg['MSH-1'] }}"
                                    "{{ '202601151230' | hl7_datetime }}"})
    plain = with_value("A|B#C")
    odd = hl7.parse(b"MSH#^~\\&#APP#FAC#####ADT^A01#1#P#2.5.1\rPID#1##MRN1##A|B\\F\\C\r")
    expected = {
        ("UTC", 0): b"|^~\\&|\rPID|A\\F\\B#C|2026-01-15T12:30:00+00:00\r",
        ("Asia/Tokyo", 1): b"#^~\\&#\rPID#A|B\\F\\C#2026-01-15T12:30:00+09:00\r",
    }
    barrier = threading.Barrier(4)

    def work(i):
        zone, which = ("UTC", 0) if i % 2 else ("Asia/Tokyo", 1)
        if i < 4:
            barrier.wait()
        return [m.render("o.hl7.j2", (plain, odd)[which], timezone=zone) == expected[zone, which]
                for _ in range(200)]

    with ThreadPoolExecutor(4) as pool:
        assert all(all(r) for r in pool.map(work, range(8)))


def test_templates_are_read_once(tmp_path, msg):
    m = make(tmp_path, {"t.j2": "one"})
    assert m.render("t.j2", msg) == b"one"
    (tmp_path / "t.j2").write_text("two")
    assert m.render("t.j2", msg) == b"one"
    assert Mappings(tmp_path).render("t.j2", msg) == b"two"


def test_sandbox_violation_is_a_template_error():
    assert issubclass(SandboxViolation, TemplateError)
    assert str(TemplateError("plain reason")) == "plain reason"
    assert str(TemplateError("r", "filter", 2)) == "filter line 2: r"

"""The sandbox: templates and filter expressions cannot reach Python internals, files or the stored message."""

from __future__ import annotations

import pytest

from interface_engine import hl7
from interface_engine.channels.templating import Mappings, SandboxViolation, TemplateError

ADT = (b"MSH|^~\\&|ADT_APP|GENERAL_HOSP|ENGINE|HUB|20260101120000||ADT^A01^ADT_A01|MSG00001|P|2.5.1\r"
       b"PID|1||MRN100001^^^GEN^MR||DOE^JANE^Q||19800101|F\r"
       b"PV1|1|I|WARD1^101^A^GEN\r")

ESCAPES = [
    "''.__class__.__mro__",
    "''.__class__.__mro__[1].__subclasses__()",
    "cycler.__init__.__globals__",
    "self._TemplateReference__context",
    "lipsum.__globals__",
    "joiner.__init__.__globals__.os",
    "namespace.__init__.__globals__",
    "msg.__class__",
    "msg._message",
    "msg._message.set('PID-5.1', 'X')",
    "msg.segment('PID')._segment",
    "msg.segment('PID')._message.set('PID-5.1', 'X')",
    "msg.segments()[0]._segment",
    "msg.segments.__self__",
    "msg['_message']",
    "msg.set('PID-5.1', 'X')",
    "msg.segment('PID').set('5.1', 'X')",
    "range(10**9) | list",
    "range(10**9)",
    "'x' * 10**8",
    "[1] * 10**8",
    "2 ** 100000",
    "lookup.__self__",
    "lookup.__func__.__globals__",
    "hl7_set.__globals__",
    "'{0.__class__}'.format(msg)",
    "'{0._message}'.format(msg)",
    "msg | attr('_message')",
    "msg | attr('__class__')",
    "msg.segments() | map(attribute='_segment') | list",
    "msg.segments().append(1)",
    "msg.segments().clear()",
    "{}.update(a=1)",
    "msg.raw.__class__",
    "msg.raw.format_map.__self__",
    "channel.__class__.__subclasses__()",
    "channel.clear()",
    "namespace(a=1)._Namespace__attrs",
    "namespace(a=1).__class__",
    "fhir._tables",
    "fhir._found",
    "fhir.__class__",
    "msg.segment('PID')._fields",
]


@pytest.fixture
def mappings(tmp_path) -> Mappings:
    (tmp_path / "inner").mkdir()
    (tmp_path / "outside.txt").write_text("OUTSIDE-MARKER")
    mappings = tmp_path / "mappings"
    mappings.mkdir()
    (mappings / "macros.j2").write_text("{% macro x() %}X{% endmacro %}")
    (mappings / "link.j2").symlink_to(tmp_path / "outside.txt")
    (mappings / "tables").mkdir()
    (mappings / "tables" / "link.csv").symlink_to(tmp_path / "outside.txt")
    return Mappings(mappings)


@pytest.mark.parametrize("expression", ESCAPES)
@pytest.mark.parametrize("kind", ["text", "hl7", "json", "xml", "filter"])
def test_escapes_are_refused(mappings, expression, kind):
    msg = hl7.parse(ADT)
    channel = {"name": "adt", "timezone": "UTC"}
    with pytest.raises(TemplateError) as e:
        if kind == "filter":
            mappings.filter(expression)(msg, variables={"channel": channel})
        else:
            mappings.render_string("{{ " + expression + " }}", msg, variables={"channel": channel}) \
                if kind == "text" else _render(mappings, expression, kind, msg, channel)
    assert "OUTSIDE" not in str(e.value)
    assert msg.to_bytes() == ADT
    assert channel == {"name": "adt", "timezone": "UTC"}


def _render(mappings: Mappings, expression: str, kind: str, msg, channel):
    name = f"probe.{kind}.j2"
    (mappings.directory / name).write_text("{{ " + expression + " }}")
    return Mappings(mappings.directory).render(name, msg, variables={"channel": channel})


@pytest.mark.parametrize("expression", [
    "''.__class__", "cycler.__init__.__globals__", "msg._message", "range(10**9) | list", "'x' * 10**8",
    "2 ** 100000", "msg | attr('_message')", "msg.segments().append(1)",
    "fhir._values(msg, 'PID-3', 'x')", "msg.segment('PID')._read",
])
def test_unsafe_access_is_a_sandbox_violation(mappings, expression):
    with pytest.raises(SandboxViolation):
        mappings.render_string("{{ " + expression + " }}", hl7.parse(ADT))
    with pytest.raises(SandboxViolation):
        mappings.filter(expression)(hl7.parse(ADT))


@pytest.mark.parametrize("source", [
    "{% import '../../etc/passwd' as y %}",
    "{% import '../outside.txt' as y %}",
    "{% include '/etc/passwd' %}",
    "{% include '../outside.txt' %}",
    "{% include 'inner/../../outside.txt' %}",
    "{% include 'link.j2' %}",
    "{% extends '../outside.txt' %}",
    "{% from '/etc/passwd' import x %}",
    "{{ 'x' | lookup('link') }}",
    "{{ 'x' | lookup('../outside') }}",
    "{{ 'x' | lookup('/etc/passwd') }}",
])
def test_files_outside_the_mappings_directory_are_unreachable(mappings, source):
    with pytest.raises(TemplateError) as e:
        mappings.render_string(source, hl7.parse(ADT))
    assert "OUTSIDE" not in str(e.value) and "root:" not in str(e.value)


def test_check_template_refuses_names_outside(mappings):
    for name in ("../outside.txt", "/etc/passwd", "link.j2"):
        with pytest.raises(SandboxViolation):
            mappings.check_template(name)


def test_allowed_things_still_work(mappings):
    msg = hl7.parse(ADT)
    out = mappings.render_string(
        "{% import 'macros.j2' as m %}{{ m.x() }} {{ range(3) | list }} {{ 'ab' * 2 }} {{ 2 ** 10 }} "
        "{% set ns = namespace(n=0) %}{% for s in msg %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }} "
        "{{ '{0}-{1}'.format(msg['PID-5.1'], msg['PID-5.2']) }} {{ msg.segments() | map(attribute='name') | join }}",
        msg)
    assert out == "X [0, 1, 2] abab 1024 3 DOE-JANE MSHPIDPV1"


def test_dict_keys_and_methods_read_as_jinja_reads_them(mappings):
    """A dict's key read as an attribute (made.resources), its methods, a missing key: Jinja's rules."""
    msg = hl7.parse(ADT)
    out = mappings.render_string("{% set d = {'a': 1, 'items': 2} %}{{ d.a }} {{ d['items'] }} "
                                 "{{ d.items() | list | length }} {{ d.b is defined }}", msg)
    assert out == "1 2 2 False"
    with pytest.raises(TemplateError) as e:
        mappings.render_string("{{ {'a': 1}.b + 1 }}", msg)
    assert "dict object has no attribute 'b'" in str(e.value)


def test_sandbox_messages_do_not_quote_item_keys(mappings):
    msg = hl7.parse(ADT.replace(b"DOE^", b"_SECRET^"))
    for source in ("{{ ''[msg['PID-5.1']] }}", "{{ channel[msg['PID-5.1']] }}", "{{ msg | attr(msg['PID-5.1']) }}"):
        with pytest.raises(TemplateError) as e:
            mappings.render_string(source, msg, variables={"channel": {}})
        assert "SECRET" not in str(e.value)


def test_a_namespace_reads_as_jinja_reads_it(mappings):
    """ns.x from the namespace's own values: a missing or undefined one is an error naming it, and a
    str.format kept in one is still the sandbox's."""
    msg = hl7.parse(ADT)
    assert mappings.render_string("{% set ns = namespace(a=[1], b=none) %}{% set ns.a = ns.a + [2] %}"
                                  "{{ ns.a }} {{ ns.b }}", msg) == "[1, 2]"
    for source in ("{% set ns = namespace(a=1) %}{{ ns.b }}", "{% set ns = namespace(a=nothing) %}{{ ns.a }}"):
        with pytest.raises(TemplateError, match="undefined"):
            mappings.render_string(source, msg)
    with pytest.raises(SandboxViolation):
        mappings.render_string("{% set ns = namespace(f=f) %}{{ ns.f(msg) }}", msg,
                               variables={"f": "{0.__class__.__mro__}".format})

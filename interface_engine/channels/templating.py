"""Channel filters and mappings: Jinja expressions and templates run in Jinja's sandbox.

Analysts write filters and mappings; they are data, not programs. Everything
runs in ``jinja2.sandbox.ImmutableSandboxedEnvironment``: no private or dunder
attribute is reachable, built-in lists and dicts cannot be changed, templates
load only from the mappings directory, ``range`` is capped at 100 000 items and
``*``/``**`` at sizes that cannot exhaust memory. Trying any of that raises
SandboxViolation. Rendering has no time limit.

What templates and filter expressions see
-----------------------------------------
``msg``, a read-only view of the message (there is no ``msg.set``):

- ``msg['PID-5.1']``: a leaf comes decoded, a composite (``msg['PID-5']``) as the
  message's encoded text; a missing part reads as ''. Paths: ``PID-3``,
  ``PID-5[2].1``, ``OBX[3]-5``, ``PID-3.4.2``.
- ``msg.segments('OBX')`` (every line without a name), ``msg.segment('PV1')``
  (none if absent: test it with ``{% if %}``, or read ``msg['PV1-3.1']``, which
  gives '' instead), ``{% for seg in msg %}``.
- ``seg.name``, ``seg['5.1']`` (or ``seg['OBX-5.1']``), ``seg.raw``; ``{{ seg }}`` is its text.
- ``msg.raw`` (and ``{{ msg }}``): the message as encoded HL7 text, segments ended by CR.

``channel``: a dict with ``name`` and ``timezone``, passed by the caller in
``variables`` like every other variable. An undefined variable is an error
(StrictUndefined), so a typo cannot silently render as nothing; test optional
ones with ``is defined`` or ``| default('')``. A value of none renders as ''.
Blocks are trimmed (``trim_blocks``, ``lstrip_blocks``): a line holding only a
``{% %}`` tag leaves nothing behind.

Filter example: ``msg['MSH-9.1'] == 'ADT' and msg['MSH-9.2'] in ('A01', 'A04', 'A08')``.

Output kinds (by template name, see ``output_kind_for``)
--------------------------------------------------------
- hl7 (``*.hl7.j2``, ``*.hl7``): every ``{{ }}`` value is HL7-escaped with the
  message's delimiters, so no value can add a field, component, repetition,
  segment or MLLP frame. Only already-encoded HL7 passes as is: a segment, the
  message, a composite read from it, an ``hl7_*`` helper result, a macro's
  output. Anything built with ``~``, ``+``, ``|join`` or a ``{% set %}`` block
  is plain text again and is escaped: write structure as template text
  (``{{ seg }}|X``, not ``{{ seg ~ '|X' }}``). Lines end with CR, blank lines
  are dropped, the output is encoded in the message's charset. An MSH, BHS or
  FHS line in the output must declare the message's own delimiters (the values
  were escaped for those): copy them, ``MSH|^~\\&|`` for most messages.
- json (``*.json.j2``): insert every value with ``| tojson`` (``"family": {{
  msg['PID-5.1'] | tojson }}``). A value inserted without it is escaped as JSON
  string content, so it cannot close a string. The output must parse as JSON
  (no NaN, no duplicate keys) and is returned compact, UTF-8, key order kept.
  ``tojson`` is Jinja's own: keys of a dict it serialises are sorted.
  ``render_value`` gives the same output as Python values: when the whole output is
  one ``tojson`` value, that value as the template built it (for a fhir destination,
  whose Bundle step checks and sorts it in its own pass).
- xml (``*.xml.j2``): ``{{ }}`` values are XML-escaped; the output must be
  well-formed XML without a DOCTYPE (so no entities, no external reads) and is
  returned as UTF-8 with an XML declaration. Never put ``| safe`` on a message value.
- text (anything else): as rendered, UTF-8. For CSV use ``csv_row``.

Helpers (each works as a function and as a filter)
--------------------------------------------------
- ``hl7_set(msg, path, value)``: a copy of the message with one leaf value
  written (escaped); chain them and ``hl7_drop``:
  ``{{ msg | hl7_set('MSH-5', 'LAB') | hl7_set('MSH-6', 'LABFAC') | hl7_drop('Z*') }}``.
  Takes ``msg`` or another ``hl7_*`` result; does not create segments.
- ``hl7_drop(msg, *patterns)``: a copy without the segments whose id matches a
  glob: ``msg | hl7_drop('Z*', 'NTE')``. MSH cannot be dropped.
- ``hl7_datetime(value, precision=none)``: HL7 date/time to ISO 8601 at the
  precision given: ``'2023'`` → ``2023``, ``'202301'`` → ``2023-01``,
  ``'20230101'`` → ``2023-01-01``, ``'202301011230'`` → ``2023-01-01T12:30:00+01:00``
  (channel time zone Europe/Paris). A time always gets seconds (FHIR dateTime
  needs them) and an offset: its own, else the channel time zone's at that
  local time. A date never gets a zone. ``precision`` ('year', 'month', 'day',
  'second') cuts it shorter: ``msg['PID-7'] | hl7_datetime('day')``. A value
  that is not a valid HL7 date/time gives '' (a mapping copes with bad input).
  Read a TS field's first component (``PV1-44.1``).
- ``hl7_instant(value)``: full precision with offset (FHIR instant), '' unless
  the value has seconds: ``'20230101123045.12'`` → ``2023-01-01T12:30:45.12+01:00``.
- ``lookup(code, table, default=none, column='display')``: a code table from
  ``tables/<table>.csv`` (UTF-8, header line ``code,display`` and any more
  columns; cells are trimmed): ``msg['PID-8'] | lookup('sex')``,
  ``msg['PID-8'] | lookup('sex', column='system')``. A missing code gives
  ``default`` if given, else ``UNMAPPED:<table>:<code>``; a missing table is an error.
- ``uuid5(*parts)``: a deterministic id from the parts joined with ``|``:
  ``uuid5('Patient', msg['PID-3.4'], msg['PID-3.1'])`` is the same id forever.
- ``tojson``: see the json kind.
- ``fhir``: a namespace, not a filter: HL7 v2 datatypes as FHIR ones
  (``fhir.names(msg, 'PID-5') | tojson``), see interface_engine/fhir/datatypes.py;
  and segment maps that make whole resources (``fhir.patient(pid, pd1)``), see
  interface_engine/fhir/segments.py.
- ``csv_row(*values)``: one RFC 4180 line, no line end, quoting where needed
  (CR and LF stay inside quotes): ``{{ csv_row(msg['PID-3.1'], msg['PID-5.1']) }}``
  or ``{{ [a, b] | csv_row }}``.
- ``b64encode(text, encoding='utf-8')``: base64 of a text, e.g. for a FHIR
  Attachment's ``data``: ``{{ note | b64encode | tojson }}``.
- ``hl7_xml(msg)``: the message in the style of the HL7 v2 XML encoding, for xml
  templates: an element per segment, ``PID.3`` per field repetition,
  ``PID.3.1`` components, ``PID.3.1.1`` sub-components, empty parts left out,
  root element named after MSH-9.3 (else MSH-9.1_MSH-9.2). It departs from the
  official v2.xml schema: component elements are named by position in the
  field, not by data type (``PID.3.1``, not ``CX.1``), because no data type
  tables are loaded; segments are not nested in groups; there is no namespace;
  lines without a segment id are left out.

Errors
------
A failing filter or template raises TemplateError (SandboxViolation for the
sandbox): its text names the template (or ``filter``/``inline template``), the
line when known and what went wrong, never message content: a Python error is
reported by its type alone, since its text may quote values.

Templates and code tables are read on first use and kept; build a new
Mappings to pick up edits. One Mappings may render on several threads at once.
"""

from __future__ import annotations

import csv
import io
import json
import re
import threading
from contextvars import ContextVar
from datetime import UTC, tzinfo
from pathlib import Path
from types import BuiltinMethodType, MethodType
from typing import NamedTuple
from zoneinfo import ZoneInfo

from jinja2 import BaseLoader, StrictUndefined, TemplateNotFound, TemplateSyntaxError, UndefinedError, meta
from jinja2 import pass_context, pass_eval_context
from jinja2.exceptions import SecurityError
from jinja2.filters import do_tojson
from jinja2.runtime import Macro, Undefined
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment, safe_range
from jinja2.utils import Namespace, missing
from lxml import etree

from interface_engine import hl7
from interface_engine.fhir.segments import FHIRHelpers
from interface_engine.hl7.escape import delimiters

from .helpers import (
    Encoded, HelperError, TemplateMessage, TemplateSegment, b64encode, csv_row, hl7_drop, hl7_set, hl7_to_iso, hl7_xml, uuid5,
)

OUTPUT_KINDS = ("hl7", "json", "xml", "text")

_FILTER = "filter"
_INLINE = "inline template"
_MAX_REPEAT = 1_000_000
_MAX_POWER_BITS = 4096
_HEADER_IDS = ("MSH", "FHS", "BHS")
_XML_DECLARATION = re.compile(r"\A\s*<\?xml\s[^>]*\?>")
_TABLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)*")


class TemplateError(Exception):
    """A filter or template failed.

    str() names the template (or 'filter'), the line if known, and what went
    wrong; never message content.
    """

    def __init__(self, reason: str, template: str | None = None, line: int | None = None):
        super().__init__(reason, template, line)
        self.reason = reason
        self.template = template
        self.line = line

    def __str__(self) -> str:
        if not self.template:
            return self.reason
        where = self.template if self.template in (_FILTER, _INLINE) else f"template {self.template}"
        if self.line:
            where += f" line {self.line}"
        return f"{where}: {self.reason}"


class SandboxViolation(TemplateError):
    """An attempt to reach what the sandbox keeps out: private attributes, unsafe methods, files."""


class _Forbidden(SecurityError):
    """Raised by this module's sandbox checks; its text names no message content."""


def output_kind_for(template_name: str) -> str:
    """The output kind a template name implies: by extension, 'text' when none matches."""
    name = template_name.lower()
    if name.endswith((".hl7.j2", ".hl7")):
        return "hl7"
    if name.endswith(".json.j2"):
        return "json"
    if name.endswith(".xml.j2"):
        return "xml"
    return "text"


class _State(NamedTuple):
    delimiters: hl7.Delimiters | None
    zone: tzinfo
    values: list | None = None  # render_value: the tojson values output so far


#: What helpers and the hl7 escaping need of the render under way; per thread,
#: so a template cannot shadow it with a variable.
_STATE: ContextVar[_State] = ContextVar("template_render_state")
_NO_RENDER = _State(None, UTC)  # checks compile only


class _JSONText(str):
    """A ``tojson`` result: complete JSON, inserted as is in json templates."""

    __slots__ = ()


@pass_eval_context
def _tojson(eval_ctx, value, indent=None) -> _JSONText:
    return _JSONText(do_tojson(eval_ctx, value, indent))


@pass_eval_context  # never at compile time: the delimiters are the render's
def _hl7_finalize(eval_ctx, value):
    if isinstance(value, Encoded):
        return value
    if isinstance(value, (TemplateMessage, TemplateSegment)):
        return value.raw
    if value is None:
        return ""
    return _STATE.get().delimiters.escape(str(value))


def _json_finalize(value):
    if isinstance(value, _JSONText):
        return value
    if value is None:
        return ""
    return json.dumps(str(value), ensure_ascii=False)[1:-1]


class _Deferred:
    """A ``tojson`` result in ``render_value``: the value, written as JSON text only if it is read as text.

    Output as is, it becomes a token standing for the value; used in an
    expression (``~``, ``length``, a comparison, a str method) it is the JSON
    text ``tojson`` gives.
    """

    __slots__ = ("value", "_eval_ctx", "_text")

    def __init__(self, eval_ctx, value):
        self.value = value
        self._eval_ctx = eval_ctx
        self._text: str | None = None

    def __str__(self) -> str:
        if self._text is None:
            self._text = do_tojson(self._eval_ctx, self.value)
        return self._text

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(str(self), name)

    def __len__(self) -> int:
        return len(str(self))

    def __iter__(self):
        return iter(str(self))

    def __contains__(self, item) -> bool:
        return item in str(self)

    def __getitem__(self, key):
        return str(self)[key]

    def __eq__(self, other) -> bool:
        return str(self) == (str(other) if isinstance(other, _Deferred) else other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __add__(self, other):
        return str(self) + (str(other) if isinstance(other, _Deferred) else other)

    def __radd__(self, other):
        return other + str(self)


@pass_context  # never folded at compile time: the value goes to the render under way
def _deferred_tojson(context, value, indent=None):
    if indent is not None:
        return _JSONText(do_tojson(context.eval_ctx, value, indent))
    return _Deferred(context.eval_ctx, value)


#: What ``render_value``'s output is when it is one ``tojson`` value and nothing else (no
#: JSON text can hold a NUL character).
_VALUE_TOKEN = "\x00tojson\x00"


def _value_finalize(value):
    if isinstance(value, _Deferred):
        _STATE.get().values.append(value.value)
        return _VALUE_TOKEN
    return _json_finalize(value)


def _plain_finalize(value):
    return "" if value is None else value


@pass_context  # never folded at compile time: the zone is the render's
def _hl7_datetime(context, value, precision=None) -> str:
    return hl7_to_iso(value, _STATE.get().zone, precision)


@pass_context
def _hl7_instant(context, value) -> str:
    return hl7_to_iso(value, _STATE.get().zone, instant=True)


def _range(*args) -> range:
    try:
        return safe_range(*args)
    except OverflowError:
        pass
    raise _Forbidden(f"range() is limited to {MAX_RANGE} items")


def _multiply(a, b):
    for seq, n in ((a, b), (b, a)):
        if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > _MAX_REPEAT:
            raise _Forbidden(f"repeating with * is limited to {_MAX_REPEAT} items")
    return a * b


def _power(a, b):
    if isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1 and a.bit_length() * b > _MAX_POWER_BITS:
        raise _Forbidden(f"** is limited to results of {_MAX_POWER_BITS} bits")
    return a ** b


class _Undefined(StrictUndefined):
    """Strict; its messages name variables, attributes and types, never an item key (which may be message content)."""

    __slots__ = ()

    @property
    def _undefined_message(self) -> str:
        if self._undefined_hint:
            return self._undefined_hint
        if self._undefined_obj is missing:
            return f"{self._undefined_name!r} is undefined"
        return f"{type(self._undefined_obj).__name__} object has no item of that name"


_MAX_VERDICTS = 4096
_DICT_ATTRIBUTES = frozenset(dir(dict))
_MISSING = object()
#: The engine's own helpers and message views. Like a Jinja namespace, their public attributes are
#: what the sandbox always allows: Jinja's checks refuse only names starting with '_' on them (none
#: is a function, a type or a known mutable container).
_OWN_HELPERS = frozenset({FHIRHelpers, TemplateMessage, TemplateSegment})


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox with this module's limits; ``fragment`` marks a macro's output as already encoded."""

    intercepted_binops = frozenset({"*", "**"})

    def __init__(self, loader: BaseLoader, finalize, *, fragment: type[str] | None = None, autoescape=False):
        super().__init__(loader=loader, finalize=finalize, autoescape=autoescape, undefined=_Undefined,
                         trim_blocks=True, lstrip_blocks=True, auto_reload=False)
        self.fragment = fragment
        self._verdicts: dict[tuple[type, str], bool] = {}
        self.globals["range"] = _range
        self.binop_table["*"] = _multiply
        self.binop_table["**"] = _power
        self.filters["tojson"] = _tojson

    def make_globals(self, d):
        """A template's globals as one dict (Jinja's is a ChainMap over the environment's).

        Every render copies them into its context, and a ChainMap is read key by key in
        Python; the environment's globals are all set before the first template loads.
        """
        return {**self.globals, **(d or {})}

    def unsafe_undefined(self, obj, attribute):
        raise _Forbidden(f"access to {attribute!r} of a {type(obj).__name__} object is not allowed")

    def is_safe_attribute(self, obj, attr, value):
        """The sandbox's verdict, remembered per (type, name).

        Jinja's checks (private names, function and frame internals, methods that
        mutate known containers) look only at the object's type and the attribute's
        name, so the verdict for one object holds for every object of its type. A
        FHIR mapping reads a few hundred attributes per message; deciding each anew
        was a third of its rendering time.
        """
        key = (type(obj), attr)
        verdict = self._verdicts.get(key)
        if verdict is None:
            if len(self._verdicts) > _MAX_VERDICTS:
                self._verdicts.clear()
            verdict = self._verdicts[key] = super().is_safe_attribute(obj, attr, value)
        return verdict

    def getattr(self, obj, attribute):
        if type(obj) is dict and attribute not in _DICT_ATTRIBUTES:
            # What Jinja does for a key that is no dict method (``made.resources``), without the
            # AttributeError it raises and catches first; a missing key takes the usual path.
            value = obj.get(attribute, _MISSING)
            if value is not _MISSING and not isinstance(value, Undefined):
                return value
        elif type(obj) is Namespace and attribute[:1] != "_":
            # ``ns.resources``: the namespace's own dict, read without its two Python-level
            # __getattribute__ calls; Jinja's verdict is known (see _OWN_HELPERS).
            try:
                value = object.__getattribute__(obj, "_Namespace__attrs").get(attribute, _MISSING)
            except AttributeError:  # a Jinja that keeps a namespace's values otherwise
                value = getattr(obj, attribute, _MISSING)
            if value is not _MISSING and type(value) is not BuiltinMethodType and not isinstance(value, Undefined):
                return value
        elif type(obj) in _OWN_HELPERS and attribute[:1] != "_":
            # ``fhir.patient``, ``msg.segment``: Jinja's verdict is known (see _OWN_HELPERS); a
            # missing attribute, an undefined value or a builtin method (which Jinja checks for
            # str.format) take the usual path.
            value = getattr(obj, attribute, _MISSING)
            if value is not _MISSING and type(value) is not BuiltinMethodType and not isinstance(value, Undefined):
                return value
        try:
            value = super().getattr(obj, attribute)
        except HelperError:  # a message view read the unknown attribute as a path
            value = self.undefined()
        if isinstance(value, Undefined):
            return self.undefined(f"{type(obj).__name__} object has no attribute {attribute!r}",
                                  obj=obj, name=attribute)
        return value

    def getitem(self, obj, argument):
        try:
            return super().getitem(obj, argument)
        except _Forbidden:  # the key may be message content: do not echo it
            pass
        except HelperError:  # not a path: an attribute, as map(attribute='name') asks for
            if not (isinstance(argument, str) and hasattr(type(obj), argument)):
                raise
            return self.getattr(obj, argument)
        raise _Forbidden(f"access to an unsafe item of a {type(obj).__name__} object is not allowed")

    def call(self, context, obj, /, *args, **kwargs):
        kind = type(obj)
        if (kind is MethodType and type(obj.__self__) in _OWN_HELPERS) or obj is Namespace or obj is dict:
            # The engine's own helpers and message views, ``namespace()`` and ``dict()``: nothing
            # for the sandbox to refuse and no context to pass, so called as Context.call would
            # call them, without its checks (which, for a class, raise and catch AttributeError
            # three times: some 20,000 instructions a namespace()).
            kwargs.pop("_block_vars", None)
            kwargs.pop("_loop_vars", None)
            try:
                return obj(*args, **kwargs)
            except StopIteration:
                return self.undefined("value was undefined because a callable raised a StopIteration exception")
        rv = super().call(context, obj, *args, **kwargs)
        # A macro's output was rendered here, its values already escaped.
        if self.fragment is not None and isinstance(obj, Macro):
            return self.fragment(rv)
        return rv


class _Loader(BaseLoader):
    """Templates from the mappings directory only: no '..', no absolute name, no symlink out."""

    def __init__(self, root: Path):
        self.root = root

    def get_source(self, environment, template: str):
        if template.startswith("/") or "\\" in template or ".." in template.split("/"):
            raise _Forbidden("template names are relative to the mappings directory and cannot leave it")
        path = _inside(self.root, self.root.joinpath(*template.split("/")))
        if not path.is_file():
            raise TemplateNotFound(template)
        try:
            source = path.read_text("utf-8")
        except UnicodeDecodeError:
            source = None
        if source is None:
            raise TemplateError("not UTF-8 text", template)
        return source, template, None  # the name as file name: tracebacks name templates, not paths


def _inside(root: Path, path: Path) -> Path:
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise _Forbidden("a file outside the mappings directory cannot be read")
    return resolved


def _where(exc: BaseException, label: str) -> tuple[str, int | None]:
    """The innermost template frame of the traceback: (template name, line)."""
    template, line = label, None
    tb = exc.__traceback__
    while tb is not None:
        f_globals = tb.tb_frame.f_globals
        if "__jinja_exception__" in f_globals:  # a frame rewritten by Jinja to point at the template
            template, line = f_globals["__file__"], tb.tb_lineno
        elif "__jinja_template__" in f_globals:  # compiled code not rewritten (expressions)
            t = f_globals["__jinja_template__"]
            template, line = t.name or label, t.get_corresponding_lineno(tb.tb_lineno)
        tb = tb.tb_next
    return (label if template == "<template>" else template), line


def _converted(exc: Exception, label: str) -> TemplateError:
    """A TemplateError for ``exc`` whose text holds no message content."""
    template, line = _where(exc, label)
    if isinstance(exc, TemplateError):
        return type(exc)(exc.reason, exc.template or template, exc.line or line)
    if isinstance(exc, HelperError):
        return TemplateError(str(exc), template, line)
    if isinstance(exc, TemplateSyntaxError):
        return TemplateError(f"syntax error: {exc.message}", exc.name or label, exc.lineno)
    if isinstance(exc, TemplateNotFound):
        return TemplateError("not found" if exc.name == template else f"template {exc.name!r} not found",
                             template, line)
    if isinstance(exc, SecurityError):
        reason = str(exc) if isinstance(exc, _Forbidden) else "the sandbox refused an operation"
        return SandboxViolation(reason, template, line)
    if isinstance(exc, UndefinedError):
        return TemplateError(f"undefined: {exc.message}", template, line)
    return TemplateError(f"{type(exc).__name__} (details withheld: they may quote message values)",
                         template, line)


def _zone(name: str) -> tzinfo:
    try:
        return ZoneInfo(name)
    except (KeyError, ValueError, TypeError, OSError):
        pass
    raise ValueError(f"unknown time zone {name!r} (an IANA name such as Europe/Paris)")


class RenderedJSON(NamedTuple):
    """A json template's output as Python values. ``as_built``: the template's own dicts and lists,
    not yet checked to be JSON, keys in the order the template gave them (``tojson`` would sort them);
    otherwise parsed from checked JSON text, keys in the text's order."""

    value: object
    as_built: bool


class Filter:
    """A compiled filter expression; calling it gives the expression's truth for a message."""

    __slots__ = ("expression", "_compiled", "_mappings")

    def __init__(self, expression: str, compiled, mappings: Mappings):
        self.expression = expression
        self._compiled = compiled
        self._mappings = mappings

    def __repr__(self) -> str:
        return f"<Filter {self.expression!r}>"

    def __call__(self, msg: hl7.Message, *, timezone: str | None = None, variables: dict | None = None) -> bool:
        context = self._mappings._context(msg, variables)
        return self._mappings._guard(_FILTER, lambda: bool(self._compiled(context)),
                                     self._mappings._state(msg, timezone, _FILTER))


class Mappings:
    """Filters and templates of one mappings directory, with its code tables."""

    def __init__(self, directory: str | Path, *, timezone: str = "UTC"):
        """Templates from `directory`, code tables from `directory/tables/`. Loads lazily; thread-safe for rendering
        (rendering happens on a worker thread while the reactor may check other templates)."""
        self.directory = Path(directory)
        self.timezone = timezone
        _zone(timezone)
        self._root = self.directory.resolve()
        self._lock = threading.Lock()
        self._tables: dict[str, tuple[tuple[str, ...], dict[str, dict[str, str]]]] = {}
        self._filters: dict[str, Filter] = {}
        self._inline: dict = {}
        loader = _Loader(self._root)
        self._envs = {
            "hl7": _Sandbox(loader, _hl7_finalize, fragment=Encoded),
            "json": _Sandbox(loader, _json_finalize, fragment=_JSONText),
            "value": _Sandbox(loader, _value_finalize, fragment=_JSONText),
            "xml": _Sandbox(loader, _plain_finalize, autoescape=True),
            "text": _Sandbox(loader, _plain_finalize),
        }
        helpers = {
            "hl7_set": hl7_set, "hl7_drop": hl7_drop, "hl7_xml": hl7_xml,
            "hl7_datetime": _hl7_datetime, "hl7_instant": _hl7_instant,
            "lookup": self._lookup, "uuid5": uuid5, "csv_row": csv_row, "b64encode": b64encode,
        }
        fhir = FHIRHelpers(self._table, lambda: _STATE.get().zone)
        for env in self._envs.values():
            env.globals.update(helpers)
            env.filters.update(helpers)
            env.globals["fhir"] = fhir
        self._envs["value"].filters["tojson"] = _deferred_tojson

    def __repr__(self) -> str:
        return f"<Mappings {self.directory.name!r}>"

    # checks, for `channels validate`

    def check_template(self, name: str) -> None:
        """Raise TemplateError if the template, or one it names in include/import/extends, is missing or invalid."""
        env = self._envs[output_kind_for(name)]

        def check(name: str, seen: set[str]) -> None:
            seen.add(name)
            env.get_template(name)
            for ref in meta.find_referenced_templates(env.parse(env.loader.get_source(env, name)[0])):
                if ref is not None and ref not in seen:
                    check(ref, seen)

        self._guard(name, lambda: check(name, set()))

    def check_expression(self, expression: str) -> None:
        """Raise TemplateError if ``expression`` is not a valid Jinja expression."""
        self.filter(expression)

    def check_path_template(self, source: str) -> None:
        """Raise TemplateError if ``source`` is not a valid inline template."""
        self._guard(_INLINE, lambda: self._inline_template(source))

    # use

    def filter(self, expression: str) -> Filter:
        """The compiled filter for ``expression``, compiled once and kept."""
        found = self._filters.get(expression)
        if found is None:
            compiled = self._guard(_FILTER, lambda: self._envs["text"].compile_expression(
                expression, undefined_to_none=False))
            found = self._filters.setdefault(expression, Filter(expression, compiled, self))
        return found

    def render(self, name: str, msg: hl7.Message, *, kind: str | None = None, timezone: str | None = None,
               variables: dict | None = None) -> bytes:
        """Render template ``name`` for ``msg`` as ``kind`` (default: by its name); see the module docstring."""
        kind = kind or output_kind_for(name)
        if kind not in OUTPUT_KINDS:
            raise TemplateError(f"unknown output kind {kind!r}; one of {', '.join(OUTPUT_KINDS)}", name)
        env = self._envs[kind]
        context = self._context(msg, variables)
        text = self._guard(name, lambda: env.get_template(name).render(context),
                           self._state(msg, timezone, name))
        if kind == "hl7":
            return _hl7_output(text, msg, name)
        if kind == "json":
            return _json_output(text, name)
        if kind == "xml":
            return _xml_output(text, name)
        return _utf8(text, name)

    def render_value(self, name: str, msg: hl7.Message, *, timezone: str | None = None,
                     variables: dict | None = None) -> RenderedJSON:
        """What the json render of ``name`` gives, as Python values rather than text (a fhir destination's step).

        When the template's whole output is one ``tojson`` value (the sample FHIR
        templates end with ``{{ {"resources": ns.resources} | tojson }}``) that value
        is returned as it is, not written as text and parsed again: the caller checks
        it is JSON (no NaN, text keys) and sorts keys as ``tojson`` would. Any other
        output is rendered again as ``kind="json"`` and parsed, with that kind's checks.
        """
        context = self._context(msg, variables)
        state = self._state(msg, timezone, name)._replace(values=[])
        text = self._guard(name, lambda: self._envs["value"].get_template(name).render(context), state)
        if len(state.values) == 1 and text.strip() == _VALUE_TOKEN:
            return RenderedJSON(state.values[0], True)
        return RenderedJSON(json.loads(self.render(name, msg, kind="json", timezone=timezone,
                                                   variables=variables)), False)

    def render_string(self, source: str, msg: hl7.Message, *, timezone: str | None = None,
                      variables: dict | None = None) -> str:
        """Render a small inline template (a file path, say) as text, stripped; values are not sanitised."""
        context = self._context(msg, variables)
        return self._guard(_INLINE, lambda: self._inline_template(source).render(context),
                           self._state(msg, timezone, _INLINE)).strip()

    # internals

    def _inline_template(self, source: str):
        found = self._inline.get(source)
        if found is None:
            found = self._inline.setdefault(source, self._envs["text"].from_string(source))
        return found

    @staticmethod
    def _context(msg: hl7.Message, variables: dict | None) -> dict:
        return {**(variables or {}), "msg": TemplateMessage(msg)}

    def _state(self, msg: hl7.Message, timezone: str | None, label: str) -> _State:
        try:
            zone = _zone(timezone or self.timezone)
        except ValueError as e:
            reason = str(e)
        else:
            return _State(msg.delimiters, zone)
        raise TemplateError(reason, label)

    def _guard(self, label: str, call, state: _State | None = None):
        """Run ``call`` with ``state`` set; any failure becomes a TemplateError without message content.

        The TemplateError is raised outside the ``except`` so it carries no
        chained exception whose text could quote values.
        """
        token = _STATE.set(state or _NO_RENDER)
        try:
            return call()
        except Exception as e:
            error = _converted(e, label)
        finally:
            _STATE.reset(token)
        raise error

    def _lookup(self, code, table, default=None, column="display") -> str:
        header, codes = self._table(table)
        if column not in header:
            raise HelperError(f"lookup: code table {table!r} has no such column; it has {', '.join(header)}")
        key = "" if code is None else str(code).strip()
        record = codes.get(key)
        if record is None:
            return default if default is not None else f"UNMAPPED:{table}:{key}"
        return record[column]

    def _table(self, table):
        found = self._tables.get(table)
        if found is None:
            with self._lock:
                found = self._tables.get(table)
                if found is None:
                    found = self._tables[table] = self._load_table(table)
        return found

    def _load_table(self, table) -> tuple[tuple[str, ...], dict[str, dict[str, str]]]:
        if not isinstance(table, str) or not _TABLE_NAME.fullmatch(table):
            raise HelperError("lookup: a table name is letters, digits, '_', '-' and '.'")
        path = _inside(self._root, self._root / "tables" / f"{table}.csv")
        try:
            text = path.read_text("utf-8-sig")
        except UnicodeDecodeError:
            raise HelperError(f"lookup: code table {table!r} is not UTF-8") from None
        except OSError:
            raise HelperError(f"lookup: code table {table!r} not found") from None
        reader = csv.reader(io.StringIO(text, newline=""))
        header = tuple(h.strip() for h in next(reader, ()))
        if "code" not in header:
            raise HelperError(f"lookup: code table {table!r} has no 'code' column in its header line")
        codes: dict[str, dict[str, str]] = {}
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            record = dict(zip(header, [c.strip() for c in row] + [""] * (len(header) - len(row))))
            if record["code"] in codes:
                raise HelperError(f"lookup: code table {table!r} repeats a code on line {reader.line_num}")
            codes[record["code"]] = record
        return header, codes


def _utf8(text: str, name: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        pass
    raise TemplateError("the output is not valid Unicode", name)


def _hl7_output(text: str, msg: hl7.Message, name: str) -> bytes:
    lines = [line for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n") if line.strip()]
    d = msg.delimiters
    wanted = (d.field_sep, d.component_sep, d.repetition_sep, d.escape_char, d.subcomponent_sep)
    for line in lines:
        if "\x0b" in line or "\x1c" in line:
            raise TemplateError("the template text holds 0x0B or 0x1C, MLLP framing characters", name)
        if line[:3] in _HEADER_IDS and len(line) > 3:
            fs = line[3]
            got = delimiters(fs, line[4:].split(fs, 1)[0])
            if (got.field_sep, got.component_sep, got.repetition_sep, got.escape_char,
                    got.subcomponent_sep) != wanted:
                raise TemplateError(
                    f"the output's {line[:3]} declares other delimiters than the message's "
                    f"{d.field_sep}{d.encoding_chars}, which its values were escaped for", name)
    out = "\r".join(lines) + "\r" if lines else ""
    try:
        return hl7.encode(out, msg.encoding)
    except UnicodeEncodeError:
        pass
    raise TemplateError(f"the output has characters the message's charset ({msg.encoding}) cannot encode", name)


class _InvalidJSON(ValueError):
    pass


def _json_object(pairs: list) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _InvalidJSON("an object has a duplicate key")
    return obj


def _json_constant(name: str):
    raise _InvalidJSON("NaN and Infinity are not JSON")


def _json_output(text: str, name: str) -> bytes:
    try:
        value = json.loads(text, object_pairs_hook=_json_object, parse_constant=_json_constant)
    except json.JSONDecodeError as e:
        reason = f"{e.msg} at line {e.lineno} column {e.colno}"
    except _InvalidJSON as e:
        reason = str(e)
    else:
        return _utf8(json.dumps(value, ensure_ascii=False, separators=(",", ":")), name)
    raise TemplateError(f"did not render valid JSON: {reason}", name)


def _xml_output(text: str, name: str) -> bytes:
    # resolve_entities=False, load_dtd=False, no_network=True: the output cannot pull entities or files
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    try:
        root = etree.fromstring(_XML_DECLARATION.sub("", text, count=1), parser)
    except etree.XMLSyntaxError as e:
        last = e.error_log.last_error
        reason = f"{last.type_name} at line {last.line} column {last.column}" if last else "not XML"
    except ValueError:
        reason = "not XML"
    else:
        tree = root.getroottree()
        if tree.docinfo.doctype:
            raise TemplateError("XML output may not declare a DOCTYPE", name)
        return etree.tostring(tree, encoding="UTF-8", xml_declaration=True)
    raise TemplateError(f"did not render well-formed XML: {reason}", name)

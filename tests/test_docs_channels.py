"""docs/channels.md documents every channel-file key and every template helper the code has.

The keys come from the code itself, two ways: a scan of the parser's source for the
keys it reads, and a record of the keys the parser touches while it reads real channel
files (the shipped samples and a few that reach the other branches). The helpers come
from the template environments a Mappings builds, minus what Jinja provides anyway.
"""

from __future__ import annotations

import inspect
import re
import tomllib
from pathlib import Path

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from interface_engine import config as engine_config
from interface_engine.channels import config as channel_config
from interface_engine.channels.templating import Mappings

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "channels.md"
SAMPLES = sorted((ROOT / "channels").glob("*.toml"))

#: `section.str("key"`, `r.int("key"`, `s.duration("key"`, `top.table("key"`, `top.used.add("key"` ...
_READ = re.compile(r'\.(?:str|int|duration|text|bool|strings|table|used\.add)\(\s*"([A-Za-z_][A-Za-z0-9_]*)"')

#: Channels that reach the parser branches the samples do not: an own port, a directory, fhir, every key.
_EXTRA_CHANNELS = [
    """
    name = "own-port"
    description = "x"
    timezone = "Europe/Paris"
    enabled = false
    [source]
    type = "mllp"
    host = "127.0.0.1"
    port = 0
    message_types = ["ADT^A01", "ORU"]
    ack_mode = "processed"
    processed_timeout = "5s"
    max_frame = 4096
    frame_timeout = "10s"
    idle_timeout = "1m"
    max_connections = 5
    max_connections_per_peer = 2
    max_pending_per_connection = 8
    [filter]
    when = "msg['MSH-9.2'] == 'A01'"
    [[destinations]]
    name = "out"
    type = "mllp"
    host = "127.0.0.1"
    port = 2576
    template = "hl7/x.hl7.j2"
    when = "true"
    ack_timeout = "5s"
    connect_timeout = "2s"
    [destinations.retry]
    attempts = 3
    backoff = "2s"
    max_backoff = "1m"
    on_failure = "skip"
    [[destinations]]
    name = "fhir"
    type = "fhir"
    template = "fhir/x.json.j2"
    url = "https://fhir.example.org/r4"
    timeout = "10s"
    ca_file = "conf/ca.pem"
    [destinations.auth]
    type = "smart"
    token_url = "https://auth.example.org/token"
    client_id = "engine"
    private_key = "file:/nonexistent/key.pem"
    key_id = "k1"
    algorithm = "ES384"
    scope = "system/*.write"
    """,
    """
    [source]
    type = "directory"
    path = "var/in"
    pattern = "*.hl7"
    interval = "5s"
    [[destinations]]
    name = "out"
    type = "file"
    path = "var/out/{{ msg['MSH-10'] }}.hl7"
    """,
]


def doc() -> str:
    return DOC.read_text("utf-8")


def code_spans(text: str) -> set[str]:
    """The contents of every inline code span (`...`) of a Markdown text, fenced blocks left out."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return {m.group(1).strip() for m in re.finditer(r"`([^`\n]+)`", text)}


def documented_as_key(key: str, spans: set[str]) -> bool:
    """`key`, `key = ...`, or a table header naming it: `[key]`, `[[key]]`, `[destinations.key]`."""
    pattern = re.compile(rf"^(?:{re.escape(key)}(?:\s*=.*)?|\[\[?(?:[A-Za-z_]+\.)?{re.escape(key)}\]\]?)$")
    return any(pattern.match(span) for span in spans)


def scanned_keys() -> set[str]:
    """Keys the channel parser reads, from its source, plus the listener keys of read_listener."""
    keys = set(_READ.findall(Path(channel_config.__file__).read_text("utf-8")))
    listener_keys = set(_READ.findall(inspect.getsource(engine_config.read_listener)))
    assert {"host", "port", "max_frame"} <= listener_keys, "read_listener's keys were not found"
    return keys | listener_keys


def touched_keys(monkeypatch) -> set[str]:
    """Keys the parser marks as read while it parses the samples and the extra channels."""
    sections: list = []
    original = engine_config.Section.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        sections.append(self)

    monkeypatch.setattr(engine_config.Section, "__init__", recording)
    for path in SAMPLES:
        channel_config.load_channel(path)
    for i, text in enumerate(_EXTRA_CHANNELS):
        data = tomllib.loads(inspect.cleandoc(text))
        channel_config.parse_channel(data, f"extra-{i}.toml")
    return set().union(*(s.used for s in sections))


def test_the_samples_exist():
    assert SAMPLES, "channels/*.toml: the shipped sample channels are missing"


def test_every_channel_key_is_documented(monkeypatch):
    keys = scanned_keys() | touched_keys(monkeypatch)
    # a sanity check that both ways found something of every section
    assert {"name", "timezone", "source", "filter", "destinations", "retry", "message_types",
            "listener", "pattern", "when", "template", "attempts", "on_failure",
            "max_pending_per_connection"} <= keys
    spans = code_spans(doc())
    missing = sorted(k for k in keys if not documented_as_key(k, spans))
    assert not missing, f"docs/channels.md does not document these channel keys in backticks: {missing}"


def engine_helpers(tmp_path) -> set[str]:
    """Filters and globals of the template environments that are the engine's own, not Jinja's."""
    mappings = Mappings(tmp_path)
    stock = ImmutableSandboxedEnvironment()
    own = set()
    environments = list(mappings._envs.values())
    assert environments, "Mappings no longer keeps its environments in _envs; update this test"
    for env in environments:
        for kind in ("filters", "globals", "tests"):
            theirs = getattr(stock, kind)
            own |= {name for name, value in getattr(env, kind).items()
                    if name not in theirs or theirs[name] is not value}
    return own


def test_every_template_helper_is_documented(tmp_path):
    helpers = engine_helpers(tmp_path)
    assert {"hl7_set", "hl7_drop", "lookup", "csv_row"} <= helpers
    spans = code_spans(doc())
    missing = sorted(h for h in helpers
                     if not any(span == h or span.startswith(f"{h}(") for span in spans))
    assert not missing, f"docs/channels.md does not document these template helpers: {missing}"
    headings = set(re.findall(r"^#{2,5} `([A-Za-z_][A-Za-z0-9_]*)", doc(), flags=re.M))
    assert not sorted(helpers - headings), f"helpers without a heading of their own: {sorted(helpers - headings)}"


def test_the_first_example_in_the_doc_is_a_valid_channel():
    block = re.search(r"^```toml\n(.*?)^```", doc(), flags=re.S | re.M)
    assert block, "docs/channels.md should open with a TOML example channel"
    channel = channel_config.parse_channel(tomllib.loads(block.group(1)), "docs-example.toml")
    assert channel.destinations


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_the_doc_walks_through_each_sample(path):
    assert f"channels/{path.name}" in doc()

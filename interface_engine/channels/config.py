"""Channel files: one TOML file a channel, read top to bottom like a pipeline.

    name, timezone
    [source]            where messages come from (an MLLP listener or a directory)
    [filter]            which of them the channel takes
    [[destinations]]    where each goes, transformed how, retried how

Errors name the file, the key path (and the line where TOML gives one) and what was
expected, in one line, so `channels validate` reads like a compiler.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..config import ConfigError, EngineConfig, ListenerConfig, Section, read_listener, read_toml
from ..tls import ClientTLS, read_client

SOURCE_TYPES = ("mllp", "directory")
DESTINATION_TYPES = ("file", "mllp", "fhir")
AUTH_TYPES = ("none", "bearer", "client_credentials", "smart")
SIGNING_ALGORITHMS = ("RS384", "ES384")
CHANNEL_ACK_MODES = ("stored", "processed")
ON_FAILURE = ("block", "skip")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TYPE_PATTERN = re.compile(r"^(\*|[A-Z0-9]{3}(\^(\*|[A-Z0-9]{2,3}))?)$")


@dataclass(frozen=True, slots=True)
class Retry:
    attempts: int = 5
    backoff: float = 1.0
    max_backoff: float = 300.0
    on_failure: str = "block"

    def delay(self, failures: int) -> float:
        """Seconds to wait after the given number of failed attempts: exponential, capped."""
        return min(self.max_backoff, self.backoff * (2 ** min(max(0, failures - 1), 40)))


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """How a FHIR destination authenticates. Secrets are env:/file: references, resolved at use."""

    type: str = "none"
    token: str | None = None            # bearer
    token_url: str | None = None        # client_credentials, smart
    client_id: str | None = None
    client_secret: str | None = None    # client_credentials
    private_key: str | None = None      # smart
    key_id: str | None = None
    algorithm: str = "RS384"
    scope: str | None = None


@dataclass(frozen=True, slots=True)
class DestinationConfig:
    name: str
    type: str
    template: str | None = None
    when: str | None = None
    retry: Retry = field(default_factory=Retry)
    path: str | None = None                  # file: a template for the target path
    host: str | None = None                  # mllp
    port: int | None = None
    ack_timeout: float = 30.0
    connect_timeout: float = 10.0
    tls: ClientTLS | None = None             # mllp over TLS
    url: str | None = None                   # fhir: the server's base URL
    timeout: float = 30.0
    ca_file: str | None = None
    auth: AuthConfig = field(default_factory=AuthConfig)


@dataclass(frozen=True, slots=True)
class SourceConfig:
    type: str
    message_types: tuple[str, ...] = ("*",)
    ack_mode: str = "stored"
    processed_timeout: float = 30.0
    listener: str | None = None                  # mllp: a [[listeners]] name of the engine config,
    own_listener: ListenerConfig | None = None   # or a port of the channel's own
    path: str | None = None                      # directory
    pattern: str = "*"
    interval: float = 2.0


@dataclass(frozen=True, slots=True)
class ChannelConfig:
    name: str
    file: str
    source: SourceConfig
    destinations: tuple[DestinationConfig, ...]
    when: str | None = None
    timezone: str = "UTC"
    enabled: bool = True
    description: str = ""

    def destination(self, name: str) -> DestinationConfig | None:
        return next((d for d in self.destinations if d.name == name), None)

    def accepts(self, message_type: str, trigger: str) -> bool:
        return self.match(message_type, trigger) is not None

    def match(self, message_type: str, trigger: str) -> int | None:
        """How specifically this channel takes a type: 2 for TYPE^EVENT, 1 for TYPE, 0 for *."""
        best = None
        for pattern in self.source.message_types:
            kind, _, event = pattern.partition("^")
            if kind in ("*", message_type) and (not event or event in ("*", trigger)):
                rank = 0 if kind == "*" else 2 if event not in ("", "*") else 1
                best = rank if best is None else max(best, rank)
        return best


def load_channel(path: str | Path, checker=None) -> ChannelConfig:
    """Read and check one channel file. `checker` (a Mappings) checks templates and rules."""
    path = str(path)
    return parse_channel(read_toml(path, "no such channel file"), path, checker)


def parse_channel(data: dict, path: str, checker=None) -> ChannelConfig:
    top = Section(path, "", data)
    name = top.str("name", Path(path).stem)
    if not _NAME.match(name):
        top.fail("name", f"expected letters, digits, '.', '_' or '-' (at most 64), got {name!r}")
    timezone = top.str("timezone", "UTC")
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        top.fail("timezone", f"expected an IANA time zone such as Europe/Paris or UTC, got {timezone!r}")
    enabled = top.bool("enabled", True)
    description = top.text("description", "") or ""

    source = _source(top.table("source"), name)
    f = top.table("filter")
    when = f.text("when", None)
    f.done()
    if when is not None:
        _check(checker, "check_expression", when, f, "when", "a filter expression")

    top.used.add("destinations")
    raw = data.get("destinations", [])
    if not isinstance(raw, list) or not raw:
        top.fail("destinations", "expected at least one [[destinations]] table")
    destinations = []
    for i, item in enumerate(raw):
        section = Section(path, f"destinations[{i}]", item)
        d = _destination(section, checker)
        if any(other.name == d.name for other in destinations):
            section.fail("name", f"expected a unique destination name, {d.name!r} is used twice")
        destinations.append(d)
    top.done()
    return ChannelConfig(name=name, file=path, source=source, destinations=tuple(destinations),
                         when=when, timezone=timezone, enabled=enabled, description=description)


def _source(s: Section, channel: str) -> SourceConfig:
    kind = s.str("type", None, SOURCE_TYPES)
    types = s.strings("message_types", ["*"])
    for t in types:
        if not _TYPE_PATTERN.match(t):
            s.fail("message_types", f'expected patterns such as "ADT", "ADT^A01" or "*", got {t!r}')
    ack_mode = s.str("ack_mode", "stored", CHANNEL_ACK_MODES)
    processed_timeout = s.duration("processed_timeout", 30.0)
    if kind == "mllp":
        listener = s.text("listener", None)
        own = None
        if listener is None:
            if "port" not in s.data:
                s.fail("listener", "expected the name of a [[listeners]] entry of the engine config, "
                                   "or a port of the channel's own")
            own = read_listener(s, f"channel:{channel}", ack_mode=False)
        else:
            shared = {"host", "port", "max_frame", "frame_timeout", "idle_timeout",
                      "max_connections", "max_connections_per_peer", "max_pending_per_connection", "tls",
                      "max_segments", "max_repetitions", "allowed_peers"}
            extra = sorted(set(s.data) & shared)
            if extra:
                s.fail(extra[0], "belongs to the named listener in the engine config "
                                 "(or drop `listener` to give the channel a port of its own)")
        s.done()
        return SourceConfig(type=kind, message_types=tuple(types), ack_mode=ack_mode,
                            processed_timeout=processed_timeout, listener=listener, own_listener=own)
    directory = s.str("path", None)
    pattern = s.str("pattern", "*")
    interval = s.duration("interval", 2.0)
    if ack_mode != "stored":
        s.fail("ack_mode", "a directory source has no sender to answer; leave ack_mode out")
    s.done()
    return SourceConfig(type=kind, message_types=tuple(types), path=directory, pattern=pattern,
                        interval=interval)


def _destination(s: Section, checker) -> DestinationConfig:
    name = s.str("name", None)
    if not _NAME.match(name):
        s.fail("name", f"expected letters, digits, '.', '_' or '-' (at most 64), got {name!r}")
    kind = s.str("type", None, DESTINATION_TYPES)
    template = s.text("template", None)
    if template is not None:
        _check(checker, "check_template", template, s, "template", "a template in the mappings directory")
    when = s.text("when", None)
    if when is not None:
        _check(checker, "check_expression", when, s, "when", "a filter expression")
    r = s.table("retry")
    retry = Retry(attempts=r.int("attempts", 5, 1, 1_000_000), backoff=r.duration("backoff", 1.0),
                  max_backoff=r.duration("max_backoff", 300.0),
                  on_failure=r.str("on_failure", "block", ON_FAILURE))
    r.done()
    options = {}
    if kind == "file":
        options["path"] = s.str("path", None)
        _check(checker, "check_path_template", options["path"], s, "path", "a path template")
    elif kind == "fhir":
        if template is None:
            s.fail("template", "required for a fhir destination (a FHIR template of mappings/fhir/)")
        options["url"] = s.str("url", None)
        if not options["url"].startswith(("http://", "https://")):
            s.fail("url", f"expected an http:// or https:// base URL, got {options['url']!r}")
        options["timeout"] = s.duration("timeout", 30.0)
        options["ca_file"] = s.text("ca_file", None)
        options["auth"] = _auth(s.table("auth"))
    else:
        options["host"] = s.str("host", None)
        options["port"] = s.int("port", None, 1, 65535)
        options["ack_timeout"] = s.duration("ack_timeout", 30.0)
        options["connect_timeout"] = s.duration("connect_timeout", 10.0)
        options["tls"] = read_client(s.table("tls"))
    s.done()
    return DestinationConfig(name=name, type=kind, template=template, when=when, retry=retry, **options)


def _auth(a: Section) -> AuthConfig:
    kind = a.str("type", "none", AUTH_TYPES)
    needs = {"none": (), "bearer": ("token",), "client_credentials": ("token_url", "client_id", "client_secret"),
             "smart": ("token_url", "client_id", "private_key")}[kind]
    values = {key: a.text(key, None) for key in ("token", "token_url", "client_id", "client_secret",
                                                 "private_key", "key_id", "scope")}
    algorithm = a.str("algorithm", "RS384", SIGNING_ALGORITHMS)
    a.done()
    for key in needs:
        if values[key] is None:
            a.fail(key, f"required for auth type {kind!r}")
    for key in ("token", "client_secret", "private_key"):
        value = values[key]
        if value is not None and (not value.startswith(("env:", "file:")) or not value.split(":", 1)[1]):
            a.fail(key, "expected a reference such as env:NAME or file:/path, not a literal secret")
    return AuthConfig(type=kind, algorithm=algorithm, **values)


def _check(checker, method: str, value: str, section: Section, key: str, what: str):
    if checker is None:
        return
    from .templating import TemplateError

    try:
        getattr(checker, method)(value)
    except TemplateError as e:
        section.fail(key, f"expected {what}: {e}")


def load_channels(engine: EngineConfig, paths=None, checker=None) -> list[ChannelConfig]:
    """Load the channel files (the whole channels directory unless `paths` is given)."""
    files = [Path(p) for p in paths] if paths else channel_files(engine.channels.directory)
    channels = [load_channel(f, checker) for f in files]
    check_together(channels, engine)
    return channels


def channel_files(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    if not directory.exists():
        return []
    if not directory.is_dir():
        raise ConfigError(f"{directory}: the channels directory is not a directory")
    return sorted(directory.glob("*.toml"))


def check_together(channels: list[ChannelConfig], engine: EngineConfig):
    """What no single file can know: unique names, existing listeners, unambiguous routing."""
    seen: dict[str, str] = {}
    listeners = {listener.name for listener in engine.listeners}
    ports = {(listener.host, listener.port): f"listener {listener.name!r} of {engine.path}"
             for listener in engine.listeners if listener.port}
    claims: dict[tuple, ChannelConfig] = {}
    for c in channels:
        if c.name in seen:
            raise ConfigError(f"{c.file}: name: channel {c.name!r} is also defined in {seen[c.name]}")
        seen[c.name] = c.file
        if c.source.type != "mllp" or not c.enabled:
            continue
        if c.source.listener is not None:
            if c.source.listener not in listeners:
                known = ", ".join(sorted(listeners)) or "none"
                raise ConfigError(f"{c.file}: source.listener: expected a listener of "
                                  f"{engine.path} ({known}), got {c.source.listener!r}")
            where = ("listener", c.source.listener)
        else:
            own = c.source.own_listener
            where = ("port", own.host, own.port)
            taken = ports.get((own.host, own.port))
            if taken:
                raise ConfigError(f"{c.file}: source.port: {own.host}:{own.port} is already used by "
                                  f"{taken}; to share a port, name a [[listeners]] entry as source.listener")
            if own.port:
                ports[(own.host, own.port)] = f"channel {c.name!r} ({c.file})"
        for pattern in c.source.message_types:
            other = claims.get(where + (pattern,))
            if other is not None:
                raise ConfigError(f"{c.file}: source.message_types: {pattern!r} on this listener is "
                                  f"already taken by channel {other.name!r} ({other.file})")
            claims[where + (pattern,)] = c

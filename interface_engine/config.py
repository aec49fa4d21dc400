"""Engine configuration: TOML in, typed and validated objects out.

Every error names the file, the key path and what was expected, so an operator
can fix a config without reading code. Unknown keys are errors too: a typo must
not silently fall back to a default.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CONFIG = "conf/engine.toml"

ACK_MODES = ("stored",)
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
LOG_FORMATS = ("text", "json")


class ConfigError(Exception):
    """A config problem, worded for the person who wrote the file."""


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    host: str = "127.0.0.1"
    port: int = 2575
    ack_mode: str = "stored"
    max_frame: int = 1024 * 1024
    frame_timeout: float = 30.0
    idle_timeout: float = 300.0
    max_connections: int = 200
    max_connections_per_peer: int = 20
    max_pending_per_connection: int = 64
    max_segments: int = 20_000
    max_repetitions: int = 1_000
    allowed_peers: tuple = ()          # ipaddress networks; empty: any peer
    tls: object | None = None          # tls.ServerTLS when the listener speaks TLS


@dataclass(frozen=True, slots=True)
class StoreConfig:
    url: str = "sqlite:///var/store.db"
    duplicate_window: float = 24 * 3600.0
    max_batch: int = 512
    max_backlog: int = 4096
    writer: str = "process"


@dataclass(frozen=True, slots=True)
class HL7Config:
    default_charset: str = "utf-8"
    fallback_charset: str = "latin-1"


@dataclass(frozen=True, slots=True)
class ChannelsConfig:
    directory: str = "channels"
    mappings: str = "mappings"
    #: "process": filters and templates run in a child process (another core); "thread": in the engine's
    processor: str = "process"


@dataclass(frozen=True, slots=True)
class AuditConfig:
    #: the signed copy of every audit chain's head, kept outside the database
    checkpoint_file: str = "var/audit-checkpoint.json"
    checkpoint_interval: float = 10.0


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The admin HTTP server: API, console, metrics and health checks."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 2580
    tls: object | None = None          # tls.ServerTLS; required off the loopback interface
    session_timeout: float = 1800.0
    #: bodies of authenticated requests above this are refused before they are read
    max_body: int = 1024 * 1024


@dataclass(frozen=True, slots=True)
class EngineConfig:
    path: str
    log_level: str = "info"
    log_format: str = "text"
    pid_file: str = "var/engine.pid"
    #: this process's name among engines sharing a store (audit chain, queue ownership)
    node: str = "engine"
    #: how long a destination queue stays with an engine that stopped renewing its lease
    queue_lease: float = 15.0
    keys_file: str = "var/keys.json"
    store: StoreConfig = field(default_factory=StoreConfig)
    hl7: HL7Config = field(default_factory=HL7Config)
    channels: ChannelsConfig = field(default_factory=ChannelsConfig)
    listeners: tuple[ListenerConfig, ...] = ()
    audit: AuditConfig = field(default_factory=AuditConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    retention: RetentionConfig = field(default_factory=lambda: RetentionConfig())
    alerts: AlertsConfig = field(default_factory=lambda: AlertsConfig())


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


class Section:
    """Reads one TOML table, checking types and remembering which keys were used."""

    def __init__(self, path: str, prefix: str, data: object):
        self.path, self.prefix = path, prefix
        if not isinstance(data, dict):
            self.fail("", f"expected a table, got {kind_of(data)}")
        self.data: dict = data
        self.used: set[str] = set()

    def fail(self, key: str, expected: str):
        where = ".".join(p for p in (self.prefix, key) if p) or "(top level)"
        raise ConfigError(f"{self.path}: {where}: {expected}")

    def _get(self, key, default):
        self.used.add(key)
        return self.data.get(key, default)

    def str(self, key, default, choices=None):
        """A non-empty string; `default=None` makes the key required."""
        value = self._get(key, default)
        if value is None:
            self.fail(key, "required key is missing" + (f" (one of {', '.join(choices)})" if choices else ""))
        if not isinstance(value, str) or not value:
            self.fail(key, f"expected a non-empty string, got {kind_of(value)}")
        if choices and value not in choices:
            self.fail(key, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def int(self, key, default, minimum=1, maximum=None):
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"expected an integer, got {kind_of(value)}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            self.fail(key, f"expected an integer {bound}, got {value}")
        return value

    def text(self, key, default):
        """An optional string: `default` when absent, a non-empty string when given."""
        if key not in self.data:
            self.used.add(key)
            return default
        value = self._get(key, default)
        if not isinstance(value, str) or not value.strip():
            self.fail(key, f"expected a non-empty string, got {kind_of(value)}")
        return value

    def bool(self, key, default):
        value = self._get(key, default)
        if not isinstance(value, bool):
            self.fail(key, f"expected true or false, got {kind_of(value)}")
        return value

    def strings(self, key, default):
        value = self._get(key, default)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            self.fail(key, f"expected a list of strings, got {kind_of(value)}")
        return value

    def duration(self, key, default):
        """Seconds as a number, or a string such as "30s", "5m", "24h"."""
        value = self._get(key, default)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, str) and (m := _DURATION.match(value)):
            seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        else:
            self.fail(key, f'expected a duration such as 30, "30s", "5m" or "24h", got {value!r}')
        if seconds <= 0:
            self.fail(key, f"expected a positive duration, got {value!r}")
        return seconds

    def table(self, key):
        self.used.add(key)
        return Section(self.path, f"{self.prefix}.{key}" if self.prefix else key, self.data.get(key, {}))

    def done(self):
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            self.fail(unknown[0], "unknown key (check its spelling against docs/configuration.md)")


def kind_of(value) -> str:
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def read_toml(path: str, missing: str) -> dict:
    """A TOML file's tables, or a ConfigError naming the file; `missing` says what to do if absent."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: {missing}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def load(path: str | os.PathLike) -> EngineConfig:
    """Load and validate the engine config at `path`."""
    path = str(path)
    return parse(read_toml(path, "no such config file (pass --config PATH)"), path)


def parse(data: dict, path: str = "<config>") -> EngineConfig:
    top = Section(path, "", data)

    engine = top.table("engine")
    log_level = engine.str("log_level", "info", LOG_LEVELS)
    log_format = engine.str("log_format", "text", LOG_FORMATS)
    pid_file = engine.str("pid_file", "var/engine.pid")
    node = engine.str("node", os.environ.get("IE_NODE") or _default_node())
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", node):
        engine.fail("node", f"expected up to 64 letters, digits or _.:- , got {node!r}")
    queue_lease = engine.duration("queue_lease", 15.0)
    if queue_lease < 1.0:
        engine.fail("queue_lease", f"expected a duration of at least 1s, got {queue_lease:g}s")
    engine.done()

    k = top.table("keys")
    keys_file = k.str("file", "var/keys.json")
    k.done()

    s, d = top.table("store"), StoreConfig()
    store = StoreConfig(
        url=os.environ.get("IE_STORE_URL") or _store_url(s, d.url),
        duplicate_window=s.duration("duplicate_window", d.duplicate_window),
        max_batch=s.int("max_batch", d.max_batch, 1, 100_000),
        max_backlog=s.int("max_backlog", d.max_backlog, 1),
        writer=s.str("writer", d.writer, ("process", "thread")),
    )
    s.done()
    if not store.url.startswith(("sqlite:", "postgresql")):
        s.fail("url", f"expected a sqlite:/// or postgresql+psycopg:// URL, got {store.url.split(':')[0]!r}")

    h, d = top.table("hl7"), HL7Config()
    hl7 = HL7Config(
        default_charset=_codec(h, "default_charset", d.default_charset),
        fallback_charset=_codec(h, "fallback_charset", d.fallback_charset),
    )
    h.done()

    c, d = top.table("channels"), ChannelsConfig()
    channels = ChannelsConfig(directory=c.str("directory", d.directory),
                              mappings=c.str("mappings", d.mappings),
                              processor=c.str("processor", d.processor, ("process", "thread")))
    c.done()

    a, d = top.table("audit"), AuditConfig()
    audit = AuditConfig(checkpoint_file=a.str("checkpoint_file", d.checkpoint_file),
                        checkpoint_interval=a.duration("checkpoint_interval", d.checkpoint_interval))
    a.done()

    admin = read_admin(top.table("admin"))

    top.used.add("listeners")
    raw_listeners = data.get("listeners", [])
    if not isinstance(raw_listeners, list):
        top.fail("listeners", "expected an array of tables ([[listeners]])")
    listeners = []
    for i, item in enumerate(raw_listeners):
        ls = Section(path, f"listeners[{i}]", item)
        listener = read_listener(ls, ls.str("name", f"listener-{i + 1}"))
        ls.done()
        if any(other.name == listener.name for other in listeners):
            ls.fail("name", f"expected a unique listener name, {listener.name!r} is used twice")
        listeners.append(listener)
    retention = read_retention(top.table("retention"))
    alerts = read_alerts(top.table("alerts"))
    top.done()
    return EngineConfig(path=path, log_level=log_level, log_format=log_format, pid_file=pid_file,
                        node=node, queue_lease=queue_lease, keys_file=keys_file, store=store, hl7=hl7,
                        channels=channels, listeners=tuple(listeners), audit=audit, admin=admin,
                        retention=retention, alerts=alerts)


def read_admin(section: Section) -> AdminConfig:
    import ipaddress

    from .tls import read_server

    d = AdminConfig()
    admin = AdminConfig(enabled=section.bool("enabled", d.enabled), host=section.str("host", d.host),
                        port=section.int("port", d.port, 0, 65535), tls=read_server(section.table("tls")),
                        session_timeout=section.duration("session_timeout", d.session_timeout),
                        max_body=section.int("max_body", d.max_body, 1024))
    section.done()
    try:
        loopback = ipaddress.ip_address(admin.host).is_loopback
    except ValueError:
        loopback = admin.host == "localhost"
    if admin.enabled and not loopback and admin.tls is None:
        section.fail("tls", f"required when host is not a loopback address ({admin.host!r}): "
                            "sessions and tokens must not cross the network in clear")
    return admin


def read_listener(section: Section, name: str, *, ack_mode: bool = True) -> ListenerConfig:
    """The listener keys, shared by engine.toml's [[listeners]] and a channel's own [source]."""
    from .tls import read_server

    d = ListenerConfig(name=name)
    return ListenerConfig(
        name=name,
        host=section.str("host", d.host),
        port=section.int("port", d.port, 0, 65535),
        ack_mode=section.str("ack_mode", d.ack_mode, ACK_MODES) if ack_mode else d.ack_mode,
        max_frame=section.int("max_frame", d.max_frame, 64),
        frame_timeout=section.duration("frame_timeout", d.frame_timeout),
        idle_timeout=section.duration("idle_timeout", d.idle_timeout),
        max_connections=section.int("max_connections", d.max_connections),
        max_connections_per_peer=section.int("max_connections_per_peer", d.max_connections_per_peer),
        max_pending_per_connection=section.int("max_pending_per_connection",
                                               d.max_pending_per_connection),
        max_segments=section.int("max_segments", d.max_segments),
        max_repetitions=section.int("max_repetitions", d.max_repetitions),
        allowed_peers=_networks(section, "allowed_peers"),
        tls=read_server(section.table("tls")),
    )


def _networks(section: Section, key: str) -> tuple:
    """Addresses and networks ("10.1.2.3", "10.20.0.0/16", "::1"), checked now."""
    import ipaddress

    if key not in section.data:
        return ()
    networks = []
    for text in section.strings(key, None):
        try:
            networks.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            section.fail(key, f"expected IP addresses or networks such as 10.20.0.0/16, got {text!r}")
    return tuple(networks)


def _store_url(section: Section, default: str) -> str:
    """The file's store URL, with its password taken from a reference: never written in the file."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from .secrets import SecretError, resolve

    url = section.str("url", default)
    try:
        parsed = make_url(url)
    except ArgumentError:
        section.fail("url", "expected a sqlite:/// or postgresql+psycopg:// URL")
    if parsed.password is not None:
        section.fail("url", 'holds a password: give it as password = "env:NAME" or "file:PATH" '
                            "(or set IE_STORE_URL in the environment)")
    reference = section.text("password", None)
    if reference is None:
        return url
    try:
        password = resolve(reference, what="store.password")
    except SecretError as e:
        raise ConfigError(f"{section.path}: {e}") from None
    return parsed.set(password=password).render_as_string(hide_password=False)


def _default_node() -> str:
    return re.sub(r"[^A-Za-z0-9_.:-]", "-", socket.gethostname())[:64] or "engine"


def _codec(section: Section, key: str, default: str) -> str:
    import codecs

    name = section.str(key, default)
    try:
        codecs.lookup(name)
    except LookupError:
        section.fail(key, f"expected a Python codec name such as utf-8 or latin-1, got {name!r}")
    return name


def sqlite_path(url: str) -> Path | None:
    """The file behind a sqlite URL, so its folder can be created before first use."""
    if not url.startswith("sqlite:///") or url in ("sqlite://", "sqlite:///:memory:"):
        return None
    return Path(url[len("sqlite:///"):].split("?", 1)[0])


def prepare_sqlite_file(url: str):
    """Create a SQLite store's folder (0700) and file (0600) before SQLite does.

    The store holds patient data: it must not be readable by other users whatever
    the umask. SQLite gives its -wal and -shm files the main file's permissions.
    """
    path = sqlite_path(url)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))


# -- [retention] -------------------------------------------------------------------

#: The message states a retention rule may name (the store's states).
MESSAGE_STATES = ("received", "rejected", "filtered", "queued", "sent", "error", "dead")


@dataclass(frozen=True, slots=True)
class RetentionRule:
    channel: str                    # a channel name, or "*" for every channel without its own rule
    states: tuple[str, ...]
    content_after: float | None     # seconds after receipt
    delete_after: float | None


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    schedule: float | None = None   # None: only `interface-engine db prune`
    batch: int = 500
    rules: tuple[RetentionRule, ...] = ()


def read_retention(section: Section) -> RetentionConfig:
    schedule = section.duration("schedule", None) if "schedule" in section.data else None
    batch = section.int("batch", RetentionConfig().batch, 1, 100_000)
    section.used.add("rules")
    raw_rules = section.data.get("rules", [])
    if not isinstance(raw_rules, list):
        section.fail("rules", "expected an array of tables ([[retention.rules]])")
    rules, claimed = [], {}
    for i, item in enumerate(raw_rules):
        r = Section(section.path, f"{section.prefix}.rules[{i}]", item)
        channel = r.str("channel", "*")
        if "states" not in r.data:
            r.fail("states", f"required key is missing (a list of {', '.join(MESSAGE_STATES)})")
        states = tuple(r.strings("states", None))
        for state in states:
            if state not in MESSAGE_STATES:
                r.fail("states", f"expected states among {', '.join(MESSAGE_STATES)}, got {state!r}")
            if (channel, state) in claimed:
                r.fail("states", f"channel {channel!r} state {state!r} is already covered by "
                                 f"retention.rules[{claimed[channel, state]}]")
            claimed[channel, state] = i
        content_after = r.duration("content_after", None) if "content_after" in r.data else None
        delete_after = r.duration("delete_after", None) if "delete_after" in r.data else None
        if content_after is None and delete_after is None:
            r.fail("", "expected content_after, delete_after or both")
        if content_after is not None and delete_after is not None and content_after >= delete_after:
            r.fail("content_after", "expected a duration shorter than delete_after "
                                    "(contents go first, the rows later)")
        r.done()
        rules.append(RetentionRule(channel, states, content_after, delete_after))
    section.done()
    if schedule is not None and not rules:
        section.fail("schedule", "a schedule needs [[retention.rules]] to apply (add rules, or remove it)")
    return RetentionConfig(schedule, batch, tuple(rules))


# -- [alerts] ----------------------------------------------------------------------

ALERT_KINDS = ("queue_depth", "queue_age", "error_rate", "silence")
#: Each kind's threshold key, and every key a rule of that kind may have.
_ALERT_THRESHOLD = {"queue_depth": "over", "queue_age": "older_than", "error_rate": "per_minute",
                    "silence": "quiet_for"}
_ALERT_KEYS = {"queue_depth": {"destination"}, "queue_age": {"destination"},
               "error_rate": {"destination"}, "silence": {"hours", "timezone"}}
_HOURS = re.compile(r"^\s*([01]?\d|2[0-3]):([0-5]\d)\s*-\s*([01]?\d|2[0-3]):([0-5]\d)\s*$")


@dataclass(frozen=True, slots=True)
class AlertRule:
    name: str
    kind: str                       # one of ALERT_KINDS
    threshold: float                # deliveries, seconds, errors per minute, or seconds of silence
    channel: str = "*"              # a channel name or a glob ("*": every channel)
    destination: str | None = "*"   # None: an error_rate over the whole channel
    hours: tuple[int, int] | None = None   # silence: minutes after midnight, [start, end)
    timezone: str = "UTC"           # silence: the zone `hours` are in


@dataclass(frozen=True, slots=True)
class AlertsConfig:
    webhook: str | None = None
    token: str | None = field(default=None, repr=False)   # the resolved secret, sent as a bearer token
    interval: float = 30.0
    timeout: float = 10.0
    rules: tuple[AlertRule, ...] = ()


def read_alerts(section: Section) -> AlertsConfig:
    from .secrets import SecretError, resolve

    d = AlertsConfig()
    webhook = section.text("webhook", None)
    if webhook is not None and not re.match(r"https?://[^/\s]+", webhook):
        section.fail("webhook", f"expected an http:// or https:// URL, got {webhook!r}")
    token = None
    if "token" in section.data:
        if webhook is None:
            section.fail("token", "a token needs a webhook to send it to")
        try:
            token = resolve(section.str("token", None), what=f"{section.prefix}.token")
        except SecretError as e:
            raise ConfigError(f"{section.path}: {e}") from None
    interval = section.duration("interval", d.interval)
    timeout = section.duration("timeout", d.timeout)
    section.used.add("rules")
    raw_rules = section.data.get("rules", [])
    if not isinstance(raw_rules, list):
        section.fail("rules", "expected an array of tables ([[alerts.rules]])")
    rules: list[AlertRule] = []
    for i, item in enumerate(raw_rules):
        rule = _alert_rule(Section(section.path, f"{section.prefix}.rules[{i}]", item))
        if any(other.name == rule.name for other in rules):
            Section(section.path, f"{section.prefix}.rules[{i}]", item).fail(
                "name", f"expected a unique rule name, {rule.name!r} is used twice")
        rules.append(rule)
    section.done()
    return AlertsConfig(webhook, token, interval, timeout, tuple(rules))


def _alert_rule(r: Section) -> AlertRule:
    name = r.str("name", None)
    kind = r.str("kind", None, ALERT_KINDS)
    threshold_key = _ALERT_THRESHOLD[kind]
    allowed = {"name", "kind", "channel", threshold_key} | _ALERT_KEYS[kind]
    for key in r.data:
        if key not in allowed:
            r.fail(key, f"not a key of a {kind} rule (its keys: {', '.join(sorted(allowed))})")
    if threshold_key not in r.data:
        r.fail(threshold_key, f"required key is missing (the threshold of a {kind} rule)")
    if kind == "queue_depth":
        threshold = float(r.int("over", None, 0))
    elif kind == "error_rate":
        value = r._get("per_minute", None)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            r.fail("per_minute", f"expected a positive number of errors per minute, got {value!r}")
        threshold = float(value)
    else:
        threshold = r.duration(threshold_key, None)
    channel = r.str("channel", "*")
    destination = r.str("destination", "*") if "destination" in _ALERT_KEYS[kind] else None
    if kind == "error_rate" and "destination" not in r.data:
        destination = None
    hours, zone = None, "UTC"
    if kind == "silence":
        if "hours" in r.data:
            m = _HOURS.match(r.str("hours", None))
            if not m:
                r.fail("hours", f'expected a span such as "07:00-19:00", got {r.data["hours"]!r}')
            hours = (int(m.group(1)) * 60 + int(m.group(2)), int(m.group(3)) * 60 + int(m.group(4)))
            if hours[0] == hours[1]:
                r.fail("hours", "expected a span that starts and ends at different times "
                                "(leave hours out for all day)")
        zone = r.str("timezone", "UTC")
        try:
            from zoneinfo import ZoneInfo

            ZoneInfo(zone)
        except (ValueError, LookupError):
            r.fail("timezone", f"expected a time zone such as Europe/Berlin or UTC, got {zone!r}")
    r.done()
    return AlertRule(name, kind, threshold, channel, destination, hours, zone)

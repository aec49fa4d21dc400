"""Shared fixtures: real engine processes, real stores, the shared corpus.

Tests that need PostgreSQL or the shared corpus skip with a reason where those are
absent, as on a user's machine; with CI=true they fail instead of skipping.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from interface_engine import keys
from interface_engine.config import load as load_config
from interface_engine.store import Store
from interface_engine.store.cipher import Cipher
from tests.fhir_server import fhir_server  # noqa: F401  (the real FHIR test server, session-wide)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CORPUS = SHARED / "corpus" / "hl7v2"
IN_CI = os.environ.get("CI", "").lower() == "true"
POSTGRES_URL = os.environ.get("IE_TEST_POSTGRES_URL",
                              "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def unavailable(reason: str):
    """Skip on a user's machine; in CI a missing dependency is a failure."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: this test must run)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not CORPUS.is_dir():
        unavailable(f"the shared HL7 v2 corpus is not beside this checkout ({CORPUS.name} missing)")
    return CORPUS


def _postgres_admin():
    import psycopg

    dsn = POSTGRES_URL.replace("postgresql+psycopg://", "postgresql://")
    try:
        return psycopg.connect(dsn, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        unavailable(f"PostgreSQL is not reachable at IE_TEST_POSTGRES_URL: {str(e).splitlines()[0]}")


@pytest.fixture
def postgres_url():
    """A URL into a fresh, empty schema of the test database, dropped afterwards."""
    from psycopg.errors import DeadlockDetected

    admin = _postgres_admin()
    schema = f"ie_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in POSTGRES_URL else "?"
    try:
        yield f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        # A process of the test that is still ending (a CLI, an engine's last reads) can hold a
        # table the drop needs; the server then ends one side as a deadlock: try again.
        for attempt in range(10):
            try:
                admin.execute(f"DROP SCHEMA {schema} CASCADE")
                break
            except DeadlockDetected:
                if attempt == 9:
                    raise
                time.sleep(0.5)
        admin.close()


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'store.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("postgres_url")


#: The newest schema revision: the highest-numbered migration file (their chain is checked by test_store).
SCHEMA_HEAD = sorted(p.name[:4] for p in (ROOT / "interface_engine" / "store" / "migrations" / "versions")
                     .glob("[0-9][0-9][0-9][0-9]_*.py"))[-1]

LISTENING = re.compile(r"listening for MLLP on [\d.]+:(\d+) \((\S+)\)")
ADMIN_LISTENING = re.compile(r"admin listening on (https?://[\d.]+:\d+)")


def _toml(value) -> str:
    """Enough TOML for a listener's settings: strings, numbers, lists and inline tables."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


class EngineProcess:
    """`interface-engine run` in a subprocess, with its log kept for inspection."""

    def __init__(self, workdir: Path, store_url: str, listener: dict | None = None,
                 extra: str = "", engine: dict | None = None):
        self.workdir = workdir
        self.store_url = store_url
        self.config_path = workdir / "engine.toml"
        self.log_path = workdir / "engine.log"
        settings = {"name": "test", "host": "127.0.0.1", "port": 0} | (listener or {})
        # Absolute paths, as for the store: commands run against this config from any folder.
        own = [f'[{table}]\n{key} = "{workdir / "var" / name}"' for table, key, name in
               (("keys", "file", "keys.json"), ("audit", "checkpoint_file", "audit-checkpoint.json"))
               if f"[{table}]" not in extra]
        if "[admin]" not in extra:
            own.append("[admin]\nport = 0")
        lines = ["[engine]", *(f'{k} = "{v}"' for k, v in ({"log_level": "debug"} | (engine or {})).items()),
                 "[store]", f'url = "{store_url}"', extra, *own, "[[listeners]]"]
        for key, value in settings.items():
            lines.append(f"{key} = {_toml(value)}")
        self.config_path.write_text("\n".join(lines).replace("'", '"') + "\n")
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self, timeout: float = 30.0):
        self._log = open(self.log_path, "ab")
        offset = self.log_path.stat().st_size
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "interface_engine", "run", "--config", str(self.config_path)],
            cwd=self.workdir, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_bytes()[offset:].decode("utf-8", "replace")
            if m := LISTENING.search(text):
                self.port = int(m.group(1))
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"engine exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        raise RuntimeError("engine did not start listening in time:\n" + self.log())

    def log(self) -> str:
        return self.log_path.read_text("utf-8", "replace") if self.log_path.exists() else ""

    @property
    def admin_url(self) -> str:
        """The admin server's base URL, from the engine's log (written just after the MLLP port's)."""
        deadline = time.monotonic() + 10
        while not (m := ADMIN_LISTENING.search(self.log())) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert m, "the admin server did not start:\n" + self.log()
        return m.group(1)

    def open_store(self, **options) -> Store:
        """The engine's store with its key file, as the CLI opens it: contents readable."""
        config = load_config(self.config_path)
        found = keys.load(config.keys_file)
        return Store(self.store_url, cipher=Cipher(found, reload=lambda: keys.load(config.keys_file)),
                     **options)

    def stop(self, sig=signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        # Its children (the store writer, the channel processor) end when their pipes do, a
        # moment after it: waited for, so that no test's teardown meets them still at work.
        kids = children(self.proc.pid)
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()
            deadline = time.monotonic() + timeout
            while not all(map(ended, kids)) and time.monotonic() < deadline:
                time.sleep(0.02)

    def kill(self) -> int:
        return self.stop(signal.SIGKILL)


def children(pid: int, module: bytes = b"interface_engine.") -> list[int]:
    """The child processes running `module` that `pid` started, from whichever of its threads."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in f.read().split():
                    with open(f"/proc/{child}/cmdline", "rb") as cmdline:
                        if module in cmdline.read():
                            found.append(int(child))
        except FileNotFoundError:
            continue   # a thread or process that ended meanwhile
    return found


def ended(pid: int) -> bool:
    """Whether `pid` is gone or a zombie: its files (its end of a pipe) are closed."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except OSError:   # gone, and reaped
        return True


@pytest.fixture
def engine_factory(tmp_path):
    started: list[EngineProcess] = []

    def make(store_url: str | None = None, listener: dict | None = None, extra: str = "",
             workdir: Path | None = None, engine: dict | None = None) -> EngineProcess:
        """`engine`: more [engine] keys, e.g. {"node": "a"} for the second engine on a store."""
        wd = workdir or tmp_path
        wd.mkdir(parents=True, exist_ok=True)
        process = EngineProcess(wd, store_url or f"sqlite:///{wd / 'store.db'}", listener, extra, engine)
        started.append(process)
        return process.start()

    yield make
    for engine in started:
        if engine.proc and engine.proc.poll() is None:
            engine.kill()
    for engine in started:
        leaked = leaks(engine.log())
        assert not leaked, f"patient data in the engine's log, as {leaked}"


#: The synthetic patient of tests/messages.py: identifier (PID-3), name (PID-5), social
#: security number (PID-19) and a lab result (OBX-5). The engine logs ids, types and
#: peers, never content; none of these may appear in its log in any form.
CANARIES = ("MRN100001", "DOE^JANE", "987-65-4320", "182.0417")


def canary_forms(value: str) -> dict[str, str]:
    """A value as it could leak: clear, HL7-escaped, hex, and base64 at each alignment."""
    import base64

    data = value.encode()
    forms = {"clear": value, "escaped": value.replace("^", "\\S\\"), "hex": data.hex(),
             "HEX": data.hex().upper()}
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + data).decode()
        # Characters fed partly by the padding bytes or by what follows are unstable: keep the core.
        start = (shift * 4 + 2) // 3 + (1 if shift else 0)
        forms[f"base64+{shift}"] = encoded[start:start + (len(data) * 4) // 3 - 3]
    return forms


def leaks(text: str) -> list[str]:
    return [f"{value} {kind}" for value in CANARIES for kind, form in canary_forms(value).items()
            if len(form) >= 6 and form in text]

"""The real FHIR R4 test server from the shared tools folder, for tests that need a true FHIR answer.

`fhir_server` is a session-scoped pytest fixture yielding the base URL
(``http://127.0.0.1:PORT/fhir``); the server starts once per session (the very
first start on a machine installs Node.js and npm packages, so allow minutes)
and stops with SIGTERM at the end. Like the other shared dependencies it skips
where the shared folder is absent, and fails instead with CI=true.

The server keeps everything in memory; `reset(base)` empties it. Tests that
can use ids of their own (uuid4) need not reset, and so do not disturb others.

`FakeHTTPServer` is the opposite: a scripted HTTP(S) server in the test's own
reactor, for what the real server cannot be made to do (503, 429, 401, hang)
and for token endpoints.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs

import pytest
from twisted.internet import defer
from twisted.protocols import policies
from twisted.web import http, resource, server

ROOT = Path(__file__).resolve().parents[1]
SERVER_DIR = ROOT.parent / "shared" / "tools" / "fhir-test-server"
START = SERVER_DIR / "start.sh"
IN_CI = os.environ.get("CI", "").lower() == "true"
START_TIMEOUT = float(os.environ.get("IE_TEST_FHIR_START_TIMEOUT", "300"))
_READY = re.compile(r"FHIR R4 test server ready at (http://\S+)")


def _unavailable(reason: str):
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: this test must run)")
    pytest.skip(reason)


class FHIRTestServer:
    """The server process: `start()` waits for its ready line, `stop()` sends SIGTERM."""

    def __init__(self, start_script: Path = START):
        self.start_script = start_script
        self.proc: subprocess.Popen | None = None
        self.base = ""
        self._stderr = tempfile.TemporaryFile()

    def start(self, timeout: float = START_TIMEOUT) -> str:
        self.proc = subprocess.Popen(["bash", str(self.start_script), "0"], stdout=subprocess.PIPE,
                                     stderr=self._stderr, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        seen = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0:
                if not sel.select(left):
                    continue
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:  # exited before it was ready
                    self.proc.wait(10)
                    raise RuntimeError(f"the FHIR test server exited with {self.proc.returncode}:\n"
                                       + self.output(seen))
                seen += chunk
                if m := _READY.search(seen.decode("utf-8", "replace")):
                    self.base = m.group(1).rstrip("/")
                    return self.base
        output = self.output(seen)
        self.stop()
        raise RuntimeError(f"the FHIR test server was not ready within {timeout:g}s:\n" + output)

    def output(self, stdout: bytes = b"") -> str:
        """The tail of what the server printed, for a failure message."""
        self._stderr.seek(0)
        text = (stdout + self._stderr.read()).decode("utf-8", "replace")
        return text[-4000:]

    def stop(self, timeout: float = 15.0):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc.stdout.close()
        self._stderr.close()


def request(method: str, url: str, body=None, timeout: float = 30.0) -> tuple[int, dict | None]:
    """A blocking FHIR request (for tests to check what the server holds): status and JSON body."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Accept": "application/fhir+json",
                                          "Content-Type": "application/fhir+json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as answer:
            status, raw = answer.status, answer.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    return status, (json.loads(raw) if raw.strip() else None)


def reset(base: str):
    """Empty the server (a non-standard operation of this test server only)."""
    status, _ = request("POST", f"{base}/$reset")
    if status >= 300:
        raise RuntimeError(f"$reset answered HTTP {status}")


@pytest.fixture(scope="session")
def fhir_server():
    """The base URL of a running FHIR R4 test server, shared by the whole session."""
    if not START.is_file():
        _unavailable(f"the shared FHIR test server is not beside this checkout "
                     f"(shared/tools/fhir-test-server/{START.name} missing)")
    server = FHIRTestServer()
    try:
        base = server.start()
    except RuntimeError as e:
        server.stop()
        _unavailable(str(e))
    try:
        yield base
    finally:
        server.stop()


# -- a scriptable stand-in, for answers the real server never gives -----------------------------

HANG = "hang"    # take the request and never answer
STALL = "stall"  # answer the status line and headers, part of the body, then nothing more
CLOSE = "close"  # take the request and drop the connection without a word


@dataclass
class Reply:
    code: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Seen:
    """A request as the fake server got it; header names lower-case."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def form(self) -> dict[str, str]:
        return {k: v[-1] for k, v in parse_qs(self.body.decode("ascii"), strict_parsing=True).items()}


class _Routes(resource.Resource):
    isLeaf = True

    def __init__(self, server: FakeHTTPServer):
        super().__init__()
        self.server = server

    def render(self, request: http.Request):
        seen = Seen(request.method.decode(), request.path.decode(),
                    {k.decode().lower(): v[-1].decode("latin-1")
                     for k, v in request.requestHeaders.getAllRawHeaders()},
                    request.content.read())
        self.server.requests.append(seen)
        step = self.server.next_reply(seen)
        if step == HANG:
            return server.NOT_DONE_YET
        if step == CLOSE:
            request.channel.transport.abortConnection()
            return server.NOT_DONE_YET
        if step == STALL:
            request.setHeader(b"Content-Length", b"1000")
            request.write(b"{")
            return server.NOT_DONE_YET
        request.setResponseCode(step.code)
        for name, value in step.headers.items():
            request.setHeader(name.encode(), value.encode())
        return step.body


class _Tracking(policies.WrappingFactory):
    """Knows its open connections, so that stopping can close them and wait until they are gone."""

    def __init__(self, wrapped):
        super().__init__(wrapped)
        self._idle: list[defer.Deferred] = []
        self.opened = 0

    def registerProtocol(self, p):
        super().registerProtocol(p)
        self.opened += 1

    def unregisterProtocol(self, p):
        super().unregisterProtocol(p)
        if not self.protocols:
            waiters, self._idle = self._idle, []
            for d in waiters:
                d.callback(None)

    def all_closed(self) -> defer.Deferred:
        if not self.protocols:
            return defer.succeed(None)
        d = defer.Deferred()
        self._idle.append(d)
        return d


class FakeHTTPServer:
    """An HTTP(S) server on 127.0.0.1 in the test's own reactor, answering from scripts.

    ``script[path]`` is a list of Reply/HANG/STALL consumed one per request (or a
    callable taking a Seen); ``default`` answers when a path's list is empty.
    Every request is kept in ``requests``.
    """

    def __init__(self, *, tls=None, default: Reply | None = None, reactor_=None):
        from twisted.internet import reactor as default_reactor

        self.reactor = reactor_ or default_reactor
        self.tls = tls
        self.default = default or Reply(200, b'{"resourceType":"Bundle","type":"transaction-response"}',
                                        {"Content-Type": "application/fhir+json"})
        self.script: dict[str, list | Callable[[Seen], Reply]] = {}
        self.requests: list[Seen] = []
        site = server.Site(_Routes(self))
        site.noisy = False
        site.log = lambda request: None
        self._factory = _Tracking(site)
        self._factory.noisy = False
        self._port = None

    def start(self, port: int = 0) -> FakeHTTPServer:
        """Listen (again, on the same port after `stop`, to play a server coming back)."""
        if self.tls is None:
            self._port = self.reactor.listenTCP(port, self._factory, interface="127.0.0.1")
        else:
            self._port = self.reactor.listenSSL(port, self._factory, self.tls, interface="127.0.0.1")
        return self

    @property
    def port(self) -> int:
        return self._port.getHost().port

    def url(self, path: str = "/fhir", host: str = "127.0.0.1") -> str:
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}{path}"

    def next_reply(self, seen: Seen):
        steps = self.script.get(seen.path)
        if callable(steps):
            return steps(seen)
        return steps.pop(0) if steps else self.default

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    @property
    def connections(self) -> int:
        """How many connections clients have opened so far."""
        return self._factory.opened

    def stop(self) -> defer.Deferred:
        """Close every connection and the listening port; fires when all are gone."""
        async def stopping():
            for p in list(self._factory.protocols):
                p.transport.abortConnection()
            await self._port.stopListening()
            await self._factory.all_closed()
        return defer.ensureDeferred(stopping())

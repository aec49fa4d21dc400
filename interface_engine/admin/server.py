"""The admin HTTP server: every request judged from its headers before its body is read.

`AdminRequest.gotLength` runs once the headers are in and before any of the body:
it finds who is asking (bearer token or session cookie, see auth.Gate), looks up
the route, and refuses there and then (401, 403, 404, 413) by writing the answer
and closing the connection, so an unauthenticated upload is never read. Allowed
requests go on to `AdminResource.render`, which calls the route's handler
(api.py) and writes its result as JSON. Errors are JSON with a message, never a
stack trace.
"""

from __future__ import annotations

import hmac
import json
import re
from dataclasses import dataclass
from http import HTTPStatus
from typing import Callable
from urllib.parse import parse_qs

from twisted.application import service
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.web import resource, server

from ..audit import FAILURE
from .auth import Gate, Principal

log = Logger()

#: Bodies of the login form: small, as it is read before anyone is known.
LOGIN_MAX_BODY = 4096
JSON_TYPE = b"application/json"


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Route:
    method: bytes
    path: str                           # as documented, e.g. /api/v1/messages/{id}
    pattern: re.Pattern
    role: str | None                    # None: open (health checks, the login form)
    handler: Callable
    #: a state change: a session must prove it with its CSRF token (bearer tokens need not)
    changes: bool = False
    max_body: int | None = None         # None: the server's max_body


def route(method: str, path: str, role: str | None, handler, *, changes=False, max_body=None) -> Route:
    regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path)
    return Route(method.encode(), path, re.compile(f"^{regex}$"), role, handler, changes, max_body)


class AdminRequest(server.Request):
    principal: Principal | None = None
    refused = False

    def gotLength(self, length):
        site: AdminSite = self.channel.site
        # The method and path are still the channel's: the request learns them only
        # once its body has been read, which is what this check must come before.
        method, path = self.channel._command, self.channel._path.split(b"?", 1)[0]
        found, params = site.match(method, path)
        chunked = length is None and self.requestHeaders.hasHeader(b"transfer-encoding")
        self.principal = site.gate.principal(self.requestHeaders.getRawHeaders(b"authorization", [None])[0],
                                             self.getCookie(Gate.COOKIE))
        problem = None
        if found is None:
            problem = (HTTPStatus.NOT_FOUND if params is None else HTTPStatus.METHOD_NOT_ALLOWED,
                       "no such endpoint" if params is None else "method not allowed here")
        elif found.role is not None and self.principal is None:
            site.refused(self, "no valid credentials")
            problem = (HTTPStatus.UNAUTHORIZED, "log in, or send Authorization: Bearer <token>")
        elif found.role is not None and not self.principal.may(found.role):
            site.denied(self, found)
            problem = (HTTPStatus.FORBIDDEN, f"your role ({self.principal.role}) may not do this; "
                                             f"it needs {found.role}")
        elif chunked or (length or 0) > (found.max_body or site.max_body):
            problem = (HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                       f"the body must have a Content-Length of at most {found.max_body or site.max_body} bytes")
        if problem is not None:
            self.refuse(*problem)
            return
        self.route, self.params = found, params
        super().gotLength(length)

    def refuse(self, status: HTTPStatus, message: str):
        """Answer now and close: the body, if any, is never read."""
        self.refused = True
        body = json.dumps({"error": message}).encode()
        head = [f"HTTP/1.1 {status.value} {status.phrase}", "Content-Type: application/json",
                f"Content-Length: {len(body)}", "Connection: close", "Cache-Control: no-store"]
        if status == HTTPStatus.UNAUTHORIZED:
            head.append('WWW-Authenticate: Bearer realm="interface-engine"')
        self.channel.transport.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        self.channel.transport.loseConnection()
        self.content = _Discard()

    def requestReceived(self, command, path, version):
        if not self.refused:
            super().requestReceived(command, path, version)


class _Discard:
    """Where the bytes of a refused request's body go, should any arrive before the close."""

    def write(self, data):
        pass

    def seek(self, *args):
        pass

    def read(self, *args):
        return b""

    def close(self):
        pass


class AdminResource(resource.Resource):
    isLeaf = True

    def __init__(self, site: AdminSite):
        super().__init__()
        self.site = site

    def render(self, request: AdminRequest):
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        found: Route = request.route
        principal = request.principal
        if found.changes and principal is not None and principal.kind == "session":
            header = request.getHeader(b"x-csrf-token")
            sent = header.decode("latin-1") if header else _form(request).get("csrf", "")
            if not sent or not hmac.compare_digest(sent, principal.csrf):
                self.site.denied(request, found, why="missing or wrong CSRF token")
                return self._error(request, HTTPStatus.FORBIDDEN, "missing or wrong CSRF token")
        d = defer.maybeDeferred(found.handler, request, **request.params)
        d.addCallbacks(lambda result: self._answer(request, result),
                       lambda failure: self._failed(request, failure))
        return server.NOT_DONE_YET

    def _answer(self, request, result):
        if request._disconnected:
            return
        if isinstance(result, Raw):
            request.setResponseCode(result.status)
            request.setHeader(b"content-type", result.content_type)
            for name, value in result.headers:
                request.setHeader(name, value)
            request.write(result.body)
        else:
            request.setHeader(b"content-type", JSON_TYPE)
            request.write(json.dumps(result, default=str).encode())
        request.finish()

    def _failed(self, request, failure):
        if failure.check(ApiError):
            return self._finish_error(request, failure.value.status, str(failure.value))
        log.error("admin {method} {path} failed: {error}", method=request.method.decode(),
                  path=request.path.decode("latin-1"), error=failure.getErrorMessage().splitlines()[0]
                  if failure.getErrorMessage() else failure.type.__name__)
        return self._finish_error(request, 500, "internal error; the engine's log says more")

    def _finish_error(self, request, status, message):
        if request._disconnected:
            return
        request.write(self._error(request, status, message))
        request.finish()

    @staticmethod
    def _error(request, status, message) -> bytes:
        request.setResponseCode(int(status))
        request.setHeader(b"content-type", JSON_TYPE)
        return json.dumps({"error": message}).encode()


@dataclass(frozen=True)
class Raw:
    body: bytes
    content_type: bytes
    status: int = 200
    headers: tuple = ()


def _form(request) -> dict[str, str]:
    """A urlencoded form body as {name: first value}."""
    if not (request.getHeader(b"content-type") or b"").startswith(b"application/x-www-form-urlencoded"):
        return {}
    request.content.seek(0)
    return {k: v[0] for k, v in parse_qs(request.content.read().decode("utf-8", "replace")).items()}


def json_body(request) -> dict:
    request.content.seek(0)
    try:
        body = json.loads(request.content.read() or b"{}")
    except ValueError:
        raise ApiError(400, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


class AdminSite(server.Site):
    requestFactory = AdminRequest
    noisy = False

    def __init__(self, routes: list[Route], gate: Gate, max_body: int, audit, refusals):
        self.routes, self.gate, self.max_body = routes, gate, max_body
        self.audit, self.refusals = audit, refusals
        super().__init__(AdminResource(self))
        self.displayTracebacks = False

    def log(self, request):
        """No access log: paths can carry search terms (patient identifiers among them)."""

    def match(self, method: bytes, path: bytes) -> tuple[Route | None, dict | None]:
        """(route, its path parameters); (None, {}) if the path exists for other methods."""
        text = path.decode("latin-1")
        elsewhere = None
        for r in self.routes:
            m = r.pattern.match(text)
            if m:
                if r.method == method or (method == b"HEAD" and r.method == b"GET"):
                    return r, m.groupdict()
                elsewhere = {}
        return None, elsewhere

    def refused(self, request, why: str):
        self.refusals("admin", _peer(request), why)

    def denied(self, request, found: Route, why: str | None = None):
        principal = request.principal
        detail = {"role": principal.role, "needs": found.role} | ({"reason": why} if why else {})
        d = threads.deferToThread(
            self.audit.record, "access.denied", actor=principal.actor, object_type="endpoint",
            object_id=f"{self.channel_command(request)} {found.path}",
            source=_peer(request), outcome=FAILURE, detail=detail)
        d.addErrback(lambda f: log.error("could not audit a denied request: {error}", error=f.getErrorMessage()))

    @staticmethod
    def channel_command(request) -> str:
        command = getattr(request.channel, "_command", None) or request.method
        return command.decode("latin-1")


def _peer(request) -> str:
    address = request.getClientAddress()
    return getattr(address, "host", "unknown")


class AdminService(service.Service):
    """Binds the admin site on `[admin]` host and port (TLS when configured)."""

    name = "admin"

    def __init__(self, config, site: AdminSite, reactor):
        self.config, self.site, self.reactor = config, site, reactor
        self.port = None

    def startService(self):
        super().startService()
        config = self.config
        factory = self.site
        if config.tls is not None:
            from twisted.protocols.tls import TLSMemoryBIOFactory

            from ..tls import ServerConnectionCreator

            factory = TLSMemoryBIOFactory(ServerConnectionCreator(config.tls), False, self.site)
        self.port = self.reactor.listenTCP(config.port, factory, interface=config.host)
        scheme = "https" if config.tls is not None else "http"
        log.info("admin listening on {scheme}://{host}:{port}", scheme=scheme, host=config.host,
                 port=self.port.getHost().port)

    def stopService(self):
        super().stopService()
        if self.port is not None:
            return self.port.stopListening()

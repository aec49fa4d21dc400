"""Deliver FHIR transaction Bundles to a FHIR server's base URL over HTTP(S).

One POST per `deliver`; the server's answer decides the Result:

- 2xx: delivered (a transaction is all or nothing, so 2xx means every entry);
- 401: the cached access token is dropped, retried with a fresh one;
- 408, 429, 5xx: retried, honouring Retry-After through `Result.retry_after`;
- other 4xx: the Bundle itself is wrong; sending it again cannot help (retry=False),
  the error quotes the first OperationOutcome issue (cut short);
- no answer (refused, reset, DNS, TLS, past the deadline): retried.

TLS is always verified, host name included, against the system's trust store or
`ca_file` for a private CA; there is deliberately no switch to turn that off.
The attempt's deadline (`timeout`) covers everything: fetching an access token,
connecting, sending and reading the whole answer.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from functools import partial
from urllib.parse import urlsplit

from OpenSSL import SSL, crypto
from twisted.internet import defer, error, ssl
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss

from treq.client import HTTPClient

from .auth import Answer, Auth, AuthError, Headerdict, TransportError, is_loopback, retry_after
from .base import Destination, Result, one_line

log = Logger()

MAX_RESPONSE = 1024 * 1024  # kept of an answer; the rest is read and dropped
_FHIR_JSON = b"application/fhir+json"
_RETRYABLE_4XX = frozenset({408, 429})
# Below common server keep-alive timeouts (5 s for Node and Apache), so that a
# kept connection is rarely one the server is just closing: a POST on such a
# connection fails instead of being resent.
_IDLE_CONNECTION = 4.0


class _BodyReader(Protocol):
    """Reads a whole answer, keeping its first `limit` bytes; cancelling drops the connection."""

    def __init__(self, limit: int):
        self.limit = limit
        self.chunks: list[bytes] = []
        self.kept = 0
        self.done: defer.Deferred[bytes] = defer.Deferred(canceller=self._cancel)

    def dataReceived(self, data: bytes):
        room = self.limit - self.kept
        if room > 0:
            self.chunks.append(data[:room])
            self.kept += min(room, len(data))

    def connectionLost(self, reason=connectionDone):
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)

    def _cancel(self, d):
        if self.transport is not None:
            self.transport.stopProducing()


class FHIRDestination(Destination):
    """A FHIR server taking transaction Bundles at its base URL. One request at a time."""

    idempotent = True  # the Bundles are PUTs by deterministic ids

    def __init__(self, name: str, base_url: str, *, auth: Auth | None = None,
                 timeout: float = 30.0, ca_file: str | None = None, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url: expected an http:// or https:// base URL, got {base_url!r}")
        if parts.username or parts.password:
            raise ValueError("url: credentials do not belong in the URL; use auth")
        if parts.query or parts.fragment:
            raise ValueError("url: a FHIR base URL has no query or fragment")
        if timeout <= 0:
            raise ValueError(f"timeout: expected a positive number of seconds, got {timeout!r}")
        self.name = name
        self.url = base_url.rstrip("/")
        self.auth = auth if auth is not None else Auth()
        self.timeout = timeout
        if parts.scheme == "http" and not is_loopback(parts.hostname):
            if type(self.auth) is not Auth:
                raise ValueError("url: credentials would be sent in clear over http://; use https://")
            log.warn("destination {name}: {url} is plain http: messages travel unencrypted",
                     name=name, url=self.url)
        policy = BrowserLikePolicyForHTTPS(trustRoot=_trust_root(ca_file))
        self._reactor = reactor
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 1
        self._pool.cachedConnectionTimeout = _IDLE_CONNECTION
        self._pool.retryAutomatically = False
        agent = Agent(reactor, contextFactory=policy, pool=self._pool, connectTimeout=timeout)
        self._http = HTTPClient(agent)
        self._pending: defer.Deferred | None = None
        self._closing = False

    def deliver(self, payload: bytes, target: str | None = None) -> defer.Deferred[Result]:
        """POST one transaction Bundle to the base URL; `target` is not used (the base is the target)."""
        self._closing = False
        return self._one_at_a_time(lambda: self._attempt(payload))

    async def _attempt(self, payload: bytes) -> Result:
        deadline = self._reactor.seconds() + self.timeout
        try:
            headers = await self.auth.headers(partial(self._post, deadline=deadline))
            headers[b"Content-Type"] = [_FHIR_JSON]
            headers[b"Accept"] = [_FHIR_JSON]
            answer = await self._post(self.url, headers, payload, deadline=deadline)
        except AuthError as e:
            return Result(ok=False, error=str(e), retry=True, retry_after=e.retry_after)
        except TransportError as e:
            return Result(ok=False, error=str(e), retry=True)
        return self._judge(answer)

    async def _post(self, url: str, headers: Headerdict, body: bytes, *, deadline: float) -> Answer:
        """One POST and its whole answer before `deadline`, or TransportError."""
        try:
            response = await self._within(
                self._http.post(url, data=body, headers=headers, allow_redirects=False,
                                unbuffered=True, reactor=self._reactor), deadline)
            if response.length == 0:
                content = b""
            else:
                reader = _BodyReader(MAX_RESPONSE)
                response.deliverBody(reader)
                content = await self._within(reader.done, deadline)
        except TransportError:
            raise
        except error.TimeoutError:  # the connect timeout, which is the same deadline
            raise TransportError(f"no answer within {self.timeout:g}s") from None
        except Exception as e:
            raise TransportError(_describe(e, url)) from None
        return Answer(response.code, _phrase(response.code, response.phrase), response.headers, content)

    async def _within(self, d: defer.Deferred, deadline: float):
        """Await `d`, cancelling it at the deadline or on close, and say which one ended it.

        twisted.web wraps a cancellation in its own errors (ResponseNeverReceived,
        ConnectingCancelledError...), so the reason is kept here rather than read back.
        """
        expired = []

        def expire():
            expired.append(True)
            d.cancel()

        call = self._reactor.callLater(max(0.0, deadline - self._reactor.seconds()), expire)
        self._pending = d
        try:
            return await d
        except Exception:
            if expired:
                raise TransportError(f"no answer within {self.timeout:g}s") from None
            if self._closing:
                raise TransportError("destination closed during the exchange") from None
            raise
        finally:
            self._pending = None
            if call.active():
                call.cancel()

    def _judge(self, answer: Answer) -> Result:
        code = answer.code
        if 200 <= code < 300:
            return Result(ok=True, response=answer.body)
        if code == 401:
            self.auth.invalidate()
            return Result(ok=False, response=answer.body, error="HTTP 401: not authorised", retry=True)
        reason = _issue_text(answer.body) or one_line(answer.phrase) or "(no reason given)"
        text = f"HTTP {code}: {reason}"
        if code in _RETRYABLE_4XX or code >= 500:
            return Result(ok=False, response=answer.body, error=text, retry=True,
                          retry_after=retry_after(answer.headers))
        if 400 <= code < 500:
            return Result(ok=False, response=answer.body, error=text, retry=False)
        # 1xx/3xx: redirects are not followed (a POST must not be re-sent elsewhere silently).
        moved = code in (301, 308)
        return Result(ok=False, response=answer.body, retry=not moved,
                      error=f"HTTP {code}: unexpected answer to a transaction"
                            + ("; the base URL has moved" if moved else ""))

    def close(self) -> defer.Deferred[None]:
        """Abandon an exchange in flight and close kept connections; safe to call again."""
        if self._pending is not None:
            self._closing = True
            self._pending.cancel()
        return self._pool.closeCachedConnections()


def _phrase(code: int, sent) -> str:
    """The standard reason phrase (servers send odd ones, HTTP/2 none), else the one sent."""
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return sent.decode("latin-1") if isinstance(sent, bytes) else ""


def _trust_root(ca_file: str | None):
    """The CA certificates to trust: a PEM bundle for a private CA, or None for the system's."""
    if ca_file is None:
        return None
    try:
        with open(ca_file, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"ca_file: cannot read {ca_file}: {e.strerror or type(e).__name__}") from None
    from cryptography import x509

    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError(f"ca_file: {ca_file} holds no PEM certificate") from None
    return ssl.trustRootFromCertificates(
        [ssl.Certificate(crypto.X509.from_cryptography(c)) for c in certificates])


def _issue_text(body: bytes) -> str:
    """The first OperationOutcome issue's diagnostics (or details.text) and where, one line, ≤ 200 chars."""
    try:
        outcome = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return ""
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        return ""
    issues = outcome.get("issue")
    if not isinstance(issues, list):
        return ""
    for issue in issues:
        if not isinstance(issue, dict):
            continue
        text = issue.get("diagnostics")
        if not isinstance(text, str) or not text.strip():
            details = issue.get("details")
            text = details.get("text") if isinstance(details, dict) else None
        if isinstance(text, str) and text.strip():
            where = issue.get("expression") or issue.get("location")
            if isinstance(where, list) and where and isinstance(where[0], str) and where[0].strip():
                # Where in the Bundle, e.g. Bundle.entry[2].resource.status: a path, not content.
                where = one_line(where[0], 80)
                return f"{one_line(text, 200 - len(where) - 3)} ({where})"
            return one_line(text, 200)
    return ""


def _causes(e: BaseException) -> list[BaseException]:
    """The exception and the low-level reasons twisted.web wraps inside it."""
    found = [e]
    for reason in getattr(e, "reasons", None) or ():
        value = getattr(reason, "value", reason)
        if isinstance(value, BaseException):
            found.extend(_causes(value))
    return found


def _describe(e: BaseException, url: str) -> str:
    """One line saying why an exchange got no answer, naming host and port, never content."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    address = f"{host}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
    causes = _causes(e)
    for c in causes:
        if isinstance(c, error.ConnectionRefusedError):
            return f"connection refused by {address}"
        if isinstance(c, error.DNSLookupError):
            return f"cannot resolve {host}"
        if isinstance(c, SSL.Error):
            text = str(c)
            if "certificate verify failed" in text:
                return f"TLS certificate verification failed for {address}: not signed by a trusted CA"
            return f"TLS handshake with {address} failed: {one_line(text, 120)}"
        if type(c).__module__.startswith("service_identity"):
            return f"TLS certificate verification failed for {address}: it is not for {host}"
    for c in causes:
        if isinstance(c, (error.ConnectionLost, error.ConnectionDone, PotentialDataLoss)):
            return f"connection to {address} closed before the whole answer"
        if isinstance(c, error.ConnectError):
            return f"cannot connect to {address}: {one_line(str(c), 120)}"
    return f"exchange with {address} failed ({type(causes[-1]).__name__})"

"""How an HTTP destination proves who it is: no auth, a static bearer token, or an
OAuth 2.0 access token got by client credentials or SMART Backend Services.

A strategy gives the headers for one request (`headers`), fetching and caching
an access token when it needs one, and forgets that token when the server
answers 401 (`invalidate`), so the next attempt gets a fresh one. The token
request goes through the destination's own HTTP client (the `post` callable),
so it shares its TLS settings and its per-attempt deadline.

Secrets (client secret, private key, static token) are resolved from env:/file:
references when the strategy is made and never appear in errors or logs; nor
do access tokens or the token endpoint's answers.
"""

from __future__ import annotations

import base64
import email.utils
import ipaddress
import json
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timezone
from urllib.parse import quote_plus, urlencode, urlsplit

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from .. import secrets
from .base import one_line

log = Logger()

Headerdict = dict[bytes, list[bytes]]

# RFC 6750 b64token, loosened to any visible ASCII: anything else could split a header.
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")
_OAUTH_ERROR_CODE = re.compile(r"[\x20-\x21\x23-\x5b\x5d-\x7e]{1,64}")  # RFC 6749 §5.2
_DEFAULT_LIFETIME = 300.0  # when the token endpoint does not say (expires_in is only RECOMMENDED)
_ASSERTION_LIFETIME = 240  # SMART: exp at most 5 minutes ahead; leave room for clock skew
_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_FORM = b"application/x-www-form-urlencoded"


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP answer as the destination's client read it: the body is at most its first MiB."""

    code: int
    phrase: str
    headers: Headers
    body: bytes


class TransportError(Exception):
    """No HTTP answer at all (refused, reset, TLS, timeout); the text is one line, safe to record."""


class AuthError(Exception):
    """No access token for this attempt; the text is one line without secrets. Always retryable."""

    def __init__(self, text: str, retry_after: float | None = None):
        super().__init__(text)
        self.retry_after = retry_after


Post = Callable[[str, Headerdict, bytes], Awaitable[Answer]]


def retry_after(headers: Headers, now: float | None = None) -> float | None:
    """Seconds asked for by a Retry-After header (delay-seconds or HTTP-date), None if absent or bad."""
    values = headers.getRawHeaders(b"retry-after")
    if not values:
        return None
    value = values[-1].decode("latin-1").strip()
    if value.isascii() and value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)  # HTTP-dates are GMT
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def is_loopback(host: str | None) -> bool:
    """Whether a host is this machine, the only place where plain http may carry credentials."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


class Auth:
    """No authentication; the base of the others."""

    async def headers(self, post: Post) -> Headerdict:
        """Headers to add to the next request; `post` sends a form to a token endpoint if needed."""
        return {}

    def invalidate(self) -> None:
        """The server refused our credentials (401): drop whatever is cached."""


NoAuth = Auth


class BearerToken(Auth):
    """A long-lived token issued out of band, sent as it is."""

    def __init__(self, token_ref: str):
        token = secrets.resolve(token_ref, what="auth.token")
        if not _TOKEN_CHARS.fullmatch(token):
            raise secrets.SecretError("auth.token: the token has characters not allowed in a header")
        self._header = {b"Authorization": [b"Bearer " + token.encode("ascii")]}

    async def headers(self, post: Post) -> Headerdict:
        return dict(self._header)


class _TokenGrant(Auth):
    """An OAuth 2.0 access token from a token endpoint, cached until shortly before it expires."""

    def __init__(self, token_url: str, client_id: str, scope: str | None, clock=None):
        parts = urlsplit(token_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"auth.token_url: expected an https:// URL, got {token_url!r}")
        if parts.scheme == "http" and not is_loopback(parts.hostname):
            raise ValueError("auth.token_url: credentials would be sent in clear over http://; use https://")
        if not client_id:
            raise ValueError("auth.client_id: required")
        if clock is None:
            from twisted.internet import reactor as clock
        self.token_url = token_url
        self.client_id = client_id
        self.scope = scope
        self._clock = clock
        self._token: bytes | None = None
        self._renew_at = 0.0

    async def headers(self, post: Post) -> Headerdict:
        if self._token is None or self._clock.seconds() >= self._renew_at:
            await self._fetch(post)
        return {b"Authorization": [b"Bearer " + self._token]}

    def invalidate(self) -> None:
        self._token = None

    def _request(self) -> tuple[Headerdict, dict[str, str]]:
        """The extra headers and the form fields of one token request."""
        raise NotImplementedError

    async def _fetch(self, post: Post):
        self._token = None
        headers, fields = self._request()
        headers[b"Content-Type"] = [_FORM]
        headers[b"Accept"] = [b"application/json"]
        try:
            answer = await post(self.token_url, headers, urlencode(fields).encode("ascii"))
        except TransportError as e:
            raise AuthError(f"token endpoint: {e}") from None
        if not 200 <= answer.code < 300:
            raise AuthError(f"token endpoint answered HTTP {answer.code}{_oauth_error(answer.body)}",
                            retry_after(answer.headers) if answer.code in (429, 503) else None)
        token, lifetime = _token_response(answer.body)
        fetched = self._clock.seconds()
        self._token = token
        self._renew_at = fetched + lifetime - min(60.0, lifetime * 0.1)
        log.info("access token from {url}, valid for {lifetime:g}s", url=self.token_url,
                 lifetime=lifetime)


def _oauth_error(body: bytes) -> str:
    """': code (description)' from an RFC 6749 error answer, or '' when there is none."""
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(data, dict) or not isinstance(data.get("error"), str):
        return ""
    code = data["error"]
    if not _OAUTH_ERROR_CODE.fullmatch(code):
        return ""
    text = data.get("error_description")
    return f": {code}" + (f" ({one_line(text, 100)})" if isinstance(text, str) and text.strip() else "")


def _token_response(body: bytes) -> tuple[bytes, float]:
    """The access token and its lifetime in seconds from a successful token answer.

    Errors say what is wrong but never quote the body: it holds the token.
    """
    try:
        data = json.loads(body)
    except ValueError:
        raise AuthError("token endpoint: the answer is not JSON") from None
    if not isinstance(data, dict):
        raise AuthError("token endpoint: the answer is not a JSON object")
    token = data.get("access_token")
    if not isinstance(token, str) or not _TOKEN_CHARS.fullmatch(token):
        raise AuthError("token endpoint: no usable access_token in the answer")
    kind = data.get("token_type")
    if not isinstance(kind, str) or kind.lower() != "bearer":
        raise AuthError("token endpoint: token_type is not Bearer")
    lifetime = data.get("expires_in", _DEFAULT_LIFETIME)
    if isinstance(lifetime, str) and lifetime.isascii() and lifetime.isdigit():  # sent as a string
        lifetime = int(lifetime)
    if isinstance(lifetime, bool) or not isinstance(lifetime, (int, float)):
        raise AuthError("token endpoint: expires_in is not a number")
    return token.encode("ascii"), max(0.0, float(lifetime))


class ClientCredentials(_TokenGrant):
    """OAuth 2.0 client credentials grant with the secret sent by HTTP Basic (RFC 6749 §2.3.1)."""

    def __init__(self, token_url: str, client_id: str, client_secret_ref: str,
                 scope: str | None = None, *, clock=None):
        super().__init__(token_url, client_id, scope, clock)
        secret = secrets.resolve(client_secret_ref, what="auth.client_secret")
        # §2.3.1: each part form-urlencoded before joining, so a ':' in the id cannot mislead.
        pair = f"{quote_plus(client_id)}:{quote_plus(secret)}".encode("ascii")
        self._basic = b"Basic " + base64.b64encode(pair)

    def _request(self):
        fields = {"grant_type": "client_credentials"}
        if self.scope:
            fields["scope"] = self.scope
        return {b"Authorization": [self._basic]}, fields


_ALGORITHMS = {"RS384": rsa.RSAPrivateKey, "ES384": ec.EllipticCurvePrivateKey}


class SmartBackendServices(_TokenGrant):
    """SMART Backend Services: client credentials with a signed JWT assertion instead of a secret.

    The private key stays here; the server holds the public key (usually from
    our JWKS), so nothing reusable crosses the wire.
    """

    def __init__(self, token_url: str, client_id: str, private_key_ref: str,
                 key_id: str | None = None, algorithm: str = "RS384",
                 scope: str = "system/*.write", *, clock=None):
        super().__init__(token_url, client_id, scope, clock)
        if algorithm not in _ALGORITHMS:
            raise ValueError(f"auth.algorithm: expected RS384 or ES384, got {algorithm!r}")
        self.algorithm = algorithm
        self.key_id = key_id
        pem = secrets.resolve(private_key_ref, what="auth.private_key")
        try:
            key = serialization.load_pem_private_key(pem.encode("utf-8"), password=None)
        except (ValueError, TypeError):
            raise secrets.SecretError("auth.private_key: not an unencrypted PEM private key") from None
        except Exception as e:  # cryptography's unsupported-algorithm errors, among others
            raise secrets.SecretError(f"auth.private_key: cannot load the key ({type(e).__name__})") from None
        if not isinstance(key, _ALGORITHMS[algorithm]):
            raise secrets.SecretError(f"auth.private_key: not a key for {algorithm} "
                                      f"({'an RSA' if algorithm == 'RS384' else 'a P-384 EC'} key is needed)")
        if algorithm == "ES384" and not isinstance(key.curve, ec.SECP384R1):
            raise secrets.SecretError(f"auth.private_key: ES384 needs a P-384 key, not {key.curve.name}")
        if algorithm == "RS384" and key.key_size < 2048:
            raise secrets.SecretError(f"auth.private_key: a {key.key_size}-bit RSA key is too short (2048 at least)")
        self._key = key

    def assertion(self) -> str:
        """A fresh client assertion JWT (RFC 7523), signed with our private key."""
        now = int(self._clock.seconds())
        header = {"alg": self.algorithm, "typ": "JWT"}
        if self.key_id:
            header["kid"] = self.key_id
        claims = {"iss": self.client_id, "sub": self.client_id, "aud": self.token_url,
                  "exp": now + _ASSERTION_LIFETIME, "iat": now,
                  "jti": base64.urlsafe_b64encode(os.urandom(24)).decode("ascii")}
        signing_input = f"{_b64json(header)}.{_b64json(claims)}".encode("ascii")
        if self.algorithm == "RS384":
            signature = self._key.sign(signing_input, padding.PKCS1v15(), hashes.SHA384())
        else:  # JWS wants r || s of fixed width, not the DER that cryptography returns
            r, s = decode_dss_signature(self._key.sign(signing_input, ec.ECDSA(hashes.SHA384())))
            signature = r.to_bytes(48, "big") + s.to_bytes(48, "big")
        return f"{signing_input.decode('ascii')}.{_b64(signature)}"

    def _request(self):
        fields = {"grant_type": "client_credentials", "client_assertion_type": _ASSERTION_TYPE,
                  "client_assertion": self.assertion()}
        if self.scope:
            fields["scope"] = self.scope
        return {}, fields


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64json(value: dict) -> str:
    return _b64(json.dumps(value, separators=(",", ":")).encode("utf-8"))

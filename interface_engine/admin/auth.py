"""Who may use the admin server: users (browser login), API tokens, sessions and roles.

Secrets are stored only as hashes: passwords with scrypt (slow on purpose), API
tokens with SHA-256 (they are long and random, so a fast hash is enough). The
engine keeps the live tokens in memory, refreshed every TOKEN_REFRESH seconds, so
that a request is judged from its headers alone, before its body is read.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

import sqlalchemy as sa

from ..store import utcnow
from ..store.schema import admin_users, api_tokens

#: Each role may do what the ones before it may.
ROLES = ("viewer", "analyst", "operator", "admin")
#: viewer: statistics and metadata; analyst: also message content and channel tests;
#: operator: also replay, pause and resume, dead letters; admin: also users and reload.
TOKEN_PREFIX = "iet"
TOKEN_REFRESH = 2.0
_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_TOKEN = re.compile(rf"{TOKEN_PREFIX}_([0-9a-f]{{8}})_([A-Za-z0-9_-]{{43}})")
_SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1}


class AccountError(Exception):
    """A user or token command that cannot be done; the text says why."""


def rank(role: str) -> int:
    return ROLES.index(role)


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: a logged-in user (with the session's CSRF token) or an API token."""

    name: str
    role: str
    kind: str                      # "session" or "token"
    csrf: str | None = None

    def may(self, role: str) -> bool:
        return rank(self.role) >= rank(role)

    @property
    def actor(self) -> str:
        return f"{'user' if self.kind == 'session' else 'token'}:{self.name}"


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    return "scrypt${n}${r}${p}$".format(**_SCRYPT) + "$".join(
        base64.b64encode(x).decode() for x in (salt, digest))


def check_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        found = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r),
                               p=int(p), dklen=32)
    except (ValueError, TypeError):
        return False
    return kind == "scrypt" and hmac.compare_digest(found, base64.b64decode(digest))


def token_parts(text: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed token, else None."""
    m = _TOKEN.fullmatch(text.strip())
    return (m.group(1), m.group(2)) if m else None


def _secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _check_name(name: str, what: str):
    if not _NAME.fullmatch(name):
        raise AccountError(f"a {what} name is 1 to 64 letters, digits or _.@- ; got {name!r}")


def _check_role(role: str):
    if role not in ROLES:
        raise AccountError(f"role must be one of {', '.join(ROLES)}; got {role!r}")


class Accounts:
    """Users and tokens in the store (blocking: the CLI, or a thread of the engine)."""

    def __init__(self, store):
        self.store = store

    def add_user(self, name: str, role: str, password: str):
        _check_name(name, "user")
        _check_role(role)
        if len(password) < 12:
            raise AccountError("a password needs at least 12 characters")
        with self.store._connect() as conn, conn.begin():
            if conn.execute(sa.select(admin_users.c.name).where(admin_users.c.name == name)).first():
                raise AccountError(f"user {name!r} exists; `interface-engine users passwd` changes "
                                   "the password, `users remove` removes it")
            conn.execute(sa.insert(admin_users).values(name=name, role=role, password_hash=hash_password(password),
                                                       created_at=utcnow()))

    def set_password(self, name: str, password: str):
        if len(password) < 12:
            raise AccountError("a password needs at least 12 characters")
        self._one(sa.update(admin_users).where(admin_users.c.name == name)
                  .values(password_hash=hash_password(password)), f"no user {name!r}")

    def remove_user(self, name: str):
        self._one(sa.delete(admin_users).where(admin_users.c.name == name), f"no user {name!r}")

    def users(self) -> list[dict]:
        with self.store._connect() as conn:
            return [dict(r._mapping) for r in conn.execute(
                sa.select(admin_users.c.name, admin_users.c.role, admin_users.c.created_at)
                .order_by(admin_users.c.name))]

    def verify(self, name: str, password: str) -> str | None:
        """The user's role if the password is right, else None (the same time either way)."""
        with self.store._connect() as conn:
            row = conn.execute(sa.select(admin_users.c.role, admin_users.c.password_hash)
                               .where(admin_users.c.name == name)).first()
        if row is None:
            check_password(password, _DUMMY_HASH)   # no faster answer for an unknown name
            return None
        return row.role if check_password(password, row.password_hash) else None

    def create_token(self, name: str, role: str) -> str:
        """A new token, returned whole this once; only its id and a hash of its secret are kept."""
        _check_name(name, "token")
        _check_role(role)
        token_id, secret = secrets.token_hex(4), secrets.token_urlsafe(32)
        with self.store._connect() as conn, conn.begin():
            conn.execute(sa.insert(api_tokens).values(id=token_id, name=name, role=role,
                                                      secret_hash=_secret_hash(secret), created_at=utcnow()))
        return f"{TOKEN_PREFIX}_{token_id}_{secret}"

    def revoke_token(self, token_id: str):
        self._one(sa.update(api_tokens).where(api_tokens.c.id == token_id, api_tokens.c.revoked_at.is_(None))
                  .values(revoked_at=utcnow()), f"no token {token_id!r} in use")

    def tokens(self) -> list[dict]:
        with self.store._connect() as conn:
            return [dict(r._mapping) for r in conn.execute(
                sa.select(api_tokens.c.id, api_tokens.c.name, api_tokens.c.role, api_tokens.c.created_at,
                          api_tokens.c.revoked_at).order_by(api_tokens.c.created_at))]

    def live_tokens(self) -> dict[str, tuple[str, str, str]]:
        """id -> (name, role, secret hash) of every token not revoked: the engine's in-memory copy."""
        with self.store._connect() as conn:
            rows = conn.execute(sa.select(api_tokens.c.id, api_tokens.c.name, api_tokens.c.role,
                                          api_tokens.c.secret_hash).where(api_tokens.c.revoked_at.is_(None)))
            return {r.id: (r.name, r.role, r.secret_hash) for r in rows}

    def _one(self, statement, missing: str):
        with self.store._connect() as conn, conn.begin():
            if conn.execute(statement).rowcount != 1:
                raise AccountError(missing)


_DUMMY_HASH = hash_password(secrets.token_hex(16))


@dataclass
class Session:
    name: str
    role: str
    csrf: str
    expires: float


class Gate:
    """Judges a request from its headers: a bearer token or a session cookie. Reactor thread only."""

    COOKIE = b"ie_session"

    def __init__(self, session_timeout: float, clock=time.monotonic):
        self.tokens: dict[str, tuple[str, str, str]] = {}
        self.sessions: dict[str, Session] = {}
        self.session_timeout = session_timeout
        self.clock = clock

    def principal(self, authorization: bytes | None, cookie: bytes | None) -> Principal | None:
        if authorization:
            scheme, _, value = authorization.decode("latin-1").partition(" ")
            parts = token_parts(value) if scheme.lower() == "bearer" else None
            if parts is None:
                return None
            found = self.tokens.get(parts[0])
            if found is None or not hmac.compare_digest(found[2], _secret_hash(parts[1])):
                return None
            return Principal(f"{found[0]}({parts[0]})", found[1], "token")
        if cookie:
            session = self.sessions.get(cookie.decode("latin-1"))
            now = self.clock()
            if session is None or session.expires < now:
                self.sessions.pop(cookie.decode("latin-1"), None)
                return None
            session.expires = now + self.session_timeout   # sliding: idle sessions end
            return Principal(session.name, session.role, "session", session.csrf)
        return None

    def open_session(self, name: str, role: str) -> str:
        self._expire()
        session_id = secrets.token_urlsafe(32)
        self.sessions[session_id] = Session(name, role, secrets.token_urlsafe(32),
                                            self.clock() + self.session_timeout)
        return session_id

    def close_session(self, cookie: bytes | None):
        if cookie:
            self.sessions.pop(cookie.decode("latin-1"), None)

    def _expire(self):
        now = self.clock()
        for key in [k for k, s in self.sessions.items() if s.expires < now]:
            del self.sessions[key]

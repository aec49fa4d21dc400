"""The engine's key file: secret keys kept outside the store.

A store copied off the machine must not give away what the keys protect: the
patient index (identifiers are stored only as keyed hashes) and the audit chain
(an edit cannot be re-sealed without the key). The file is JSON, created with
mode 0600 by `interface-engine keys init` or by the first `run`, and never printed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

#: Every purpose gets its own key, so that one can be rotated or leak without the others.
PURPOSES = ("index", "audit")
KEY_BYTES = 32


class KeyFileError(Exception):
    """The key file is missing, unreadable or damaged; the text says what to do."""


@dataclass(frozen=True)
class Keys:
    path: str
    index: bytes
    audit: bytes

    def patient_hash(self, identifier: str, authority: str = "") -> str:
        """The only form in which a patient identifier reaches the store."""
        text = f"{authority.strip().upper()}\x1f{identifier.strip()}".encode()
        return hmac.new(self.index, text, hashlib.sha256).hexdigest()


def _encode(key: bytes) -> str:
    return base64.b64encode(key).decode()


def create(path: str | os.PathLike) -> Keys:
    """Write a new key file; refuses to replace one (its keys may already protect data)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = {"version": 1, "keys": {p: _encode(secrets.token_bytes(KEY_BYTES)) for p in PURPOSES}}
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path}: a key file is already there; it is kept (its keys protect "
                        "stored data)") from None
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return load(path)


def load(path: str | os.PathLike) -> Keys:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no key file; create one with `interface-engine keys init` "
                        "(or start the engine once)") from None
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read the key file: {e.strerror}") from None
    except ValueError:
        raise KeyFileError(f"{path}: the key file is not valid JSON; restore it from a backup") from None
    try:
        found = {p: base64.b64decode(data["keys"][p], validate=True) for p in PURPOSES}
    except (KeyError, TypeError, ValueError):
        raise KeyFileError(f"{path}: the key file lacks a valid key for one of "
                        f"{', '.join(PURPOSES)}; restore it from a backup") from None
    if any(len(k) != KEY_BYTES for k in found.values()):
        raise KeyFileError(f"{path}: a key in the key file has the wrong length; restore it from a backup")
    return Keys(str(path), **found)


def load_or_create(path: str | os.PathLike) -> tuple[Keys, bool]:
    """(keys, created): what `run` uses, so that the quick start needs no extra step."""
    if Path(path).exists():
        return load(path), False
    return create(path), True

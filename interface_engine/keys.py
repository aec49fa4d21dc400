"""The engine's key file: secret keys kept outside the store.

A store copied off the machine must not give away what the keys protect: the
patient index (identifiers are stored only as keyed hashes), the audit chain (an
edit cannot be re-sealed without the key) and the message contents (sealed with
the data keys, see store/cipher.py). The file is JSON, created with mode 0600 by
`interface-engine keys init` or by the first `run`, rewritten only by replacing
it whole, and never printed.

Data keys rotate: `keys rotate` adds one and makes it the key new writes use;
older ones stay until no stored value needs them (`keys retire`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .private_files import replace_private

#: How often a running engine (and its store writer process) looks at the key file:
#: a rotation is taken up within this many seconds.
FILE_POLL = 2.0


def file_stamp(path) -> tuple[int, int, int] | None:
    """What changes when the key file is replaced: compared at each look, not read each time."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino

#: Every purpose gets its own key, so that one can be rotated or leak without the others.
PURPOSES = ("index", "audit")
KEY_BYTES = 32
VERSION = 2


class KeyFileError(Exception):
    """The key file is missing, unreadable or damaged; the text says what to do."""


@dataclass(frozen=True)
class Keys:
    path: str
    index: bytes
    audit: bytes
    #: data key id -> key, oldest first; values in the store name the id they were sealed with
    data: dict[str, bytes] = field(default_factory=dict)
    #: the data key new writes use; None in a key file from before contents were encrypted
    active: str | None = None

    def patient_hash(self, identifier: str, authority: str = "") -> str:
        """The only form in which a patient identifier reaches the store."""
        text = f"{authority.strip().upper()}\x1f{identifier.strip()}".encode()
        return hmac.new(self.index, text, hashlib.sha256).hexdigest()


def _encode(key: bytes) -> str:
    return base64.b64encode(key).decode()


def _new_data_key(document: dict) -> str:
    """Add a data key to a key file's document and make it the active one; returns its id.

    Ids are random, not counted: a key file restored from a backup and rotated again
    cannot give an id that already names another key.
    """
    data = document.setdefault("data", {"active": None, "keys": {}})
    key_id = secrets.token_hex(4)
    while key_id in data["keys"]:
        key_id = secrets.token_hex(4)
    data["keys"][key_id] = {"key": _encode(secrets.token_bytes(KEY_BYTES)),
                            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    data["active"] = key_id
    return key_id


def create(path: str | os.PathLike) -> Keys:
    """Write a new key file; refuses to replace one (its keys may already protect data)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    document = {"version": VERSION,
                "keys": {p: _encode(secrets.token_bytes(KEY_BYTES)) for p in PURPOSES}}
    _new_data_key(document)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path}: a key file is already there; it is kept (its keys protect "
                           "stored data)") from None
    with os.fdopen(fd, "w") as f:
        _dump(document, f)
    return load(path)


def _dump(document: dict, f):
    json.dump(document, f, indent=2)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())


def _read(path: Path) -> dict:
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no key file; create one with `interface-engine keys init` "
                           "(or start the engine once)") from None
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read the key file: {e.strerror}") from None
    except ValueError:
        raise KeyFileError(f"{path}: the key file is not valid JSON; restore it from a backup") from None
    if not isinstance(document, dict):
        raise KeyFileError(f"{path}: the key file is not a key file; restore it from a backup")
    return document


def _decode(path: Path, text) -> bytes:
    try:
        key = base64.b64decode(text, validate=True)
    except (TypeError, ValueError):
        raise KeyFileError(f"{path}: a key in the key file is not valid base64; restore it from a backup") from None
    if len(key) != KEY_BYTES:
        raise KeyFileError(f"{path}: a key in the key file has the wrong length; restore it from a backup")
    return key


def load(path: str | os.PathLike) -> Keys:
    path = Path(path)
    document = _read(path)
    try:
        found = {p: document["keys"][p] for p in PURPOSES}
    except (KeyError, TypeError):
        raise KeyFileError(f"{path}: the key file lacks a valid key for one of "
                           f"{', '.join(PURPOSES)}; restore it from a backup") from None
    found = {p: _decode(path, text) for p, text in found.items()}
    data, active = {}, None
    if "data" in document:
        try:
            entries, active = document["data"]["keys"], document["data"]["active"]
            data = {str(key_id): _decode(path, entry["key"]) for key_id, entry in entries.items()}
        except (KeyError, TypeError, AttributeError):
            raise KeyFileError(f"{path}: the key file's data keys are damaged; restore it from a backup") from None
        if active not in data:
            raise KeyFileError(f"{path}: the key file's active data key {active!r} is not among its "
                               "data keys; restore it from a backup")
    return Keys(str(path), **found, data=data, active=active)


def created_at(path: str | os.PathLike) -> dict[str, str]:
    """When each data key was made, for `keys list`."""
    entries = _read(Path(path)).get("data", {}).get("keys", {})
    return {key_id: entry.get("created", "") for key_id, entry in entries.items()}


def add_data_key(path: str | os.PathLike) -> tuple[Keys, str]:
    """Add a data key for new writes and keep the others for what they sealed; (keys, new id)."""
    path = Path(path)
    load(path)  # refuse to rewrite a damaged file
    document = _read(path)
    key_id = _new_data_key(document)
    document["version"] = VERSION
    replace_private(path, json.dumps(document, indent=2) + "\n")
    return load(path), key_id


def remove_data_key(path: str | os.PathLike, key_id: str) -> Keys:
    """Forget a data key; the caller has made sure that nothing stored needs it."""
    path = Path(path)
    keys = load(path)
    if key_id not in keys.data:
        raise KeyFileError(f"{path}: there is no data key {key_id!r}; `interface-engine keys list` "
                           "shows the ids")
    if key_id == keys.active:
        raise KeyFileError(f"{path}: data key {key_id} is the one new writes use; rotate first "
                           "(`interface-engine keys rotate`)")
    document = _read(path)
    del document["data"]["keys"][key_id]
    replace_private(path, json.dumps(document, indent=2) + "\n")
    return load(path)


def load_or_create(path: str | os.PathLike) -> tuple[Keys, str | None]:
    """What `run` uses, so that the quick start needs no extra step.

    Returns the keys and what was done to the file, if anything: "created", or
    "added a data key" to a key file from before contents were encrypted.
    """
    if not Path(path).exists():
        return create(path), "created"
    keys = load(path)
    if keys.active is None:
        keys, _ = add_data_key(path)
        return keys, "added a data key to"
    return keys, None

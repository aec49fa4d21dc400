"""Secrets named by reference in configuration, never written into it.

A config file is copied, diffed, committed and shown in tickets; a reference
(``env:NAME`` or ``file:/path``) can be, the secret it names cannot. Errors
here name the variable or the path, never a value.
"""

from __future__ import annotations

import os

_PREFIXES = ("env:", "file:")


class SecretError(Exception):
    """A secret reference that cannot be resolved; the text is safe to show."""


def is_reference(value) -> bool:
    """True for ``env:NAME`` or ``file:PATH`` with something after the prefix."""
    return isinstance(value, str) and any(
        value.startswith(p) and len(value) > len(p) for p in _PREFIXES)


def resolve(reference: str, *, what: str) -> str:
    """The secret a reference names, stripped of surrounding white space.

    ``what`` says which setting it is for (e.g. ``auth.client_secret``), so an
    error tells the operator which line of the config to look at.
    """
    if not is_reference(reference):
        raise SecretError(f"{what}: expected a reference such as env:NAME or file:/path, "
                          "not a literal secret")
    kind, _, name = reference.partition(":")
    if kind == "env":
        value = os.environ.get(name)
        if value is None:
            raise SecretError(f"{what}: environment variable {name} is not set")
        value = value.strip()
        if not value:
            raise SecretError(f"{what}: environment variable {name} is empty")
        return value
    path = os.path.expanduser(name)
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read().strip()
    except OSError as e:
        raise SecretError(f"{what}: cannot read {path}: {e.strerror or type(e).__name__}") from None
    except UnicodeDecodeError:
        raise SecretError(f"{what}: {path} is not UTF-8 text") from None
    if not value:
        raise SecretError(f"{what}: {path} is empty")
    return value

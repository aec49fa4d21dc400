"""Files only the engine's user may read, replaced whole: the key file and the audit checkpoint."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def replace_private(path: Path, text: str):
    """Write `text` beside `path` (mode 0600), fsync, rename over it, fsync the folder.

    A crash leaves the old file or the new one, never half of either.
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)

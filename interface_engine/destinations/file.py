"""Deliver a message as a file: whole or not at all, and never over another file.

A reader polling the directory must never see half a message, and a crash must
never leave one behind under the target name. So the bytes go to a hidden temp
file first and reach the target name by ``link``, which fails if the name is
taken. A replay after a crash finds its own earlier file and counts as done.
"""

from __future__ import annotations

import errno
import os
import tempfile

from twisted.internet import defer, threads

from .base import Destination, Result, never_fails

#: Errors that the same attempt will meet again until someone changes the path or the tree.
_PERMANENT = frozenset({errno.ENAMETOOLONG, errno.EISDIR, errno.ENOTDIR})


class FileDestination(Destination):
    idempotent = True  # the same bytes again are "already present"; other bytes never overwrite

    def __init__(self, name: str, *, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self.name = name
        self._reactor = reactor

    def deliver(self, payload: bytes, target: str | None = None) -> defer.Deferred[Result]:
        if not target:
            return defer.succeed(Result(ok=False, error="no target file path", retry=False))
        if "\0" in target:
            return defer.succeed(Result(ok=False, error="target file path contains a NUL byte",
                                        retry=False))
        if not os.path.basename(target):
            return defer.succeed(Result(ok=False, error="target file path names a directory",
                                        retry=False))
        d = threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(),
                                      _write, payload, target)
        return never_fails(d, self.name)


def _write(payload: bytes, target: str) -> Result:
    directory = os.path.dirname(target) or "."
    present = _compare(target, payload)
    if present is not None:
        return present
    try:
        _makedirs(directory)
        # The name is cut so that the temp name stays within NAME_MAX when the target does.
        fd, temp = tempfile.mkstemp(prefix=f".{os.path.basename(target)[:200]}.", suffix=".tmp",
                                    dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.link(temp, target)
        except FileExistsError:
            # Another writer took the name since the check above.
            return _compare(target, payload) or _failed(directory, errno.EEXIST)
        finally:
            os.unlink(temp)
        _fsync_dir(directory)
    except OSError as e:
        return _failed(directory, e.errno, e.strerror)
    return Result(ok=True)


def _compare(target: str, payload: bytes) -> Result | None:
    """None when nothing is at ``target``; otherwise whether what is there is this message."""
    try:
        with open(target, "rb") as f:
            same = os.fstat(f.fileno()).st_size == len(payload) and f.read() == payload
    except FileNotFoundError:
        return None
    except OSError as e:
        return _failed(os.path.dirname(target) or ".", e.errno, e.strerror)
    if same:
        return Result(ok=True, response=b"already present")
    return Result(ok=False, error=f"{os.path.basename(target)} exists with different content",
                  retry=False)


def _makedirs(directory: str):
    """Create the missing directories 0700 (os.makedirs would give the intermediate ones the umask default)."""
    missing = []
    path = os.path.abspath(directory)
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue  # made by a concurrent writer; if it is not a directory, mkstemp says so
        _fsync_dir(os.path.dirname(path))


def _fsync_dir(directory: str):
    """Make a new directory entry survive a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _failed(directory: str, code: int | None, strerror: str | None = None) -> Result:
    reason = strerror or (os.strerror(code) if code else "unknown OS error")
    return Result(ok=False, error=f"{reason} (writing in {directory})", retry=code not in _PERMANENT)

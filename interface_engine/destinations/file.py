"""Deliver a message as a file: whole or not at all, and never over another file.

A reader polling the directory must never see half a message, and a crash must
never leave one behind under the target name. So the bytes go to a hidden temp
file first and reach the target name by ``link``, which fails if the name is
taken. A replay after a crash finds its own earlier file and counts as done.
"""

from __future__ import annotations

import errno
import itertools
import os

from twisted.internet import defer, threads

from .base import Destination, Result, never_fails

#: Errors that the same attempt will meet again until someone changes the path or the tree.
_PERMANENT = frozenset({errno.ENAMETOOLONG, errno.EISDIR, errno.ENOTDIR})


class FileDestination(Destination):
    idempotent = True  # the same bytes again are "already present"; other bytes never overwrite
    #: files handed over at once by the runtime (see deliver_batch)
    batch = 64

    def __init__(self, name: str, *, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self.name = name
        self._reactor = reactor

    def deliver(self, payload: bytes, target: str | None = None) -> defer.Deferred[Result]:
        return self.deliver_batch([(payload, target)]).addCallback(lambda results: results[0])

    def deliver_batch(self, items: list[tuple[bytes, str | None]]) -> defer.Deferred[list[Result]]:
        """Write files in order, with one flush to disk for all of them.

        Stops at the first that fails: the results are for the files up to and
        including that one, and no file after it appears.
        """
        d = threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), _write_all, items)
        return never_fails(d, self.name).addCallback(
            lambda results: results if isinstance(results, list) else [results])


def _refused(target: str | None) -> Result | None:
    if not target:
        return Result(ok=False, error="no target file path", retry=False)
    if "\0" in target:
        return Result(ok=False, error="target file path contains a NUL byte", retry=False)
    if not os.path.basename(target):
        return Result(ok=False, error="target file path names a directory", retry=False)
    return None


class _Staged:
    """A file written under a temp name, waiting to reach its target name."""

    __slots__ = ("payload", "target", "directory", "temp", "fd", "outcome")

    def __init__(self, payload: bytes, target: str, directory: str, temp: str, fd: int):
        self.payload, self.target, self.directory, self.temp, self.fd = payload, target, directory, temp, fd
        self.outcome = Result(ok=True)   # once it has its name


def _write_all(items: list[tuple[bytes, str | None]]) -> list[Result]:
    results: list[Result | _Staged] = []
    staged: list[_Staged] = []
    present: set[str] = set()   # directories seen to exist in this batch
    try:
        for payload, target in items:
            # A file already at the target (a replay's) is found when its name cannot be taken.
            outcome = _refused(target) or _stage(payload, target, present)
            results.append(outcome)
            if isinstance(outcome, _Staged):
                staged.append(outcome)
            elif not outcome.ok:
                break
        failed = _flush(staged)
        if failed is not None:
            return _up_to(results, staged[0], failed)
        done = []
        for file in staged:
            try:
                os.link(file.temp, file.target)
            except FileExistsError:
                there = _compare(file.target, file.payload) or _failed(file.directory, errno.EEXIST)
                if not there.ok:
                    return _up_to(results, file, there)
                file.outcome = there
            except OSError as e:
                return _up_to(results, file, _failed(file.directory, e.errno, e.strerror))
            done.append(file)
        for directory in dict.fromkeys(file.directory for file in done):
            try:
                _fsync_dir(directory)
            except OSError as e:
                first = next(file for file in done if file.directory == directory)
                return _up_to(results, first, _failed(directory, e.errno, e.strerror))
        return [r.outcome if isinstance(r, _Staged) else r for r in results]
    finally:
        for file in staged:
            os.close(file.fd)
            os.unlink(file.temp)


def _up_to(results: list, file: _Staged, failure: Result) -> list[Result]:
    """The results before `file`, then its failure: nothing after it counts as written."""
    head = results[:results.index(file)]
    return [r.outcome if isinstance(r, _Staged) else r for r in head] + [failure]


def _stage(payload: bytes, target: str, present: set[str]) -> _Staged | Result:
    directory, name = os.path.split(target)
    directory = directory or "."
    try:
        if directory not in present:
            _makedirs(directory)
            present.add(directory)
        fd, temp = _create_temp(directory, name)
    except OSError as e:
        return _failed(directory, e.errno, e.strerror)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
    except OSError as e:
        os.close(fd)
        os.unlink(temp)
        return _failed(directory, e.errno, e.strerror)
    return _Staged(payload, target, directory, temp, fd)


_temp_numbers = itertools.count()


def _create_temp(directory: str, name: str) -> tuple[int, str]:
    """A new hidden file beside the target, private, never one that exists (e.g. left by a crash)."""
    # The name is cut so that the temp name stays within NAME_MAX when the target does.
    stem = f"{directory}/.{name[:200]}.{os.getpid()}-"
    for _ in range(100):
        temp = f"{stem}{next(_temp_numbers)}.tmp"
        try:
            return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), temp
        except FileExistsError:
            continue
    raise OSError(errno.EEXIST, "no free temporary file name")


def _flush(staged: list[_Staged]) -> Result | None:
    """Get the staged files' bytes to disk before any takes its name; a failure, or None.

    One file is synced by itself; several are synced with one syncfs per filesystem
    where Linux offers it, which costs about what one fsync does.
    """
    try:
        if len(staged) > 1 and _syncfs is not None:
            devices = {}
            for file in staged:
                devices.setdefault(os.fstat(file.fd).st_dev, file.fd)
            for fd in devices.values():
                _syncfs(fd)
        else:
            for file in staged:
                os.fsync(file.fd)
    except OSError as e:
        return _failed(staged[0].directory, e.errno, e.strerror)
    return None


def _load_syncfs():
    try:
        import ctypes

        call = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None

    def syncfs(fd: int):
        if call(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
    return syncfs


_syncfs = _load_syncfs()


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

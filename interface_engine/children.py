"""The engine's child processes (the channel processor, the store writer): each spoken to over its
stdin and stdout, and each ending when its stdin does."""

from __future__ import annotations

import subprocess


def end(child: subprocess.Popen, wait: float):
    """Close the pipes of `child` so that it finishes what it has and exits; killed after `wait` seconds."""
    for stream in (child.stdin, child.stdout):
        try:
            stream.close()
        except OSError:
            pass
    try:
        child.wait(wait)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()

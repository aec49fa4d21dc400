"""Coverage-guided fuzzing of the framer, the parser and the ACK builder with atheris (libFuzzer).

    python fuzz/run.py TARGET [libFuzzer options] [CORPUS_DIR ...]

TARGET is one of frame, parse, ack (see fuzz/targets.py). Useful options:
`-max_total_time=SECONDS`, `-runs=N`, `-timeout=1` (an input taking longer than a
second is a finding), `-rss_limit_mb=512` (memory bounded). The first CORPUS_DIR
collects the inputs that found new coverage; `fuzz/seeds/` holds small synthetic
seed messages. A finding stops the run with the input saved as crash-* / timeout-*.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

with atheris.instrument_imports(include=["interface_engine"]):
    from fuzz.targets import TARGETS


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options] [CORPUS_DIR ...]")
    target = TARGETS[sys.argv[1]]

    def one_input(data: bytes):
        target(data)

    atheris.Setup([sys.argv[0], *sys.argv[2:]], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

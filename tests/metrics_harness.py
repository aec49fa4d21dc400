"""`interface-engine run` plus one thing for tests: SIGUSR1 writes the engine's metrics to a file.

The admin HTTP server serves the same `Engine.metrics.render()`; this harness lets a
test read what a real engine process measured without depending on it.

    python tests/metrics_harness.py --metrics-file PATH --config engine.toml
"""

import argparse
import os
import signal
from pathlib import Path

from twisted.internet import reactor, threads

from interface_engine import config as config_module, log
from interface_engine.engine import Engine


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--metrics-file", type=Path, required=True)
    parser.add_argument("--config", required=True)
    args = parser.parse_args()
    config = config_module.load(args.config)
    log.start(config.log_level, config.log_format)
    engine = Engine(config, reactor)
    engine.startService()
    reactor.addSystemEventTrigger("before", "shutdown", engine.stopService)

    def write(rendered):
        body, _ = rendered
        part = args.metrics_file.with_name(args.metrics_file.name + ".part")
        part.write_bytes(body)
        os.replace(part, args.metrics_file)   # a reader sees the whole scrape or none

    def dump():
        threads.deferToThread(engine.metrics.render).addCallback(write)

    signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(dump))
    reactor.run()


if __name__ == "__main__":
    main()

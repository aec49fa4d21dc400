"""Logging through twisted.logger: text for people, JSON lines for log shippers.

Events name control ids, message types, peers and row ids, never message content.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone

from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate,
                            formatEvent, globalLogBeginner, textFileLogObserver)

#: Per-message events are built only when someone will read them.
debug_enabled = False

_LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
           "error": LogLevel.error, "critical": LogLevel.critical}


def json_lines_observer(stream):
    def observe(event):
        record = {
            "time": datetime.fromtimestamp(event.get("log_time", 0), timezone.utc).isoformat(),
            "level": event["log_level"].name if "log_level" in event else "info",
            "system": event.get("log_namespace", ""),
            "message": formatEvent(event),
        }
        failure = event.get("log_failure")
        if failure is not None:
            record["error"] = failure.getErrorMessage()
        stream.write(json.dumps(record) + "\n")
        stream.flush()
    return observe


def start(level: str = "info", fmt: str = "text", stream=None):
    global debug_enabled
    debug_enabled = level == "debug"
    stream = stream or sys.stderr
    observer = json_lines_observer(stream) if fmt == "json" else textFileLogObserver(stream)
    predicate = LogLevelFilterPredicate(defaultLogLevel=_LEVELS[level])
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(observer, [predicate])],
                                     redirectStandardIO=False)

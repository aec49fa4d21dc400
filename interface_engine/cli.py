"""The `interface-engine` command.

Every error a user can cause prints one line saying what to do and exits non-zero;
a traceback means a bug in the engine, not in the user's input.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import sys
from pathlib import Path

import click

from . import config as config_module
from .config import DEFAULT_CONFIG, ConfigError

EXIT_USAGE = 2
EXIT_FAILED = 1


class Failure(click.ClickException):
    """A user-facing failure: printed as one line, exit status 1."""

    exit_code = EXIT_FAILED

    def show(self, file=None):
        click.echo(f"error: {self.message}", err=True)


def user_errors(fn):
    """Turn the errors a user can cause into one clear line and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .keys import KeyFileError
        from .mllp.client import MLLPError
        from .store import StoreError

        try:
            return fn(*args, **kwargs)
        except BrokenPipeError:
            # The reader went away (`| head`): nothing left to say to it.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)
        except (ConfigError, StoreError, MLLPError, KeyFileError) as e:
            raise Failure(str(e)) from None
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise Failure(f"{where}{e.strerror or e}") from None
    return wrapper


config_option = click.option(
    "--config", "config_path", default=DEFAULT_CONFIG, envvar="IE_CONFIG", show_default=True,
    type=click.Path(dir_okay=False), help="Engine config file (TOML). Env: IE_CONFIG.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="interface-engine")
def main():
    """An HL7 v2 interface engine: MLLP in, a durable message store, channels out."""


@main.command()
@config_option
@user_errors
def run(config_path):
    """Run the engine in the foreground until SIGTERM or Ctrl-C."""
    from twisted.internet import reactor
    from twisted.internet.error import CannotListenError

    from . import log
    from .engine import Engine

    config = config_module.load(config_path)
    log.start(config.log_level, config.log_format)
    engine = Engine(config, reactor)
    try:
        engine.startService()
    except CannotListenError as e:
        raise Failure(f"cannot listen on {e.interface or '0.0.0.0'}:{e.port}: "
                      f"{getattr(e.socketError, 'strerror', None) or e.socketError}") from None
    reactor.addSystemEventTrigger("before", "shutdown", engine.stopService)
    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(engine.reload))
    reactor.run()


@main.command()
@config_option
@user_errors
def reload(config_path):
    """Ask the running engine to re-read its channel files (the same as SIGHUP).

    The files are checked first: a set that does not validate is not sent, and the
    engine keeps running what it has.
    """
    from .engine import load_channel_set

    config = config_module.load(config_path)
    channels, _ = load_channel_set(config)
    try:
        pid = int(Path(config.pid_file).read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError):
        raise Failure(f"no running engine found through {config.pid_file} "
                      "(start one with `interface-engine run`)") from None
    click.echo(f"reload requested: engine pid {pid}, {len(channels)} valid channel(s); "
               "its log says when they are applied")


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=2575, show_default=True, type=click.IntRange(1, 65535))
@click.option("--timeout", default=10.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds to wait for each answer.")
@click.option("--raw", is_flag=True,
              help="Send each file's bytes as they are (default: segments end with CR).")
@click.option("--tls", is_flag=True, help="Speak TLS (1.2 or later); the server's certificate is verified.")
@click.option("--ca", type=click.Path(dir_okay=False), help="CA certificate(s) to verify the server "
              "with (default: the system's). Implies --tls.")
@click.option("--cert", type=click.Path(dir_okay=False), help="Client certificate (PEM), for a listener "
              "that requires one. Implies --tls.")
@click.option("--key", type=click.Path(dir_okay=False), help="The client certificate's private key (PEM).")
@click.option("--server-name", help="The name the server's certificate must carry (default: --host).")
@user_errors
def send(files, host, port, timeout, raw, tls, ca, cert, key, server_name):
    """Send HL7 v2 files over MLLP and print each answer's MSA-1, MSA-2 and MSA-3.

    A file may hold one message, several, or an FHS/BHS batch (sent as one frame).
    Exits 1 if any answer is not AA/CA or does not come.
    """
    from . import hl7
    from .mllp.client import MLLPClient, MLLPError, tls_context

    if bool(cert) != bool(key):
        raise Failure("--cert and --key go together")
    context = tls_context(ca, cert, key) if tls or ca or cert or server_name else None
    frames = []
    for name in files:
        data = Path(name).read_bytes()
        for payload in split_file(data, keep_bytes=raw):
            frames.append((name, payload))
    if not frames:
        raise Failure("no HL7 message found in the given files (each must contain an MSH segment)")
    failed = 0
    with MLLPClient(host, port, timeout=timeout, tls=context, server_name=server_name) as client:
        for name, payload in frames:
            try:
                answer = client.send(payload)
            except MLLPError as e:
                click.echo(f"{name}\t-\t-\t{e}")
                failed += 1
                break
            for msa in acknowledgements(answer):
                code, control_id, text = msa
                click.echo(f"{name}\t{code}\t{control_id}\t{text}".rstrip())
                if code not in ("AA", "CA"):
                    failed += 1
    if failed:
        sys.exit(EXIT_FAILED)


def split_file(data: bytes, keep_bytes: bool = False) -> list[bytes]:
    """The frames to send for one file: a batch whole, otherwise one frame per MSH."""
    from . import hl7

    if not keep_bytes:
        data = data.replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    if hl7.is_batch(data):
        return [data]
    return [part for part in hl7.split_file(data) if part.strip()]


def acknowledgements(answer: bytes) -> list[tuple[str, str, str]]:
    """(MSA-1, MSA-2, MSA-3) for each ACK in an answer (a batch answer holds several)."""
    from . import hl7

    result = []
    for part in hl7.split_messages(answer):
        try:
            ack = hl7.parse(part)
        except (hl7.HL7Error, ValueError):
            result.append(("??", "", "answer is not an HL7 ACK"))
            continue
        result.append((ack["MSA-1"], ack["MSA-2"], ack["MSA-3"]))
    return result or [("??", "", "empty answer")]


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=2576, show_default=True, type=click.IntRange(0, 65535))
@click.option("--answer", default="AA", show_default=True, type=click.Choice(["AA", "AE", "AR"]),
              help="What to answer to every well-formed message.")
@click.option("--save", type=click.Path(file_okay=False), help="Write each message received to this folder.")
def receive(host, port, answer, save):
    """Play a downstream MLLP system: answer every message and print a line for it."""
    from twisted.internet import reactor
    from twisted.internet.error import CannotListenError

    from .mllp.receiver import TestReceiverFactory

    folder = None
    if save:
        folder = Path(save)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    factory = TestReceiverFactory(answer, folder, lambda line: click.echo(line))
    try:
        bound = reactor.listenTCP(port, factory, interface=host)
    except CannotListenError as e:
        raise Failure(f"cannot listen on {host}:{port}: "
                      f"{getattr(e.socketError, 'strerror', None) or e.socketError}") from None
    click.echo(f"receiving MLLP on {host}:{bound.getHost().port}, answering {answer} (Ctrl-C to stop)")
    reactor.run()


@main.group()
def channels():
    """Check and try out channel files."""


def _channel_set(config_path, paths=()):
    from .channels.config import load_channels
    from .channels.templating import Mappings

    config = config_module.load(config_path)
    mappings = Mappings(config.channels.mappings)
    return config, load_channels(config, paths or None, checker=mappings), mappings


@channels.command("validate")
@click.argument("paths", nargs=-1, type=click.Path(dir_okay=False))
@config_option
@user_errors
def channels_validate(paths, config_path):
    """Check channel files (default: the whole channels directory) without starting anything."""
    _, loaded, _ = _channel_set(config_path, paths)
    if not loaded:
        raise Failure("no channel files found (put one channel per .toml file in the channels directory)")
    for channel in loaded:
        click.echo(f"ok  {channel.name}  ({channel.file}: {len(channel.destinations)} destination(s))")


@channels.command("test")
@click.argument("channel")
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False, exists=True))
@config_option
@click.option("--update", is_flag=True, help="Write what the channel produces now as the expected outputs.")
@user_errors
def channels_test(channel, files, config_path, update):
    """Dry-run CHANNEL: on FILES, print what it would do; without FILES, run its test cases.

    Nothing is stored or sent. Exits 1 if anything errored or a test case does not match.
    """
    from .channels.testing import cases_folder, dry_run, run_cases, show

    config, loaded, mappings = _channel_set(config_path)
    found = next((c for c in loaded if c.name == channel), None)
    if found is None:
        names = ", ".join(c.name for c in loaded) or "none"
        raise Failure(f"no channel named {channel!r} (channels: {names})")
    charsets = {"default_charset": config.hl7.default_charset,
                "fallback_charset": config.hl7.fallback_charset}
    failed = False
    if files:
        for name in files:
            for report in dry_run(found, mappings, Path(name).read_bytes(), name, charsets):
                click.echo(show(report))
                failed |= report.failed
    else:
        results = run_cases(found, mappings, update=update, charsets=charsets)
        if not results:
            raise Failure(f"no test cases for {channel} in {cases_folder(found)} "
                          "(one folder per case, holding input.hl7)")
        for result in results:
            click.echo(f"{'FAIL' if result.problems else 'ok  '}  {result.name}"
                       + ("  (expected outputs written)" if update else ""))
            for problem in result.problems:
                click.echo(problem)
            failed |= bool(result.problems)
        click.echo(f"{sum(not r.problems for r in results)} passed, {sum(bool(r.problems) for r in results)} failed")
    if failed:
        sys.exit(EXIT_FAILED)


@main.group()
def messages():
    """Look at stored messages."""


def _open_store(config_path):
    from .store import Store

    config = config_module.load(config_path)
    store = Store(config.store.url, duplicate_window=config.store.duplicate_window)
    store.check_schema(upgrade_empty=False)
    return store


@messages.command("list")
@config_option
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--before", "before_id", type=int, help="Only messages with an id below this (paging).")
@click.option("--state", help="received, rejected, ...")
@click.option("--listener", help="Only messages from this listener.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@user_errors
def messages_list(config_path, limit, before_id, state, listener, as_json):
    """List stored messages, newest first (metadata only, no content)."""
    store = _open_store(config_path)
    rows = store.list_messages(limit=limit, before_id=before_id, state=state, listener=listener)
    if as_json:
        for row in rows:
            click.echo(json.dumps(_jsonable(row)))
        return
    columns = ("id", "received_at", "state", "listener", "peer", "type", "control_id", "sender")
    table = [columns] + [(
        str(r["id"]), r["received_at"].strftime("%Y-%m-%d %H:%M:%S"), r["state"], r["listener"],
        r["peer"], f"{r['message_type']}^{r['trigger_event']}".strip("^"), r["control_id"],
        f"{r['sending_application']}|{r['sending_facility']}".strip("|"),
    ) for r in rows]
    widths = [min(40, max(len(row[i]) for row in table)) for i in range(len(columns))]
    for row in table:
        click.echo("  ".join(cell[:40].ljust(w) for cell, w in zip(row, widths)).rstrip())


@messages.command("show")
@click.argument("message_id", type=int)
@config_option
@click.option("--raw", is_flag=True, help="Write the stored bytes exactly, nothing else.")
@click.option("--json", "as_json", is_flag=True, help="Everything shown, as one JSON object.")
@user_errors
def messages_show(message_id, config_path, raw, as_json):
    """Show one stored message: its metadata, its segments with field names, the channel's
    decision, the answer it was given and per destination its output and every attempt."""
    from . import inspection
    from .audit import cli_actor, open_trail

    store, trail = open_trail(config_module.load(config_path))
    row = store.get_message(message_id)
    if row is None:
        raise Failure(f"no message with id {message_id} (see `interface-engine messages list`)")
    # Seeing a message is an access to patient data: recorded before anything is shown.
    actor, source = cli_actor()
    trail.record("content.viewed", actor=actor, object_type="message", object_id=str(message_id),
                 source=source, correlation_id=row.get("correlation_id"),
                 detail={"view": "raw" if raw else "json" if as_json else "text"})
    if raw:
        sys.stdout.buffer.write(row["raw"])
        return
    found = store.deliveries_of(message_id)
    if as_json:
        click.echo(inspection.show_json(row, found))
        return
    for key, value in _jsonable(row).items():
        if key not in ("raw", "ack"):
            click.echo(f"{key:22} {value}")
    click.echo(f"{'decision':22} {inspection.decision(row, found)}")
    click.echo("\nmessage:")
    click.echo(_printable(row["raw"]))
    click.echo("\nsegments:")
    click.echo(inspection.show_segments(row["raw"]))
    if row["ack"]:
        click.echo("\nanswer sent:")
        click.echo(_printable(row["ack"]))
    for d in found:
        where = f" -> {d['target']}" if d["target"] else ""
        click.echo(f"\ndelivery {d['id']}: {d['destination']}  {d['state']}  "
                   f"attempts={d['attempts']}{where}")
        if d["state"] in ("queued", "error") and d["next_attempt_at"]:
            click.echo(f"  next attempt at {d['next_attempt_at'].isoformat()}Z")
        for a in d["attempt_log"]:
            click.echo(f"  {a['started_at'].isoformat()}Z  {a['duration_ms']:8.1f} ms  {a['outcome']}"
                       + (f"  {a['error']}" if a["error"] else ""))
            if a["response"]:
                click.echo(_printable(a["response"], "    "))
        if d["state"] == "filtered" or (d["last_error"] and not d["attempt_log"]):
            click.echo(f"  {d['last_error']}")
        if d["output"] is not None:
            click.echo("  output:")
            click.echo(_printable(d["output"], "    "))


def _printable(data: bytes, indent: str = "  ") -> str:
    text = data.decode("utf-8", errors="replace")
    return "\n".join(indent + line for line in re.split(r"\r\n|\r|\n", text) if line)


def _jsonable(row: dict) -> dict:
    out = {}
    for key, value in row.items():
        if isinstance(value, bytes):
            continue
        out[key] = value.isoformat() + "Z" if hasattr(value, "isoformat") else value
    return out


@main.group()
def keys():
    """Manage the engine's key file: patient index, audit and data keys."""


@keys.command("init")
@config_option
@user_errors
def keys_init(config_path):
    """Create the key file named in the config, with mode 0600; never replaces one."""
    from . import keys as key_file

    config = config_module.load(config_path)
    key_file.create(config.keys_file)
    click.echo(f"created {config.keys_file} (mode 0600); back it up apart from the store")


@keys.command("list")
@config_option
@user_errors
def keys_list(config_path):
    """The data keys: when each was made, which seals new writes, how many stored values each seals.

    Never prints a key.
    """
    from .rotation import listing

    for line in listing(config_module.load(config_path)):
        click.echo(line)


@keys.command("rotate")
@click.option("--resume", is_flag=True, help="Add no key: finish a rotation that was interrupted.")
@click.option("--batch", default=500, show_default=True, type=click.IntRange(1, 100_000),
              help="Values sealed per transaction.")
@config_option
@user_errors
def keys_rotate(resume, batch, config_path):
    """Add a data key for new writes and seal every stored content with it.

    Safe while the engine runs: it takes up the new key within seconds and goes on;
    the batches are short transactions. If interrupted, run it again with --resume.
    Retire the old key (`keys retire`) once `keys list` shows it seals nothing.
    """
    from .rotation import RotationError, rotate

    try:
        rotate(config_module.load(config_path), resume=resume, batch=batch, say=click.echo)
    except RotationError as e:
        raise Failure(str(e)) from None


@keys.command("retire")
@click.argument("key_id")
@config_option
@user_errors
def keys_retire(key_id, config_path):
    """Remove a data key from the key file, once no stored value is sealed with it."""
    from .rotation import RotationError, retire

    try:
        click.echo(retire(config_module.load(config_path), key_id))
    except RotationError as e:
        raise Failure(str(e)) from None


@main.group()
def db():
    """Manage the message store's schema."""


@db.command()
@config_option
@user_errors
def upgrade(config_path):
    """Create the store's tables or bring them to this version's schema."""
    from .store import Store

    config = config_module.load(config_path)
    config_module.prepare_sqlite_file(config.store.url)
    store = Store(config.store.url)
    before, after = store.upgrade()
    store.close()
    if before == after:
        click.echo(f"the store is already at revision {after}")
    else:
        click.echo(f"upgraded the store from revision {before or 'none'} to {after}")


@main.group()
def audit():
    """Check and export the tamper-evident audit trail."""


@audit.command("verify")
@config_option
@user_errors
def audit_verify(config_path):
    """Recompute every audit chain and check it against its head and the signed checkpoint.

    Prints the first problem of each chain (edited, deleted, inserted, reordered,
    truncated) with the row's id and seq, and exits 1; exits 0 with one line when clean.
    """
    from .audit import open_trail, verify

    config = config_module.load(config_path)
    store, trail = open_trail(config)
    report = verify(trail, config.audit.checkpoint_file)
    store.close()
    for problem in report.problems:
        click.echo(str(problem))
    rows = sum(report.chains.values())
    if not report.ok:
        raise Failure(f"audit trail NOT intact: {len(report.problems)} problem(s) in "
                      f"{len(report.chains)} chain(s) of {rows} row(s)")
    click.echo(f"audit trail intact: {len(report.chains)} chain(s), {rows} row(s), "
               f"checkpoint of {len(report.checkpoint or {})} chain(s) matches")


@audit.command("export")
@config_option
@click.option("--format", "fmt", default="jsonl", show_default=True, type=click.Choice(["jsonl", "syslog"]),
              help="JSON lines, or RFC 5424 syslog records.")
@click.option("--since", help="Only events at or after this UTC time, e.g. 2026-01-31 or 2026-01-31T08:00:00Z.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write to this file (mode 0600) instead of stdout.")
@user_errors
def audit_export(config_path, fmt, since, out):
    """Write the audit events, oldest first; the export is itself an audited event."""
    from datetime import datetime, timezone

    from .audit import FAILURE, as_json, as_syslog, cli_actor, open_trail

    start = None
    if since:
        try:
            start = datetime.fromisoformat(since.replace("Z", "+00:00"))
        except ValueError:
            raise Failure(f"--since: expected a UTC time such as 2026-01-31 or 2026-01-31T08:00:00Z, "
                          f"got {since!r}") from None
        if start.tzinfo is not None:
            start = start.astimezone(timezone.utc).replace(tzinfo=None)
    config = config_module.load(config_path)
    store, trail = open_trail(config)
    actor, source = cli_actor()
    line = as_json if fmt == "jsonl" else as_syslog
    target = out or "stdout"
    count = 0
    try:
        stream = (open(os.open(out, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600), "w", encoding="utf-8")
                  if out else sys.stdout)
        try:
            for event in trail.events(start):
                stream.write(line(event) + "\n")
                count += 1
        finally:
            if out:
                stream.close()
    except Exception:
        trail.record("audit.exported", actor=actor, object_type="audit", object_id=trail.chain,
                     source=source, outcome=FAILURE, detail={"format": fmt, "to": target, "events": count})
        raise
    trail.record("audit.exported", actor=actor, object_type="audit", object_id=trail.chain, source=source,
                 detail={"format": fmt, "to": target, "events": count, "since": since})
    store.close()
    if out:
        click.echo(f"exported {count} audit event(s) to {out}")
# -- replay and retention ---------------------------------------------------------------

@main.command()
@click.argument("message_ids", nargs=-1, type=int)
@click.option("--ids-from", "ids_from", type=click.Path(dir_okay=False, allow_dash=True),
              help="Read message ids from FILE (- for stdin): one per line, or JSON lines with an "
                   '"id", as `messages search --json` writes.')
@click.option("--destination", "destinations", multiple=True, metavar="NAME",
              help="Only this destination of the message's channel (repeatable); default: all of them.")
@click.option("--mapping", type=click.Choice(["current", "original"]), default="current", show_default=True,
              help="current: render with the channel's config and mapping as they are now; "
                   "original: send again the output stored on the earlier delivery.")
@click.option("--dry-run", is_flag=True,
              help="Print what would be sent, and how it differs from what was sent; change nothing.")
@click.option("--rate", type=click.FloatRange(min=0.01), help="Queue at most this many messages per second.")
@config_option
@user_errors
def replay(message_ids, ids_from, destinations, mapping, dry_run, rate, config_path):
    """Send stored messages again, as new deliveries linked to the ones they repeat.

    The new deliveries join their destinations' queues; the running engine sends them.
    Every replay is recorded: who, which selection, how, how many.
    """
    import time

    from .audit import FAILURE, SUCCESS, cli_actor, open_trail
    from .engine import load_channel_set
    from .replay import Replay, ReplayError, read_ids

    try:
        lines = None
        if ids_from:
            lines = sys.stdin.readlines() if ids_from == "-" else Path(ids_from).read_text().splitlines()
        ids, selection = read_ids(message_ids, lines, ids_from and ("stdin" if ids_from == "-" else ids_from))
        config = config_module.load(config_path)
        store, trail = open_trail(config)
        channels, mappings = load_channel_set(config)
        charsets = {"default_charset": config.hl7.default_charset,
                    "fallback_charset": config.hl7.fallback_charset}
        job = Replay(store, channels, mappings, charsets, mapping, destinations)
        selected = job.select(ids)
    except ReplayError as e:
        raise Failure(str(e)) from None
    actor, source = cli_actor()
    tally = job.tally
    if dry_run:
        for message_id, channel in selected:
            for line in job.preview(message_id, channel):
                click.echo(line)
        click.echo(f"dry run: {tally.messages} message(s), {tally.queued} delivery(ies) would be queued, "
                   f"{tally.filtered} filtered, {len(tally.errors)} error(s); nothing was changed")
        # A dry run shows what would be sent, rendered from the messages: an access to their content.
        trail.record("message.replay_previewed", actor=actor, object_type="replay", object_id="dry-run",
                     source=source, detail={"selection": selection[:500], "mapping": mapping,
                                            "destinations": list(destinations), "messages": tally.messages})
    else:
        record = job.begin(selection)
        started = time.monotonic()
        with click.progressbar(selected, label="replaying", file=sys.stderr,
                               show_pos=True) as progress:
            for i, (message_id, channel) in enumerate(progress):
                if rate:
                    time.sleep(max(0.0, started + i / rate - time.monotonic()))
                job.replay(message_id, channel)
        for error in tally.errors:
            click.echo(error, err=True)
        click.echo(f"replay {job.replay_id}: {record.messages} message(s), {record.deliveries} "
                   f"delivery(ies) queued, {tally.filtered} filtered, {len(tally.errors)} error(s)")
        trail.record("message.replayed", actor=actor, object_type="replay", object_id=str(job.replay_id),
                     source=source, outcome=FAILURE if tally.errors else SUCCESS,
                     detail={"selection": record.selection[:500], "mapping": record.mapping,
                             "destinations": list(record.destinations or ()), "messages": record.messages,
                             "deliveries": record.deliveries, "errors": len(tally.errors)})
    if tally.errors:
        sys.exit(EXIT_FAILED)


@db.command()
@click.option("--dry-run", is_flag=True, help="Count what would be removed; change nothing.")
@config_option
@user_errors
def prune(dry_run, config_path):
    """Apply the [retention] rules now: remove old contents and messages, in short batches.

    Safe while the engine runs: each batch is its own short transaction.
    """
    from .retention import report, summary
    from .store.retention import prune as apply_rules

    config = config_module.load(config_path)
    if not config.retention.rules:
        raise Failure(f"{config.path}: no [[retention.rules]]: nothing to prune "
                      "(see docs/configuration.md, [retention])")
    from .audit import cli_actor, open_trail

    store, trail = open_trail(config)
    counts = apply_rules(store, config.retention.rules, batch=config.retention.batch, dry_run=dry_run)
    for line in report(counts, dry_run):
        click.echo(line)
    if not dry_run:
        actor, source = cli_actor()
        trail.record("retention.pruned", actor=actor, object_type="store", object_id=config.node,
                     source=source, detail=summary(counts))
# -- search and status --------------------------------------------------------------


@messages.command("search")
@config_option
@click.option("--channel", help="Messages taken by this channel.")
@click.option("--state", help="received, filtered, queued, sent, error, dead or rejected.")
@click.option("--since", help="Received at or after: ISO 8601 (UTC unless it says) or an age like 2h, 7d.")
@click.option("--until", help="Received before: ISO 8601 or an age like 30m.")
@click.option("--type", "type_", help="Message type, with or without trigger: ADT or ADT^A01.")
@click.option("--control-id", help="MSH-10.")
@click.option("--sender", help="MSH-3, or MSH-3|MSH-4: APP or APP|FACILITY.")
@click.option("--destination", help="Messages with a delivery to this destination.")
@click.option("--destination-state", help="... whose delivery there is queued, sent, error, dead or filtered.")
@click.option("--patient", help="A patient identifier (PID-3); looked up by its keyed hash.")
@click.option("--authority", help="The identifier's assigning authority (PID-3.4).")
@click.option("--limit", default="50", show_default=True, help="Messages per page (1 to 10000).")
@click.option("--before", help="Only ids below this: the last id of the previous page.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@user_errors
def messages_search(config_path, channel, state, since, until, type_, control_id, sender, destination,
                    destination_state, patient, authority, limit, before, as_json):
    """Find stored messages, newest first, by any mix of criteria (metadata only, no content)."""
    from . import inspection
    from . import keys as key_file
    from .store.search import SearchError

    config = config_module.load(config_path)
    try:
        keys = key_file.load(config.keys_file) if patient is not None else None
        criteria = inspection.criteria(
            channel=channel, state=state, since=since, until=until, type_=type_, control_id=control_id,
            sender=sender, destination=destination, destination_state=destination_state,
            patient=patient, authority=authority, keys=keys,
            limit=_whole_number(limit, "--limit"),
            before=_whole_number(before, "--before") if before is not None else None)
    except SearchError as e:
        raise Failure(str(e)) from None
    store = _open_store(config_path)
    rows = store.search(criteria)
    if as_json:
        for row in rows:
            click.echo(json.dumps(inspection.jsonable(row)))
        return
    click.echo(inspection.search_table(rows))
    hint = inspection.next_page_hint(rows, criteria.limit)
    if hint:
        click.echo(hint, err=True)


def _whole_number(text: str, option: str) -> int:
    from .store.search import SearchError

    try:
        return int(text)
    except ValueError:
        raise SearchError(f"{option}: {text!r} is not a whole number") from None


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="As one JSON object.")
@user_errors
def status(config_path, as_json):
    """Messages per channel and state, deliveries per destination, queue depth and oldest wait.

    Read from the store, so it counts the work of every engine sharing it.
    """
    from . import inspection

    counts = _open_store(config_path).status()
    click.echo(inspection.status_json(counts) if as_json else inspection.status_table(counts))


# -- the admin console's users and API tokens ----------------------------------------------


def _accounts(config_path):
    from .admin.auth import Accounts

    return Accounts(_open_store(config_path))


def _audit_account(config_path, action: str, object_type: str, object_id: str, detail: dict | None = None):
    """Who changed who may use the admin server: recorded like every other change."""
    from .audit import cli_actor, open_trail

    store, trail = open_trail(config_module.load(config_path))
    actor, source = cli_actor()
    trail.record(action, actor=actor, object_type=object_type, object_id=object_id, source=source,
                 detail=detail)
    store.close()


def _account_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .admin.auth import AccountError

        try:
            return fn(*args, **kwargs)
        except AccountError as e:
            raise Failure(str(e)) from None
    return wrapper


def _password(stdin: bool) -> str:
    if stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return click.prompt("password", hide_input=True, confirmation_prompt=True)


@main.group()
def users():
    """Manage the people who log in to the admin console (passwords stored as scrypt hashes)."""


@users.command("add")
@click.argument("name")
@click.option("--role", required=True, type=click.Choice(["viewer", "analyst", "operator", "admin"]),
              help="viewer: counts and metadata; analyst: also content; operator: also replay; "
                   "admin: also users and reload.")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin.")
@config_option
@user_errors
@_account_errors
def users_add(name, role, password_stdin, config_path):
    """Add a user (at least 12 characters of password)."""
    _accounts(config_path).add_user(name, role, _password(password_stdin))
    _audit_account(config_path, "user.added", "user", name, {"role": role})
    click.echo(f"user {name} added with role {role}")


@users.command("passwd")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin.")
@config_option
@user_errors
@_account_errors
def users_passwd(name, password_stdin, config_path):
    """Set a user's password."""
    _accounts(config_path).set_password(name, _password(password_stdin))
    _audit_account(config_path, "user.password_changed", "user", name)
    click.echo(f"password of {name} changed")


@users.command("remove")
@click.argument("name")
@config_option
@user_errors
@_account_errors
def users_remove(name, config_path):
    """Remove a user; their browser sessions end within a few seconds of the next request."""
    _accounts(config_path).remove_user(name)
    _audit_account(config_path, "user.removed", "user", name)
    click.echo(f"user {name} removed")


@users.command("list")
@config_option
@user_errors
def users_list(config_path):
    """Users and their roles."""
    from . import inspection

    click.echo(inspection.table(("name", "role", "created_at"), [
        (u["name"], u["role"], u["created_at"].strftime("%Y-%m-%d %H:%M")) for u in _accounts(config_path).users()]))


@main.group()
def tokens():
    """Manage API tokens for scripts and monitoring (stored as hashes; shown once, at creation)."""


@tokens.command("create")
@click.argument("name")
@click.option("--role", required=True, type=click.Choice(["viewer", "analyst", "operator", "admin"]))
@config_option
@user_errors
@_account_errors
def tokens_create(name, role, config_path):
    """Create a token and print it, this once; send it as `Authorization: Bearer <token>`."""
    token = _accounts(config_path).create_token(name, role)
    _audit_account(config_path, "token.created", "token", token.split("_")[1], {"name": name, "role": role})
    click.echo(token)
    click.echo("keep it now: it is stored only as a hash and cannot be shown again; a running engine "
               "accepts it within a few seconds", err=True)


@tokens.command("revoke")
@click.argument("token_id")
@config_option
@user_errors
@_account_errors
def tokens_revoke(token_id, config_path):
    """Revoke a token by its id (the 8 characters after `iet_`); refused within a few seconds."""
    _accounts(config_path).revoke_token(token_id)
    _audit_account(config_path, "token.revoked", "token", token_id)
    click.echo(f"token {token_id} revoked")


@tokens.command("list")
@config_option
@user_errors
def tokens_list(config_path):
    """Tokens: id, name, role, created, revoked. Never the secret."""
    from . import inspection

    stamp = lambda t: t.strftime("%Y-%m-%d %H:%M") if t else "-"  # noqa: E731
    click.echo(inspection.table(("id", "name", "role", "created_at", "revoked_at"), [
        (t["id"], t["name"], t["role"], stamp(t["created_at"]), stamp(t["revoked_at"]))
        for t in _accounts(config_path).tokens()]))

"""The admin REST API, `/api/v1`, and the open health checks; described in openapi.json beside this file.

Handlers run on the reactor and send store work to threads. Each route names the
least role that may call it (auth.ROLES); what a role may see inside an answer
(message content only from `analyst` up) is decided here.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from urllib.parse import urlencode

import sqlalchemy as sa
from twisted.internet import threads

from .. import inspection
from ..audit import FAILURE, SUCCESS
from ..hl7.patients import patient_ids
from ..store import control, utcnow
from ..store.search import SearchError, parse_time
from .auth import Gate
from .pages import browser_next, see_other
from .server import LOGIN_MAX_BODY, ApiError, Raw, _form, json_body, route

OPENAPI = Path(__file__).with_name("openapi.json")


class Api:
    def __init__(self, engine, gate: Gate):
        self.engine, self.gate = engine, gate
        self.started = time.time()

    def routes(self) -> list:
        return [
            route("GET", "/healthz", None, self.healthz),
            route("GET", "/readyz", None, self.readyz),
            route("POST", "/login", None, self.login, max_body=LOGIN_MAX_BODY),
            route("POST", "/logout", "viewer", self.logout, changes=True),
            route("GET", "/metrics", "viewer", self.metrics),
            route("GET", "/api/v1/openapi.json", "viewer", self.openapi),
            route("GET", "/api/v1/session", "viewer", self.session),
            route("GET", "/api/v1/engine", "viewer", self.engine_info),
            route("GET", "/api/v1/channels", "viewer", self.channels),
            route("GET", "/api/v1/messages", "viewer", self.search),
            route("GET", "/api/v1/messages/{message_id}", "viewer", self.message),
            route("POST", "/api/v1/replay", "operator", self.replay, changes=True),
            route("POST", "/api/v1/channels/{channel}/pause", "operator", self.pause, changes=True),
            route("POST", "/api/v1/channels/{channel}/resume", "operator", self.resume, changes=True),
            route("POST", "/api/v1/channels/{channel}/destinations/{destination}/pause", "operator",
                  self.pause, changes=True),
            route("POST", "/api/v1/channels/{channel}/destinations/{destination}/resume", "operator",
                  self.resume, changes=True),
            route("GET", "/api/v1/dead", "viewer", self.dead),
            route("POST", "/api/v1/dead/{delivery_id}/resend", "operator", self.resend, changes=True),
            route("GET", "/api/v1/audit", "operator", self.audit_page),
            route("POST", "/api/v1/reload", "admin", self.reload, changes=True),
        ]

    # -- health ------------------------------------------------------------------------

    def healthz(self, request):
        return {"status": "alive"}

    def readyz(self, request):
        """Ready when the store answers and every listener is bound; 503 with the reasons otherwise."""
        engine = self.engine
        problems = [f"listener {name} is not bound" for name, svc in engine.listeners.items()
                    if svc.port is None]

        def store_answers():
            with engine.store._connect() as conn:
                conn.execute(sa.text("SELECT 1"))

        def answer(failure=None):
            if failure is not None:
                problems.append(f"store unreachable: {failure.getErrorMessage().splitlines()[0]}")
            body = {"status": "ready" if not problems else "not ready", "problems": problems}
            return Raw(json.dumps(body).encode(), b"application/json", 200 if not problems else 503)
        return threads.deferToThread(store_answers).addCallbacks(lambda _: answer(), answer)

    def metrics(self, request):
        """Prometheus text format; the store's counts are read at each scrape, in a thread."""
        def answer(rendered):
            body, content_type = rendered
            return Raw(body, content_type.encode())
        return threads.deferToThread(self.engine.metrics.render).addCallback(answer)

    # -- sessions ----------------------------------------------------------------------

    def login(self, request):
        """A browser login (form or JSON: user, password) → session cookie. Failures are audited."""
        fields = _fields(request)
        name, password = str(fields.get("user", "")), str(fields.get("password", ""))
        back = browser_next(fields)      # the console's form: answer with a redirect, not JSON
        from .auth import Accounts

        accounts, audit, peer = Accounts(self.engine.store), self.engine.audit, _peer(request)

        def check():
            """The verdict and its audit event, both before the answer."""
            role = accounts.verify(name, password)
            audit.record("auth.login", actor=f"user:{name}"[:128], object_type="session", object_id="admin",
                         source=peer, outcome=SUCCESS if role else FAILURE)
            return role

        def done(role):
            if role is None:
                if back:
                    return see_other("/login?" + urlencode({"next": back, "failed": "1"}))
                raise ApiError(401, "wrong user name or password")
            session_id = self.gate.open_session(name, role)
            secure = self.engine.config.admin.tls is not None
            request.addCookie(Gate.COOKIE, session_id.encode(), path=b"/", httpOnly=True,
                              secure=secure, sameSite=b"strict")
            if back:
                return see_other(back)
            return {"user": name, "role": role, "csrf": self.gate.sessions[session_id].csrf}
        return threads.deferToThread(check).addCallback(done)

    def logout(self, request):
        self.gate.close_session(request.getCookie(Gate.COOKIE))
        request.addCookie(Gate.COOKIE, b"", path=b"/", max_age=b"0", httpOnly=True, sameSite=b"strict")
        back = browser_next(_form(request))
        return see_other(back) if back else {"status": "logged out"}

    def session(self, request):
        p = request.principal
        return {"name": p.name, "role": p.role, "kind": p.kind, "csrf": p.csrf}

    # -- reading ------------------------------------------------------------------------

    def openapi(self, request):
        return Raw(OPENAPI.read_bytes(), b"application/json")

    def engine_info(self, request):
        from importlib.metadata import version

        engine = self.engine
        return {"node": engine.config.node, "version": version("interface-engine"), "pid": os.getpid(),
                "uptime_s": round(time.time() - self.started, 1),
                "listeners": [{"name": name, "port": svc.port.getHost().port if svc.port else None}
                              for name, svc in sorted(engine.listeners.items())],
                "channels": [c.name for c in engine.channels]}

    def channels(self, request):
        """Every channel's counts by state and each destination's queue (from the store's indexes)."""
        def work():
            found = json.loads(inspection.status_json(self.engine.store.status()))
            found["paused"] = [{"channel": c, "destination": d or None}
                               for c, d in sorted(self.engine.runtime.paused)]
            return found
        return threads.deferToThread(work)

    def search(self, request, args: dict[str, str] | None = None):
        """`args`: the console's search form, its empty fields left out; else the query string."""
        args = _args(request) if args is None else args
        if "patient" in args and not request.principal.may("analyst"):
            self._denied(request, "analyst", "search by patient")
            raise ApiError(403, "searching by patient needs the analyst role")
        try:
            criteria = inspection.criteria(
                channel=args.get("channel"), state=args.get("state"), since=args.get("since"),
                until=args.get("until"), type_=args.get("type"), control_id=args.get("control_id"),
                sender=args.get("sender"), destination=args.get("destination"),
                destination_state=args.get("destination_state"), patient=args.get("patient"),
                authority=args.get("authority"), keys=self.engine.keys,
                limit=_whole(args.get("limit", "50"), "limit"),
                before=_whole(args["before"], "before") if "before" in args else None)
        except SearchError as e:
            raise ApiError(400, str(e).replace("--", "")) from None

        def work():
            return [inspection.jsonable(r) for r in self.engine.store.search(criteria)]
        return threads.deferToThread(work).addCallback(lambda rows: {"messages": rows})

    def message(self, request, message_id, view: str = "api"):
        """Metadata for every role; raw, segments, outputs and answers from `analyst` up (audited first)."""
        number = _whole(message_id, "message id")
        full = request.principal.may("analyst")
        engine = self.engine

        def work():
            row = engine.store.get_message(number)
            if row is None:
                raise ApiError(404, f"no message {number}")
            deliveries = engine.store.deliveries_of(number)
            if not full:
                return inspection.outline(row, deliveries)
            engine.audit.record("content.viewed", actor=request.principal.actor, object_type="message",
                                object_id=str(number), source=_peer(request),
                                correlation_id=row["correlation_id"], detail={"view": view})
            return inspection.shown(row, deliveries)
        return threads.deferToThread(work)

    def audit_page(self, request):
        args = _args(request)
        try:
            since = parse_time(args["since"], "since") if "since" in args else None
        except SearchError as e:
            raise ApiError(400, str(e)) from None
        limit = _whole(args.get("limit", "100"), "limit")
        if not 1 <= limit <= 1000:
            raise ApiError(400, "limit: expected 1 to 1000")
        before = _whole(args["before"], "before") if "before" in args else None

        def work():
            return [inspection.jsonable(e) for e in self.engine.audit.page(
                since=since, action=args.get("action"), before=before, limit=limit)]
        return threads.deferToThread(work).addCallback(lambda rows: {"events": rows})

    # -- changing -----------------------------------------------------------------------

    def replay(self, request):
        from ..replay import CURRENT

        body = json_body(request)
        return self.run_replay(request, body.get("ids"), body.get("destinations", []),
                               body.get("mapping", CURRENT), body.get("dry_run", False))

    def run_replay(self, request, ids, destinations, mapping, dry_run):
        """Queue stored messages again (or preview with dry_run): the same rules as `interface-engine replay`.

        The API's JSON and the console's form both come here, so a replay is checked,
        done and audited one way whichever asked for it.
        """
        from ..replay import CURRENT, ORIGINAL, Replay, ReplayError

        if (not isinstance(ids, list) or not ids or len(ids) > 10_000
                or not all(isinstance(i, int) and not isinstance(i, bool) and i in _INT64 for i in ids)):
            raise ApiError(400, "ids: expected a list of 1 to 10000 message ids")
        if not isinstance(destinations, list) or not all(isinstance(d, str) for d in destinations):
            raise ApiError(400, "destinations: expected a list of destination names")
        if mapping not in (CURRENT, ORIGINAL) or not isinstance(dry_run, bool):
            raise ApiError(400, f"mapping: expected {CURRENT!r} or {ORIGINAL!r}; dry_run: true or false")
        engine, principal = self.engine, request.principal

        def work():
            job = Replay(engine.store, engine.channels, engine.runtime.mappings, engine.charsets, mapping,
                         tuple(destinations))
            try:
                selected = job.select(ids)
            except ReplayError as e:
                raise ApiError(400, str(e)) from None
            selection = ",".join(map(str, ids))
            if dry_run:
                preview = [line for message_id, channel in selected for line in job.preview(message_id, channel)]
                engine.audit.record("message.replay_previewed", actor=principal.actor, object_type="replay",
                                    object_id="dry-run", source=_peer(request),
                                    detail={"selection": selection[:500], "mapping": mapping,
                                            "destinations": destinations, "messages": job.tally.messages})
                return {"dry_run": True, "messages": job.tally.messages, "queued": job.tally.queued,
                        "filtered": job.tally.filtered, "errors": job.tally.errors, "diff": preview}
            record = job.begin(selection)
            for message_id, channel in selected:
                job.replay(message_id, channel)
            engine.audit.record("message.replayed", actor=principal.actor, object_type="replay",
                                object_id=str(job.replay_id), source=_peer(request),
                                outcome=FAILURE if job.tally.errors else SUCCESS,
                                detail={"selection": selection[:500], "mapping": mapping,
                                        "destinations": destinations, "messages": record.messages,
                                        "deliveries": record.deliveries, "errors": len(job.tally.errors)})
            return {"replay": job.replay_id, "messages": record.messages, "queued": record.deliveries,
                    "filtered": job.tally.filtered, "errors": job.tally.errors}
        return threads.deferToThread(work).addCallback(self._wake)

    def _wake(self, result):
        if not result.get("dry_run"):
            self.engine.runtime.wake_all()
        return result

    def pause(self, request, channel, destination=None):
        return self._pause(request, channel, destination, True)

    def resume(self, request, channel, destination=None):
        return self._pause(request, channel, destination, False)

    def _pause(self, request, channel, destination, pause: bool):
        """A paused channel stores what it receives but does not process it; a paused destination holds its queue."""
        engine = self.engine
        config = next((c for c in engine.channels if c.name == channel), None)
        if config is None:
            raise ApiError(404, f"no channel {channel!r}")
        if destination is not None and config.destination(destination) is None:
            raise ApiError(404, f"channel {channel!r} has no destination {destination!r}")
        what = "destination" if destination else "channel"
        action = f"{what}.{'paused' if pause else 'resumed'}"
        actor = request.principal.actor

        def work():
            changed = control.set_paused(engine.store, channel, destination or control.CHANNEL, pause, actor,
                                         utcnow())
            if changed:
                engine.audit.record(action, actor=actor, object_type=what,
                                    object_id=f"{channel}/{destination}" if destination else channel,
                                    source=_peer(request))
            return changed, control.paused(engine.store)

        def done(result):
            changed, paused = result
            engine.runtime.set_paused(paused)
            return {"channel": channel, "destination": destination, "paused": pause, "changed": changed}
        return threads.deferToThread(work).addCallback(done)

    def dead(self, request):
        """Dead letters: deliveries that gave up, newest first, with their message's metadata."""
        args = _args(request)
        queues = [(c.name, d.name) for c in self.engine.channels for d in c.destinations
                  if args.get("channel", c.name) == c.name and args.get("destination", d.name) == d.name]
        limit = _whole(args.get("limit", "100"), "limit")
        if not 1 <= limit <= 1000:
            raise ApiError(400, "limit: expected 1 to 1000")
        before = _whole(args["before"], "before") if "before" in args else None

        def work():
            return [inspection.jsonable(d) for d in control.dead_letters(self.engine.store, queues,
                                                                         limit=limit, before=before)]
        return threads.deferToThread(work).addCallback(lambda rows: {"dead": rows})

    def resend(self, request, delivery_id):
        return self.run_resend(request, delivery_id, json_body(request).get("raw"))

    def run_resend(self, request, delivery_id, edited):
        """Send a dead letter again: as it was (a replay to its destination), or edited (`raw`), as a new message.

        The original message and delivery are kept untouched; the edit and the resend are audited.
        The API's JSON and the console's form both come here.
        """
        from .. import hl7
        from ..channels.pipeline import prepare_again
        from ..store import ERROR, FILTERED, QUEUED, Incoming

        number = _whole(delivery_id, "delivery id")
        if edited is not None and (not isinstance(edited, str) or not edited.startswith("MSH")):
            raise ApiError(400, "raw: expected the edited message as text, starting with MSH")
        engine, principal, peer = self.engine, request.principal, _peer(request)

        def work():
            dead = control.delivery(engine.store, number)
            if dead is None or dead["state"] != "dead":
                raise ApiError(404, f"no dead delivery {number}")
            channel = next((c for c in engine.channels if c.name == dead["channel"]), None)
            destination = channel and channel.destination(dead["destination"])
            if destination is None:
                raise ApiError(409, f"{dead['channel']}/{dead['destination']} is no longer configured")
            if edited is None:
                return self._replay_one(dead, principal, peer)
            raw = edited.replace("\r\n", "\r").replace("\n", "\r").encode("utf-8")
            raw = raw if raw.endswith(b"\r") else raw + b"\r"
            try:
                msg = hl7.parse(raw, **engine.charsets)
            except (hl7.HL7Error, ValueError) as e:
                raise ApiError(400, f"the edited message does not parse: {e}") from None
            made = prepare_again(channel, destination, engine.runtime.mappings, msg, raw)
            if made.state in (FILTERED, ERROR):
                raise ApiError(400, f"the edited message would not be sent: {made.error}")
            header = hl7.peek(raw, **engine.charsets)
            original = engine.store.get_message(dead["message_id"])
            item = Incoming(
                raw=raw, listener="admin", peer=peer, state=QUEUED, ack=None, channel=channel.name,
                sending_application=header.sending_application, sending_facility=header.sending_facility,
                receiving_application=header.receiving_application,
                receiving_facility=header.receiving_facility, message_type=header.message_type,
                trigger_event=header.trigger_event, control_id=header.control_id, version=header.version,
                edited_from=dead["message_id"],
                patients=tuple(engine.keys.patient_hash(i, a) for i, a in patient_ids(raw, header)))
            if original is not None and original["correlation_id"]:
                item.correlation_id = original["correlation_id"]   # one thread through the audit trail
            message_id, new_delivery = control.store_correction(
                engine.store, item, destination.name, made.output, made.target, number, utcnow())
            engine.audit.record("message.edited", actor=principal.actor, object_type="message",
                                object_id=str(message_id), source=peer, correlation_id=item.correlation_id,
                                detail={"edited_from": dead["message_id"], "dead_delivery": number})
            engine.audit.record("delivery.resent", actor=principal.actor, object_type="delivery",
                                object_id=str(new_delivery), source=peer, correlation_id=item.correlation_id,
                                detail={"resends": number, "message": message_id, "edited": True})
            return {"message": message_id, "delivery": new_delivery, "edited": True}
        return threads.deferToThread(work).addCallback(self._wake)

    def _replay_one(self, dead: dict, principal, peer: str) -> dict:
        from ..replay import Replay

        engine = self.engine
        job = Replay(engine.store, engine.channels, engine.runtime.mappings, engine.charsets,
                     destinations=(dead["destination"],))
        selected = job.select([dead["message_id"]])
        job.begin(f"dead letter {dead['id']}")
        shares = job.replay(*selected[0])
        if job.tally.errors:
            raise ApiError(409, job.tally.errors[0])
        engine.audit.record("delivery.resent", actor=principal.actor, object_type="delivery",
                            object_id=str(dead["id"]), source=peer,
                            detail={"resends": dead["id"], "message": dead["message_id"], "edited": False,
                                    "replay": job.replay_id})
        return {"message": dead["message_id"], "replay": job.replay_id, "queued": len(shares), "edited": False}

    def reload(self, request):
        ok = self.engine.reload()
        if not ok:
            raise ApiError(409, "the channel files were refused or applied in part; the engine's log says why")
        return {"status": "reloaded", "channels": [c.name for c in self.engine.channels]}

    def _denied(self, request, needs: str, what: str):
        principal = request.principal
        self.engine.audit_later("access.denied", actor=principal.actor, object_type="endpoint",
                                object_id=what, source=_peer(request), outcome=FAILURE,
                                detail={"role": principal.role, "needs": needs})


def _args(request) -> dict[str, str]:
    return {k.decode("utf-8", "replace"): v[0].decode("utf-8", "replace") for k, v in request.args.items()}


def _fields(request) -> dict:
    if (request.getHeader(b"content-type") or b"").startswith(b"application/json"):
        return json_body(request)
    return _form(request)


#: Ids and counts fit the store's 64-bit integers.
_INT64 = range(-2 ** 63, 2 ** 63)


def _whole(text: str, what: str) -> int:
    try:
        number = int(text)
    except (TypeError, ValueError):
        raise ApiError(400, f"{what}: {text!r} is not a whole number") from None
    if number not in _INT64:
        raise ApiError(400, f"{what}: {text} is out of range")
    return number


def _peer(request) -> str:
    return getattr(request.getClientAddress(), "host", "unknown")

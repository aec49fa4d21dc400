"""The web console: server-rendered pages over the same handlers as the API, no JavaScript.

Pages call into api.Api (search, message, run_replay) rather than the store, so a
page shows, refuses and audits exactly what the API does for the same principal.
Templates live in templates/ beside this file and render with autoescaping on:
they only ever show engine data, and every value is escaped. A page asked for
without a session redirects to the login form; the one page that changes
something (replay) is a POST that needs the operator role and the session's CSRF
token, checked by the server before the handler runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, quote

import sqlalchemy as sa
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from twisted.internet import defer, threads

from ..inspection import _age
from ..store import control
from ..store.schema import PENDING_STATES, deliveries
from ..store.search import DELIVERY_STATES, MESSAGE_STATES
from .server import ApiError, Raw, route

if TYPE_CHECKING:
    from .api import Api

TEMPLATES = Path(__file__).with_name("templates")
#: A destination counts as stuck when its oldest waiting message is older than this.
STUCK_AFTER_S = 60.0
REFRESH_S = 5
#: The search form's fields, as /api/v1/messages names them.
SEARCH_FIELDS = ("channel", "state", "since", "until", "type", "control_id", "sender", "destination",
                 "destination_state", "patient", "authority", "limit", "before")
#: No scripts, no other sites, no framing; no Referer, as page addresses can hold search terms.
HEADERS = ((b"content-security-policy", b"default-src 'none'; style-src 'self'; form-action 'self'; "
                                        b"frame-ancestors 'none'; base-uri 'none'"),
           (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer"))
#: The error text of each destination's queue head: why a blocked queue waits.
HEAD_ERRORS = (sa.select(deliveries.c.channel, deliveries.c.destination, deliveries.c.last_error)
               .where(deliveries.c.id.in_(sa.select(sa.func.min(deliveries.c.id))
                                          .where(deliveries.c.state.in_(PENDING_STATES))
                                          .group_by(deliveries.c.channel, deliveries.c.destination)),
                      deliveries.c.last_error.is_not(None)))


def browser_next(fields: dict) -> str | None:
    """Where a console form goes after login or logout: a path on this server, never another site.

    None when the request has no `next` field (an API client, which gets JSON).
    """
    if "next" not in fields:
        return None
    value = str(fields["next"])
    if (not value.startswith("/") or value.startswith(("//", "/\\"))
            or any(ord(c) < 32 or c == "\x7f" for c in value)):
        return "/"
    return value


def see_other(location: str) -> Raw:
    return Raw(b"", b"text/plain", 303, ((b"location", location.encode("utf-8")),))


class Console:
    def __init__(self, api: Api):
        self.api = api
        self.jinja = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True,
                                 undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        self.jinja.filters["age"] = _age

    def routes(self) -> list:
        # Pages are open to the server's gate and send a visitor without a session to the
        # login form themselves; a 401 in JSON is no answer for a browser.
        return [
            route("GET", "/login", None, self.login_page),
            route("GET", "/ui/console.css", None, self.stylesheet),
            route("GET", "/", None, self.dashboard),
            route("GET", "/ui/messages", None, self.messages),
            route("GET", "/ui/messages/{message_id}", None, self.message),
            route("POST", "/ui/messages/{message_id}/replay", "operator", self.replay, changes=True,
                  max_body=8192),
            route("GET", "/ui/dead", None, self.dead),
            route("GET", "/ui/dead/{delivery_id}", "operator", self.dead_letter),
            route("POST", "/ui/dead/{delivery_id}/resend", "operator", self.resend, changes=True),
        ]

    # -- pages --------------------------------------------------------------------------

    def login_page(self, request):
        args = _args(request)
        return self._page(request, "login.html", next=browser_next(args) or "/", failed="failed" in args)

    def stylesheet(self, request):
        return Raw((TEMPLATES / "console.css").read_bytes(), b"text/css; charset=utf-8")

    def dashboard(self, request):
        if request.principal is None:
            return _to_login(request)
        errors = request.principal.may("analyst")   # a far side's error text may quote the message
        engine = self.api.engine

        def work():
            status = engine.store.status()
            heads = {}
            if errors:
                with engine.store._connect() as conn:
                    heads = {(c, d): e for c, d, e in conn.execute(HEAD_ERRORS)}
            return status, heads

        def render(found):
            status, heads = found
            queues = [{"channel": c, "destination": d, **v, "last_error": heads.get((c, d)),
                       "stuck": _stuck(v)} for (c, d), v in sorted(status.destinations.items())]
            channels = [{"name": name, "counts": [n.get(s, 0) for s in MESSAGE_STATES],
                         "stuck": n.get("error", 0) > 0 or n.get("dead", 0) > 0
                         or any(q["stuck"] for q in queues if q["channel"] == name)}
                        for name, n in sorted(status.channels.items(), key=lambda i: (i[0] is None, i[0] or ""))]
            return self._page(request, "dashboard.html", channels=channels, queues=queues,
                              message_states=MESSAGE_STATES, delivery_states=DELIVERY_STATES,
                              show_errors=errors, refresh=REFRESH_S, stuck_after=STUCK_AFTER_S)
        return threads.deferToThread(work).addCallback(render)

    def messages(self, request):
        if request.principal is None:
            return _to_login(request)
        args = {k: v for k, v in _args(request).items() if k in SEARCH_FIELDS and v.strip()}

        def show(rows=None, more=None):
            return self._page(request, "messages.html", args=args, rows=rows, more=more,
                              channels=sorted(c.name for c in self.api.engine.channels),
                              message_states=MESSAGE_STATES, delivery_states=DELIVERY_STATES,
                              patients=request.principal.may("analyst"))
        if not args:
            return show()
        limit = int(args["limit"]) if args.get("limit", "").isdigit() else 50
        d = defer.maybeDeferred(self.api.search, request, args)
        d.addCallback(lambda found: show(found["messages"], _next_page(args, found["messages"], limit)))
        return d.addErrback(self._refused, request)

    def message(self, request, message_id):
        if request.principal is None:
            return _to_login(request)
        d = defer.maybeDeferred(self.api.message, request, message_id, view="console")
        d.addCallback(lambda shown: self._page(request, "message.html", m=shown, full="raw" in shown,
                                               replay=self._replay_form(request, shown)))
        return d.addErrback(self._refused, request)

    def replay(self, request, message_id):
        """The replay form's POST: the API's replay for one message, then its result."""
        from ..replay import CURRENT

        request.content.seek(0)
        form = parse_qs(request.content.read().decode("utf-8", "replace"))
        action = form.get("action", [""])[0]
        if action not in ("dry-run", "replay"):       # a replay is only ever asked for by name
            return self._page(request, "error.html", 400, error="action: expected dry-run or replay")
        ids = [int(message_id)] if message_id.isdigit() else None    # None: the API's own refusal
        dry_run = action == "dry-run"
        d = defer.maybeDeferred(self.api.run_replay, request, ids, form.get("destination", []),
                                form.get("mapping", [CURRENT])[0], dry_run)
        d.addCallback(lambda result: self._page(request, "replayed.html", number=message_id, result=result,
                                                dry_run=dry_run))
        return d.addErrback(self._refused, request)

    def dead(self, request):
        """Dead letters, newest first; operators get a link to resend each."""
        if request.principal is None:
            return _to_login(request)
        d = defer.maybeDeferred(self.api.dead, request)
        d.addCallback(lambda found: self._page(request, "dead.html", rows=found["dead"],
                                               resend=request.principal.may("operator")))
        return d.addErrback(self._refused, request)

    def dead_letter(self, request, delivery_id):
        """One dead letter with its message in an editable box: resend as it was, or edited."""
        store = self.api.engine.store

        def look_up():
            dead = control.delivery(store, int(delivery_id)) if delivery_id.isdigit() else None
            if dead is None or dead["state"] != "dead":
                raise ApiError(404, f"no dead delivery {delivery_id}")
            return dead

        def show(dead):
            d = defer.maybeDeferred(self.api.message, request, str(dead["message_id"]), view="console")
            return d.addCallback(lambda m: self._page(request, "dead_letter.html", dead=dead, m=m))
        d = threads.deferToThread(look_up).addCallback(show)
        return d.addErrback(self._refused, request)

    def resend(self, request, delivery_id):
        """The dead-letter form's POST: the API's resend, then its result."""
        request.content.seek(0)
        form = parse_qs(request.content.read().decode("utf-8", "replace"), keep_blank_values=True)
        action = form.get("action", [""])[0]
        if action not in ("as-is", "edited"):
            return self._page(request, "error.html", 400, error="action: expected as-is or edited")
        edited = form.get("raw", [""])[0] if action == "edited" else None
        d = defer.maybeDeferred(self.api.run_resend, request, delivery_id, edited)
        d.addCallback(lambda result: self._page(request, "resent.html", number=delivery_id, result=result))
        return d.addErrback(self._refused, request)

    # -- parts --------------------------------------------------------------------------

    def _replay_form(self, request, shown) -> dict | None:
        """The destinations a replay may choose from, for operators; None: no form."""
        if not request.principal.may("operator") or shown["channel"] is None:
            return None
        channel = next((c for c in self.api.engine.channels if c.name == shown["channel"]), None)
        names = [d.name for d in channel.destinations] if channel is not None else []
        return {"destinations": names or sorted({d["destination"] for d in shown["deliveries"]})}

    def _page(self, request, template: str, status: int = 200, **values) -> Raw:
        principal = request.principal
        body = self.jinja.get_template(template).render(principal=principal, **values)
        return Raw(body.encode("utf-8"), b"text/html; charset=utf-8", status, HEADERS)

    def _refused(self, failure, request):
        """An ApiError (bad input, no such message, not allowed) as a page; anything else goes on."""
        failure.trap(ApiError)
        return self._page(request, "error.html", failure.value.status, error=str(failure.value))


def _stuck(queue: dict) -> bool:
    age = queue["oldest_queued_age_s"]
    return queue["error"] > 0 or queue["dead"] > 0 or (age is not None and age > STUCK_AFTER_S)


def _next_page(args: dict, rows: list[dict], limit: int) -> dict | None:
    """The search for the next page (older messages), when this one is full."""
    return args | {"before": str(rows[-1]["id"])} if rows and len(rows) == limit else None


def _args(request) -> dict[str, str]:
    return {k.decode("utf-8", "replace"): v[0].decode("utf-8", "replace") for k, v in request.args.items()}


def _to_login(request) -> Raw:
    return see_other("/login?next=" + quote(request.uri.decode("latin-1"), safe=""))

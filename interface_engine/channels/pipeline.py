"""What a channel makes of one message: filter, then per destination filter and transform.

One function for the running engine and for `channels test`, so a dry run shows
exactly what the engine would do.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from ..store import ERROR, FILTERED, QUEUED, NewDelivery
from .config import ChannelConfig, DestinationConfig
from ..fhir import bundle
from ..fhir.bundle import BundleError, NothingToSend, NotJSON
from .helpers import hl7_to_iso
from .templating import Mappings, RenderedJSON, TemplateError


@dataclass(frozen=True, slots=True)
class Decision:
    """The channel filter's verdict (a reason when filtered) and each destination's share."""

    filter_reason: str | None
    deliveries: tuple[NewDelivery, ...]


def variables(channel: ChannelConfig, destination: DestinationConfig | None = None) -> dict:
    """What every filter and template sees besides `msg`."""
    return {"channel": {"name": channel.name, "timezone": channel.timezone},
            "destination": {"name": destination.name, "type": destination.type} if destination else None}


def decide(channel: ChannelConfig, mappings: Mappings, msg, raw: bytes | None = None) -> Decision:
    """The channel filter, then each destination's share. `raw`: the bytes as stored, for
    destinations without a template."""
    if channel.when:
        try:
            taken = mappings.filter(channel.when)(msg, timezone=channel.timezone,
                                                  variables=variables(channel))
        except TemplateError as e:
            # Not a verdict: every destination fails, visibly, and is retried per its policy.
            error = f"channel filter failed: {e}"
            return Decision(None, tuple(NewDelivery(d.name, ERROR, error=error)
                                        for d in channel.destinations))
        if not taken:
            return Decision(f"channel filter: {channel.when}", ())
    return Decision(None, tuple(prepare(channel, d, mappings, msg, raw) for d in channel.destinations))


def prepare_again(channel: ChannelConfig, destination: DestinationConfig, mappings: Mappings, msg,
                  raw: bytes) -> NewDelivery:
    """A delivery rendered anew at a retry: the channel filter may have been changed since too."""
    if channel.when:
        try:
            if not mappings.filter(channel.when)(msg, timezone=channel.timezone,
                                                 variables=variables(channel)):
                return NewDelivery(destination.name, FILTERED, error=f"channel filter: {channel.when}")
        except TemplateError as e:
            return NewDelivery(destination.name, ERROR, error=f"channel filter failed: {e}")
    return prepare(channel, destination, mappings, msg, raw)


def prepare(channel: ChannelConfig, destination: DestinationConfig, mappings: Mappings, msg,
            raw: bytes | None = None) -> NewDelivery:
    """One destination's filter, payload and target; a failure is an `error` delivery, not an exception."""
    context = variables(channel, destination)
    try:
        if destination.when and not mappings.filter(destination.when)(
                msg, timezone=channel.timezone, variables=context):
            return NewDelivery(destination.name, FILTERED, error=f"destination filter: {destination.when}")
        if destination.type == "fhir":
            output = fhir_output(mappings, destination.template, msg, channel.timezone, context)
        elif destination.template:
            output = mappings.render(destination.template, msg, timezone=channel.timezone,
                                     variables=context)
        else:
            output = raw if raw is not None else msg.to_bytes()
        target = None
        if destination.type == "file":
            target = safe_target(destination.path, mappings.render_string(
                destination.path, msg, timezone=channel.timezone, variables=context))
    except NothingToSend as e:
        # Not a failure: an error here would hold a `block` queue for good.
        return NewDelivery(destination.name, FILTERED, error=str(e))
    except (TemplateError, BundleError) as e:
        return NewDelivery(destination.name, ERROR, error=str(e))
    return NewDelivery(destination.name, QUEUED, output=output, target=target)


def fhir_output(mappings: Mappings, template: str, msg, zone: str, context: dict) -> bytes:
    """The Bundle a fhir destination sends: the template's values handed to the Bundle step as they are.

    Values that JSON cannot carry as built (a NaN, a key that is not text, an
    object) go through the json render instead, which writes them as ``tojson``
    does or fails the delivery as it would for any template.
    """
    rendered = mappings.render_value(template, msg, timezone=zone, variables=context)
    try:
        return fhir_bundle(rendered, msg, zone)
    except NotJSON:
        if not rendered.as_built:
            raise
    return fhir_bundle(RenderedJSON(json.loads(mappings.render(template, msg, kind="json", timezone=zone,
                                                               variables=context)), False), msg, zone)


def fhir_bundle(rendered: RenderedJSON, msg, zone: str) -> bytes:
    """A FHIR template's output (``Mappings.render_value``) made into the transaction Bundle that is sent."""
    header = msg.header
    source = {"application": header.sending_application, "facility": header.sending_facility,
              "control_id": header.control_id, "sha256": hashlib.sha256(msg.to_bytes()).hexdigest(),
              "type": f"{header.message_type}^{header.trigger_event}".rstrip("^"),
              # MSH-7 when it is precise to the second; otherwise the time of sending
              "recorded": hl7_to_iso(header.timestamp, ZoneInfo(zone), instant=True) or None}
    return bundle.transaction(rendered.value, source, sort_keys=rendered.as_built)


def safe_target(template: str, rendered: str) -> str:
    """A file path rendered from message content must stay under the template's fixed folder.

    `var/archive/{{ msg['MSH-4'] }}/...` with MSH-4 = `../../etc` would otherwise
    write outside the archive.
    """
    fixed = template.split("{", 1)[0]
    base = os.path.normpath(os.path.dirname(fixed) if not fixed.endswith("/") else fixed)
    target = os.path.normpath(rendered)
    if not rendered.strip() or "\x00" in rendered or rendered.endswith(("/", os.sep)):
        raise TemplateError(f"path template {template!r} rendered an empty or invalid file name")
    if base in ("", "."):
        outside = os.path.isabs(target)  # no fixed folder: the message may not pick an absolute one
    else:
        outside = os.path.isabs(base) != os.path.isabs(target) or os.path.commonpath([base, target]) != base
    if outside or ".." in target.split(os.sep):
        raise TemplateError(f"path template {template!r} rendered a path outside {base or '.'}/")
    return target

"""What a channel makes of one message: filter, then per destination filter and transform.

One function for the running engine and for `channels test`, so a dry run shows
exactly what the engine would do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..store import ERROR, FILTERED, QUEUED, NewDelivery
from .config import ChannelConfig, DestinationConfig
from .templating import Mappings, TemplateError


@dataclass(frozen=True, slots=True)
class Decision:
    """The channel filter's verdict (a reason when filtered) and each destination's share."""

    filter_reason: str | None
    deliveries: tuple[NewDelivery, ...]


def variables(channel: ChannelConfig, destination: DestinationConfig | None = None) -> dict:
    """What every filter and template sees besides `msg`."""
    return {"channel": {"name": channel.name, "timezone": channel.timezone},
            "destination": {"name": destination.name, "type": destination.type} if destination else None}


def decide(channel: ChannelConfig, mappings: Mappings, msg) -> Decision:
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
    return Decision(None, tuple(prepare(channel, d, mappings, msg) for d in channel.destinations))


def prepare(channel: ChannelConfig, destination: DestinationConfig, mappings: Mappings, msg,
            raw: bytes | None = None) -> NewDelivery:
    """One destination's filter, payload and target; a failure is an `error` delivery, not an exception."""
    context = variables(channel, destination)
    try:
        if destination.when and not mappings.filter(destination.when)(
                msg, timezone=channel.timezone, variables=context):
            return NewDelivery(destination.name, FILTERED, error=f"destination filter: {destination.when}")
        if destination.template:
            output = mappings.render(destination.template, msg, timezone=channel.timezone,
                                     variables=context)
        else:
            output = raw if raw is not None else msg.to_bytes()
        target = None
        if destination.type == "file":
            target = safe_target(destination.path, mappings.render_string(
                destination.path, msg, timezone=channel.timezone, variables=context))
    except TemplateError as e:
        return NewDelivery(destination.name, ERROR, error=str(e))
    return NewDelivery(destination.name, QUEUED, output=output, target=target)


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
    outside = base not in ("", ".") and os.path.commonpath([base, target]) != base
    if outside or ".." in target.split(os.sep):
        raise TemplateError(f"path template {template!r} rendered a path outside {base or '.'}/")
    return target

"""Routing, path safety and re-rendering rules, tested on their own."""

import pytest

from interface_engine import hl7
from interface_engine.channels.config import parse_channel
from interface_engine.channels.pipeline import prepare_again, safe_target
from interface_engine.channels.templating import Mappings, TemplateError
from interface_engine.config import ConfigError, HL7Config, ListenerConfig, parse
from interface_engine.channels.config import check_together
from interface_engine.ingest import Ingest
from tests.messages import adt_a01


def channel(name, types, when=None, extra=""):
    data = {"name": name, "source": {"type": "mllp", "listener": "default", "message_types": types},
            "destinations": [{"name": "out", "type": "file", "path": "out/{{ msg['MSH-10'] }}"}]}
    if when:
        data["filter"] = {"when": when}
    return parse_channel(data, f"{name}.toml")


def test_the_most_specific_pattern_takes_the_message():
    general, specific, anything = channel("general", ["ADT"]), channel("a08", ["ADT^A08"]), channel("rest", ["*"])
    ingest = Ingest(None, ListenerConfig(name="default"), HL7Config(), routes=[anything, general, specific])
    a08 = hl7.peek(adt_a01("R1").replace(b"ADT^A01^", b"ADT^A08^"))
    assert ingest.route(a08)[0] is specific
    assert ingest.route(hl7.peek(adt_a01("R2")))[0] is general
    assert ingest.route(hl7.peek(adt_a01("R3").replace(b"ADT^A01^", b"ORU^R01^")))[0] is anything


def test_own_ports_cannot_collide():
    engine = parse({"listeners": [{"name": "default", "port": 2575}]}, "engine.toml")
    own = {"type": "mllp", "port": 2600}
    a = parse_channel({"name": "a", "source": own | {"message_types": ["ADT"]},
                       "destinations": [{"name": "o", "type": "file", "path": "x/{{ msg['MSH-10'] }}"}]}, "a.toml")
    b = parse_channel({"name": "b", "source": own | {"message_types": ["ORU"]},
                       "destinations": [{"name": "o", "type": "file", "path": "x/{{ msg['MSH-10'] }}"}]}, "b.toml")
    with pytest.raises(ConfigError, match="already used by channel 'a'"):
        check_together([a, b], engine)
    c = parse_channel({"name": "c", "source": {"type": "mllp", "port": 2575},
                       "destinations": [{"name": "o", "type": "file", "path": "x/{{ msg['MSH-10'] }}"}]}, "c.toml")
    with pytest.raises(ConfigError, match="listener 'default'"):
        check_together([c], engine)


@pytest.mark.parametrize("template, rendered, ok", [
    ("var/archive/{{ x }}.hl7", "var/archive/GEN/1.hl7", True),
    ("var/archive/{{ x }}.hl7", "var/archive/../../etc/passwd", False),
    ("var/archive/{{ x }}.hl7", "var/archive2/x.hl7", False),
    ("{{ x }}.hl7", "relative/name.hl7", True),
    ("{{ x }}.hl7", "/etc/cron.d/x.hl7", False),
    ("{{ x }}.hl7", "../x.hl7", False),
    ("/data/out/{{ x }}", "/data/out/a/b", True),
    ("/data/out/{{ x }}", "/data/other", False),
])
def test_rendered_paths_stay_where_the_template_says(template, rendered, ok):
    if ok:
        assert safe_target(template, rendered)
    else:
        with pytest.raises(TemplateError):
            safe_target(template, rendered)


def test_a_retry_checks_the_channel_filter_again(tmp_path):
    mappings = Mappings(tmp_path)
    raw = adt_a01("AGAIN1")
    now_refused = channel("adt", ["ADT"], when="msg['MSH-9.2'] == 'A08'")
    delivery = prepare_again(now_refused, now_refused.destinations[0], mappings, hl7.parse(raw), raw)
    assert delivery.state == "filtered" and "channel filter" in delivery.error
    taken = channel("adt", ["ADT"])
    delivery = prepare_again(taken, taken.destinations[0], mappings, hl7.parse(raw), raw)
    assert delivery.state == "queued" and delivery.output == raw

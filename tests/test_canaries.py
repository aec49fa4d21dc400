"""The check run on every engine log of the suite: it must find patient data in any form."""

import base64

import pytest

from tests.conftest import CANARIES, leaks


@pytest.mark.parametrize("value", CANARIES)
@pytest.mark.parametrize("disguise", [
    lambda v: v, lambda v: v.replace("^", "\\S\\"), lambda v: v.encode().hex(), lambda v: v.encode().hex().upper(),
    lambda v: base64.b64encode(v.encode()).decode(), lambda v: base64.b64encode(b"x" + v.encode()).decode(),
    lambda v: base64.b64encode(b"xy" + v.encode() + b"z").decode(),
], ids=["clear", "escaped", "hex", "HEX", "b64", "b64+1", "b64+2"])
def test_each_disguise_of_a_canary_is_found(value, disguise):
    assert leaks(f"2026-01-01T00:00:00 [engine#info] something {disguise(value)} more")


def test_a_log_of_ids_types_and_peers_is_clean():
    assert not leaks("stored ADT^A01 'MSG00001' from 127.0.0.1 as message 1\nrejected message 2: MSH-9 empty")

"""The key file: created private, never replaced, and every problem one clear line."""

import os
import stat

import pytest

from interface_engine import keys
from tests.test_cli import assert_one_line_error, cli


def test_a_new_key_file_is_private_and_holds_a_key_per_purpose(tmp_path):
    made = keys.create(tmp_path / "var" / "keys.json")
    assert stat.S_IMODE(os.stat(made.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "var").st_mode) == 0o700
    assert len(made.index) == len(made.audit) == keys.KEY_BYTES and made.index != made.audit
    assert keys.load(made.path) == made


def test_an_existing_key_file_is_never_replaced(tmp_path):
    first = keys.create(tmp_path / "keys.json")
    with pytest.raises(keys.KeyFileError, match="already there"):
        keys.create(tmp_path / "keys.json")
    assert keys.load(tmp_path / "keys.json") == first
    assert keys.load_or_create(tmp_path / "keys.json") == (first, None)


def test_patient_hash_is_stable_keyed_and_not_the_identifier(tmp_path):
    a = keys.create(tmp_path / "a.json")
    b = keys.create(tmp_path / "b.json")
    assert a.patient_hash("MRN-1", "HOSP") == a.patient_hash(" MRN-1 ", "hosp")
    assert a.patient_hash("MRN-1", "HOSP") != a.patient_hash("MRN-1", "OTHER")
    assert a.patient_hash("MRN-1", "HOSP") != b.patient_hash("MRN-1", "HOSP")
    assert "MRN-1" not in a.patient_hash("MRN-1", "HOSP")


@pytest.mark.parametrize("content, fragment", [
    (None, "keys init"),
    ("{not json", "not valid JSON"),
    ('{"keys": {"index": "AAAA"}}', "lacks a valid key"),
    ('{"keys": {"index": "AAAA", "audit": "AAAA"}}', "wrong length"),
])
def test_a_missing_or_damaged_key_file_says_what_to_do(tmp_path, content, fragment):
    path = tmp_path / "keys.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(keys.KeyFileError, match=fragment):
        keys.load(path)


def test_keys_init_creates_the_configured_file_once(tmp_path):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "engine.toml").write_text('[keys]\nfile = "secret/keys.json"\n')
    first = cli("keys", "init", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "secret" / "keys.json").st_mode) == 0o600
    before = (tmp_path / "secret" / "keys.json").read_bytes()
    assert_one_line_error(cli("keys", "init", cwd=tmp_path), "already there")
    assert (tmp_path / "secret" / "keys.json").read_bytes() == before
    assert before.decode() not in first.stdout + first.stderr

"""Engine config: the store's password is a reference, never a value written in the file."""

from __future__ import annotations

import pytest

from interface_engine.config import ConfigError, parse
from tests.test_cli import assert_one_line_error, cli


def test_a_password_in_the_store_url_is_refused():
    with pytest.raises(ConfigError, match=r"engine.toml: store.url: holds a password"):
        parse({"store": {"url": "postgresql+psycopg://ie:s3cret-Value@db.example:5432/ie"}}, "engine.toml")


def test_the_password_comes_from_a_reference(monkeypatch, tmp_path):
    monkeypatch.setenv("IE_TEST_DB_PASSWORD", "from-the-environment")
    config = parse({"store": {"url": "postgresql+psycopg://ie@db.example:5432/ie",
                              "password": "env:IE_TEST_DB_PASSWORD"}}, "engine.toml")
    assert config.store.url == "postgresql+psycopg://ie:from-the-environment@db.example:5432/ie"
    secret = tmp_path / "db-password"
    secret.write_text("from-a-file\n")
    config = parse({"store": {"url": "postgresql+psycopg://ie@db.example/ie", "password": f"file:{secret}"}})
    assert config.store.url == "postgresql+psycopg://ie:from-a-file@db.example/ie"


@pytest.mark.parametrize("password, error", [
    ("literal-secret", "store.password: expected a reference such as env:NAME"),
    ("env:IE_TEST_UNSET_VARIABLE", "store.password: environment variable IE_TEST_UNSET_VARIABLE is not set"),
])
def test_a_bad_password_reference_says_which_key(password, error):
    with pytest.raises(ConfigError) as raised:
        parse({"store": {"url": "postgresql+psycopg://ie@db.example/ie", "password": password}}, "engine.toml")
    assert error in str(raised.value) and "literal-secret" not in str(raised.value)


def test_no_command_prints_the_store_password(tmp_path):
    (tmp_path / "conf").mkdir()
    (tmp_path / "pw").write_text("Canary-Passw0rd\n")
    (tmp_path / "conf" / "engine.toml").write_text(
        '[store]\nurl = "postgresql+psycopg://ie@127.0.0.1:1/ie"\n'
        f'password = "file:{tmp_path / "pw"}"\n')
    result = cli("db", "upgrade", cwd=tmp_path)
    assert_one_line_error(result, "cannot connect to the store")
    assert "Canary-Passw0rd" not in result.stdout + result.stderr


def test_the_store_writer_is_a_process_unless_told_otherwise():
    assert parse({}, "engine.toml").store.writer == "process"
    assert parse({"store": {"writer": "thread"}}, "engine.toml").store.writer == "thread"
    with pytest.raises(ConfigError, match=r"engine.toml: store.writer: .*process.*thread"):
        parse({"store": {"writer": "fork"}}, "engine.toml")

"""The admin server against its OpenAPI file, by schemathesis: generated requests for every operation.

Each answer must have a documented status, content type and shape, no request may
cause a server error, a request the file says is invalid must be refused, and every
operation that needs credentials must refuse a request without them. Not checked:
that every request the file allows is accepted, since some rules are beyond what
the file can say (a time is ISO 8601 or an age like 2h; authority needs patient).
"""

from __future__ import annotations

import time

import pytest
import schemathesis
from schemathesis import checks
from hypothesis import HealthCheck, given, settings

from interface_engine.admin.api import OPENAPI
from tests.conftest import EngineProcess
from tests.receiver import Receiver
from tests.test_channels_e2e import adt_channel
from tests.test_cli import cli


@pytest.fixture(scope="module")
def console(tmp_path_factory):
    root = tmp_path_factory.mktemp("console")
    (root / "channels").mkdir()
    (root / "mappings" / "hl7").mkdir(parents=True)
    (root / "mappings" / "hl7" / "forward.hl7.j2").write_text("{{ msg }}\n")
    with Receiver() as downstream:
        (root / "channels" / "adt.toml").write_text(adt_channel(downstream.port))
        engine = EngineProcess(root, f"sqlite:///{root / 'store.db'}",
                               extra=f'[channels]\ndirectory = "{root / "channels"}"\n'
                                     f'mappings = "{root / "mappings"}"\n').start()
        try:
            token = cli("tokens", "create", "schemathesis", "--role", "admin", "--config",
                        engine.config_path).stdout.strip()
            time.sleep(2.5)   # the engine re-reads its tokens every 2 s
            yield engine, token
        finally:
            engine.stop()


@pytest.mark.slow
def test_every_operation_answers_as_the_openapi_file_says(console):
    engine, token = console
    schema = schemathesis.openapi.from_path(OPENAPI)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 19

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def answers_as_described(case):
            case.call_and_validate(base_url=engine.admin_url, headers={"Authorization": f"Bearer {token}"},
                                   excluded_checks=[checks.positive_data_acceptance])
        answers_as_described()

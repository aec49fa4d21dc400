"""The promises the repository makes about itself: the two commands and the hardened unit."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    return re.findall(r"```sh\n(python3 -m venv[^\n]*)\n```", (ROOT / "README.md").read_text())


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    start, test = readme_commands()
    assert start.endswith("interface-engine run")
    assert test.endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci, ".ci/run must run the README's test command word for word"
    install = next(i for i, line in enumerate(ci) if "apt-get install" in line)
    assert "chromium chromium-driver" in ci[install] and install < ci.index(test), \
        ".ci/run must install the browser tests' Chromium before running the tests"


def test_systemd_unit_is_hardened():
    unit = (ROOT / "systemd" / "interface-engine.service").read_text()
    settings = dict(re.findall(r"^(\w+)=(.*)$", unit, re.M))
    assert settings["User"] == "interface-engine"
    assert settings["ProtectSystem"] == "strict"
    assert settings["ReadWritePaths"] == "/var/lib/interface-engine"
    assert settings["NoNewPrivileges"] == "yes" and settings["PrivateTmp"] == "yes"
    assert settings["Restart"] == "on-failure" and settings["KillSignal"] == "SIGTERM"
    assert "run --config" in settings["ExecStart"]

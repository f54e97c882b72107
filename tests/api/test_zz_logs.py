"""Every log line of the API tests run so far and of a representative run of the API of its
own (``api_traffic``, so it holds in any test order): the rotator's logs, the standard
library's, uvicorn's access log, CLI output. None holds a token the simulator issued or a key
the tests created (each test's own lines are also checked after it, by the log trap)."""

from __future__ import annotations

from tests.api.conftest import LogTrap


def test_no_token_or_key_in_any_log_line(log_trap: LogTrap, api_traffic: None) -> None:
    text = log_trap.text()
    lines = text.splitlines()
    assert len(lines) > 100, "the log trap caught (almost) nothing: is it installed?"
    assert any('"GET /v1/tokens/' in line for line in lines), "no access log line was caught"
    assert len(log_trap.secrets) > 20
    leaked = [s[:12] for s in log_trap.secrets if s in text]
    assert leaked == [], f"secrets in the logs (first characters): {leaked}"

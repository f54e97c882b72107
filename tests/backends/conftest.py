"""Fixtures shared by the backend tests."""

from __future__ import annotations

import pytest

# contract.py is a helper module, not a test module: let pytest rewrite its asserts too
pytest.register_assert_rewrite("tests.backends.contract")

from rotator.crypto import generate_key  # noqa: E402

KEY_ENV = "ROTATOR_TEST_SEALING_KEY"


@pytest.fixture
def key_env(monkeypatch: pytest.MonkeyPatch) -> str:
    """The name of an environment variable holding a fresh sealing key."""
    monkeypatch.setenv(KEY_ENV, generate_key())
    return KEY_ENV

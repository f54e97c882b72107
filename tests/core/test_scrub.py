"""The one scrubber catches every case each of the three former ones (the logs', the backends',
Makini's errors') caught."""

from __future__ import annotations

import pytest

from rotator.scrub import mask, scrub

JWT = "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ0ZXN0In0.c2lnbmF0dXJl"
VAULT = "hvs.CAESIJ0aGVyZWlzbm90aGluZ2hlcmUxMjM0NTY3"
OPAQUE = "opaque-token-value-that-is-not-a-jwt-at-all-0123456789"

# (text, what must not survive)
LOGS = [
    (f"token={JWT}", JWT),
    (f"leaked: {JWT}", JWT),
    ("Authorization: Bearer abcdefgh12345", "abcdefgh12345"),
    ("key mrk_0123456789ab_s3cr3tPart-xyz", "s3cr3tPart-xyz"),
    ("key mra_0123456789ab_s3cr3tPart-xyz", "s3cr3tPart-xyz"),
]
BACKENDS = [
    (f"Authorization: Bearer {JWT}", JWT),
    (f"token {VAULT} is not allowed", VAULT),
    (f'{{"access_token": "{JWT}", "x": 1}}', JWT),
    (f"X-Vault-Token: {VAULT}", VAULT),
    ("key AKIAIOSFODNN7EXAMPLE denied", "AKIAIOSFODNN7EXAMPLE"),
    (f"refresh_token={JWT}&grant=x", JWT),
    ("Basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA=="),
    ('"password": "hunter2-but-longer"', "hunter2-but-longer"),
    ("secret=abc123def", "abc123def"),
]
MAKINI = [
    ("eyJhbGciOiJIUzI1NiJ9 fragment", "eyJhbGciOiJIUzI1NiJ9"),
    (f"{JWT.rsplit('.', 1)[0]}.", JWT.rsplit(".", 1)[0]),
]


@pytest.mark.parametrize(("text", "secret"), LOGS + BACKENDS + MAKINI)
def test_every_former_case_is_masked(text: str, secret: str) -> None:
    assert secret not in mask(text)
    assert secret not in scrub(text)


def test_the_marks_say_what_was_found() -> None:
    assert mask(f"leaked: {JWT}") == "leaked: [masked-token]"
    assert "redacted" in scrub(f"X-Vault-Token: {VAULT}")
    assert mask("key mrk_0123456789ab_s3cr3t") == "key mrk_0123456789ab_[masked]"


def test_known_secrets_and_opaque_runs_in_foreign_text() -> None:
    out = scrub(f"token {OPAQUE} is bad", secrets=[OPAQUE])
    assert OPAQUE not in out and "[masked]" in out
    assert OPAQUE not in scrub(f"echoed {OPAQUE} back")  # unknown, but long and opaque
    assert OPAQUE not in mask("x", secrets=[OPAQUE]) and mask(OPAQUE, [OPAQUE]) == "[masked]"


def test_our_own_long_names_survive_in_logs() -> None:
    fingerprint = "a" * 64
    name = "a-credential-name-that-is-rather-long-indeed-0123"
    assert mask(f"{name} {fingerprint}") == f"{name} {fingerprint}"


def test_foreign_text_becomes_one_bounded_line() -> None:
    assert scrub("a\n  b\tc") == "a b c"
    long = scrub("word " * 200, limit=50)
    assert len(long) == 50 and long.endswith("…")

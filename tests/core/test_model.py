"""Tokens print as fingerprints; sealed data opens only with its key and its place."""

from __future__ import annotations

import pickle

import pytest

from rotator.crypto import KeyRing, KeySource, generate_key
from rotator.errors import ConfigError, CryptoError
from rotator.model import Secret, StoredVersion, TokenPair, fingerprint, new_version_id
from rotator.scrub import mask

TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ0ZXN0In0.c2lnbmF0dXJl"


def test_secret_never_prints_its_value() -> None:
    s = Secret(TOKEN)
    for text in (repr(s), str(s), f"{s}", f"{s!r}", repr([s]), repr({"t": s})):
        assert TOKEN not in text and "sha256:" in text
    assert s.fingerprint == fingerprint(TOKEN)
    assert s == Secret(TOKEN) and s != Secret(TOKEN + "x")
    with pytest.raises(TypeError):
        pickle.dumps(s)


def test_version_ids_sort_by_time_and_are_unique() -> None:
    ids = [new_version_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert ids[0][:8] <= ids[-1][:8]


def test_document_round_trip_and_bad_documents() -> None:
    v = StoredVersion("prod", "a", new_version_id(), TokenPair(Secret(TOKEN), Secret("r" * 20)))
    back = StoredVersion.from_json(v.to_json())
    assert back.tokens.access == v.tokens.access and back.tokens.refresh == v.tokens.refresh
    for bad in ("not json", "[]", '{"managed_by": "someone"}', '{"managed_by": "makini-rotator"}'):
        with pytest.raises(ValueError) as info:
            StoredVersion.from_json(bad)
        assert TOKEN not in str(info.value)


def test_keyring_seal_open_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("K1", generate_key())
    ring = KeyRing.load(KeySource(env="K1"))
    blob = ring.seal(b"secret", "prod/a/v1")
    assert b"secret" not in blob
    assert ring.open(blob, "prod/a/v1") == b"secret"
    with pytest.raises(CryptoError, match="moved from another credential"):
        ring.open(blob, "prod/b/v1")
    with pytest.raises(CryptoError, match="corrupt"):
        ring.open(blob[:-1] + bytes([blob[-1] ^ 1]), "prod/a/v1")
    other = KeyRing([bytes(32)])
    with pytest.raises(CryptoError) as info:
        other.open(blob, "prod/a/v1")
    assert ring.key_id in info.value.message
    # rotation: new key first, old key still opens old data
    monkeypatch.setenv("K2", generate_key() + "," + __import__("os").environ["K1"])
    rotated = KeyRing.load(KeySource(env="K2"))
    assert rotated.open(blob, "prod/a/v1") == b"secret"
    assert rotated.key_id != ring.key_id


def test_key_sources(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    base = Path(str(tmp_path))
    monkeypatch.delenv("NOPE", raising=False)
    with pytest.raises(ConfigError, match="NOPE is not set"):
        KeyRing.load(KeySource(env="NOPE"))
    monkeypatch.setenv("SHORT", "abc")
    with pytest.raises(ConfigError, match="32 bytes"):
        KeyRing.load(KeySource(env="SHORT"))
    with pytest.raises(ConfigError, match="does not exist"):
        KeyRing.load(KeySource(file=base / "missing.key"))
    generated = base / "sub" / "gen.key"
    KeyRing.load(KeySource(file=generated, generate=True))
    assert generated.stat().st_mode & 0o777 == 0o600
    assert KeyRing.load(KeySource(file=generated)).key_id


def test_mask_catches_jwts_and_bearer_headers() -> None:
    assert TOKEN not in mask(f"token={TOKEN}")
    assert "abcdefgh12345" not in mask("Authorization: Bearer abcdefgh12345")

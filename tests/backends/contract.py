"""The behaviour every backend must show: one suite, run against each backend by subclassing.

A backend's test module subclasses :class:`BackendContract` and provides one fixture,
``make_backend``: a factory ``(environment: str) -> Backend`` that builds a **new instance on
every call**, all on the same store, whose location is **empty when the test starts** (a fresh
folder, prefix, mount path or vault per test). Build the instance exactly as production does
(``Backend(settings, environment)`` with the same settings for every environment), so the
location each environment gets is the backend's own decision. Close what you built at teardown;
:class:`BackendFactory` does that::

    class TestAwsBackend(BackendContract):
        @pytest.fixture
        def make_backend(self, moto_endpoint: str) -> Iterator[MakeBackend]:
            settings = AwsSettings(endpoint_url=moto_endpoint, prefix=f"t{uuid.uuid4().hex[:8]}")
            with BackendFactory(lambda env: AwsBackend(settings, env)) as make:
                yield make

The ``backend`` fixture (``make_backend(BackendContract.ENVIRONMENT)``) is derived from it; a
subclass may override it too. Tests consult ``backend.capabilities``, never the backend's kind.
Backend-specific behaviour (encryption at rest, permissions, vendor error mapping) belongs in the
backend's own test module, next to its subclass.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from types import TracebackType

import pytest

from backends.base import Backend
from rotator.errors import BackendConflict, BackendError, NotFound, RotatorError
from rotator.model import Secret, Stage, StoredVersion, TokenPair, VersionInfo, new_version_id

MakeBackend = Callable[[str], Backend]

__all__ = ["BackendContract", "BackendFactory", "MakeBackend", "fake_jwt", "make_version"]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def fake_jwt(subject: str = "connection") -> str:
    """A random token shaped like a JWT (header.payload.signature); unique every call."""
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64url(
        json.dumps(
            {
                "sub": subject,
                "jti": secrets.token_hex(16),
                "iat": int(datetime.now(UTC).timestamp()),
            }
        ).encode()
    )
    return f"{header}.{payload}.{_b64url(os.urandom(32))}"


def make_version(
    env: str,
    cred: str,
    *,
    version_id: str | None = None,
    refresh: bool = True,
    expires_in: timedelta | None = timedelta(hours=1),
    created_at: datetime | None = None,
) -> StoredVersion:
    """A version of ``env/cred`` with fresh random JWT-looking tokens (times in whole seconds)."""
    now = datetime.now(UTC).replace(microsecond=0)
    return StoredVersion(
        environment=env,
        credential=cred,
        version_id=version_id or new_version_id(),
        tokens=TokenPair(
            access=Secret(fake_jwt(cred)),
            refresh=Secret(fake_jwt(cred)) if refresh else None,
            expires_at=now + expires_in if expires_in is not None else None,
            refresh_expires_at=now + timedelta(days=30) if refresh else None,
        ),
        created_at=created_at or now,
    )


def token_fragments(version: StoredVersion) -> list[str]:
    """The plain token values of ``version`` and their signature parts (which are random)."""
    out = []
    for secret in (version.tokens.access, version.tokens.refresh):
        if secret is not None:
            value = secret.reveal()
            out += [value, value.rsplit(".", 1)[-1]]
    return out


def error_texts(exc: BaseException) -> str:
    """Everything an error would print, down its chain of causes."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts += [str(current), repr(current), *map(str, current.args)]
        if isinstance(current, RotatorError):
            parts += [current.describe(), str(current.where), str(current.hint)]
        current = current.__cause__ or current.__context__
    return "\n".join(parts)


class BackendFactory:
    """A ``make_backend`` that closes every backend it built when the ``with`` block ends."""

    def __init__(self, build: MakeBackend) -> None:
        self._build = build
        self.built: list[Backend] = []

    def __call__(self, environment: str) -> Backend:
        backend = self._build(environment)
        self.built.append(backend)
        return backend

    def __enter__(self) -> BackendFactory:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for backend in self.built:
            backend.close()


def _ids(infos: list[VersionInfo]) -> list[str]:
    return [i.version_id for i in infos]


class BackendContract:
    """The stage semantics of ``backends/base.py``, checked against one backend."""

    ENVIRONMENT = "prod"
    OTHER_ENVIRONMENT = "dev"
    CREDENTIAL = "acme-sap"

    @pytest.fixture
    def backend(self, make_backend: MakeBackend) -> Backend:
        return make_backend(self.ENVIRONMENT)

    def version(
        self,
        cred: str | None = None,
        *,
        refresh: bool = True,
        expires_in: timedelta | None = timedelta(hours=1),
    ) -> StoredVersion:
        return make_version(
            self.ENVIRONMENT, cred or self.CREDENTIAL, refresh=refresh, expires_in=expires_in
        )

    def staged(self, backend: Backend, cred: str | None = None) -> StoredVersion:
        v = self.version(cred)
        backend.stage_pending(v)
        return v

    def promoted(self, backend: Backend, cred: str | None = None) -> StoredVersion:
        v = self.staged(backend, cred)
        backend.promote(v.credential, v.version_id)
        return v

    def assert_same_tokens(self, got: StoredVersion | None, want: StoredVersion) -> None:
        assert got is not None, f"version {want.version_id} not readable"
        assert got.environment == want.environment
        assert got.credential == want.credential
        assert got.version_id == want.version_id
        assert got.tokens.access.reveal() == want.tokens.access.reveal()
        if want.tokens.refresh is None:
            assert got.tokens.refresh is None
        else:
            assert got.tokens.refresh is not None
            assert got.tokens.refresh.reveal() == want.tokens.refresh.reveal()
        assert got.tokens.expires_at == want.tokens.expires_at
        assert got.tokens.refresh_expires_at == want.tokens.refresh_expires_at

    # -- basics --------------------------------------------------------------------------------

    def test_check_passes(self, backend: Backend) -> None:
        backend.check()

    def test_absent_credential_reads_as_nothing(self, backend: Backend) -> None:
        assert backend.read("nobody") is None
        for stage in Stage:
            assert backend.read("nobody", stage) is None
        assert backend.read_version("nobody", new_version_id()) is None
        assert backend.versions("nobody") == []
        assert "nobody" not in backend.credentials()

    @pytest.mark.parametrize("refresh", [True, False], ids=["with-refresh", "access-only"])
    def test_tokens_round_trip_exactly(self, backend: Backend, refresh: bool) -> None:
        v = self.version(refresh=refresh)
        backend.stage_pending(v)
        got = backend.read_version(v.credential, v.version_id)
        self.assert_same_tokens(got, v)
        assert got is not None and got.created_at == v.created_at

    def test_token_without_expiry_round_trips(self, backend: Backend) -> None:
        v = self.version(expires_in=None)
        backend.stage_pending(v)
        self.assert_same_tokens(backend.read(v.credential, Stage.PENDING), v)

    # -- stage_pending -------------------------------------------------------------------------

    def test_stage_pending_is_readable_as_pending(self, backend: Backend) -> None:
        v = self.staged(backend)
        got = backend.read(v.credential, Stage.PENDING)
        self.assert_same_tokens(got, v)
        assert got is not None and got.stage is Stage.PENDING
        by_id = backend.read_version(v.credential, v.version_id)
        assert by_id is not None and by_id.stage is Stage.PENDING
        assert backend.read(v.credential) is None  # nothing is current yet
        assert backend.read(v.credential, Stage.PREVIOUS) is None
        assert backend.versions(v.credential) == [VersionInfo(v.version_id, Stage.PENDING, True)]
        assert v.credential in backend.credentials()

    def test_stage_same_version_again_is_a_noop(self, backend: Backend) -> None:
        v = self.staged(backend)
        backend.stage_pending(v)
        backend.stage_pending(v)
        assert _ids(backend.versions(v.credential)) == [v.version_id]
        self.assert_same_tokens(backend.read(v.credential, Stage.PENDING), v)

        backend.promote(v.credential, v.version_id)
        backend.stage_pending(v)  # a retried stage after promotion changes nothing
        current = backend.read(v.credential)
        assert current is not None and current.version_id == v.version_id
        assert current.stage is Stage.CURRENT
        assert backend.read(v.credential, Stage.PENDING) is None
        assert len(backend.versions(v.credential)) == 1

    def test_second_pending_takes_the_label(self, backend: Backend) -> None:
        v1 = self.staged(backend)
        v2 = self.staged(backend)
        pending = backend.read(v1.credential, Stage.PENDING)
        assert pending is not None and pending.version_id == v2.version_id
        old = backend.read_version(v1.credential, v1.version_id)
        self.assert_same_tokens(old, v1)
        assert old is not None and old.stage is None
        assert backend.versions(v1.credential) == [
            VersionInfo(v1.version_id, None, True),
            VersionInfo(v2.version_id, Stage.PENDING, True),
        ]
        backend.stage_pending(v1)  # same id again: a no-op, the label stays on v2
        pending = backend.read(v1.credential, Stage.PENDING)
        assert pending is not None and pending.version_id == v2.version_id

    def test_versions_are_listed_oldest_first(self, backend: Backend) -> None:
        staged = [self.staged(backend) for _ in range(4)]
        assert _ids(backend.versions(self.CREDENTIAL)) == [v.version_id for v in staged]

    def test_refuses_a_version_of_another_environment(self, backend: Backend) -> None:
        v = make_version(self.OTHER_ENVIRONMENT, self.CREDENTIAL)
        with pytest.raises(BackendConflict) as info:
            backend.stage_pending(v)
        for fragment in token_fragments(v):
            assert fragment not in error_texts(info.value)
        assert backend.versions(self.CREDENTIAL) == []
        assert backend.read_version(self.CREDENTIAL, v.version_id) is None

    # -- promote -------------------------------------------------------------------------------

    def test_promote_first_version(self, backend: Backend) -> None:
        v = self.promoted(backend)
        current = backend.read(v.credential)
        self.assert_same_tokens(current, v)
        assert current is not None and current.stage is Stage.CURRENT
        assert backend.read(v.credential, Stage.PENDING) is None
        assert backend.read(v.credential, Stage.PREVIOUS) is None
        assert backend.versions(v.credential) == [VersionInfo(v.version_id, Stage.CURRENT, True)]

    def test_promote_moves_current_to_previous(self, backend: Backend) -> None:
        cred = self.CREDENTIAL
        v1 = self.promoted(backend)
        v2 = self.promoted(backend)
        self.assert_same_tokens(backend.read(cred), v2)
        self.assert_same_tokens(backend.read(cred, Stage.PREVIOUS), v1)
        previous = backend.read(cred, Stage.PREVIOUS)
        assert previous is not None and previous.stage is Stage.PREVIOUS

        v3 = self.promoted(backend)
        self.assert_same_tokens(backend.read(cred), v3)
        self.assert_same_tokens(backend.read(cred, Stage.PREVIOUS), v2)
        oldest = backend.read_version(cred, v1.version_id)  # no label, still readable by id
        self.assert_same_tokens(oldest, v1)
        assert oldest is not None and oldest.stage is None
        assert backend.versions(cred) == [
            VersionInfo(v1.version_id, None, True),
            VersionInfo(v2.version_id, Stage.PREVIOUS, True),
            VersionInfo(v3.version_id, Stage.CURRENT, True),
        ]
        backend.make_unreadable(cred, v1.version_id)
        assert backend.read_version(cred, v1.version_id) is None
        self.assert_same_tokens(backend.read(cred), v3)
        self.assert_same_tokens(backend.read(cred, Stage.PREVIOUS), v2)

    def test_promote_is_idempotent(self, backend: Backend) -> None:
        v1 = self.promoted(backend)
        v2 = self.promoted(backend)
        backend.promote(v2.credential, v2.version_id)
        backend.promote(v2.credential, v2.version_id)
        self.assert_same_tokens(backend.read(v2.credential), v2)
        self.assert_same_tokens(backend.read(v2.credential, Stage.PREVIOUS), v1)

    def test_promote_the_previous_version_back(self, backend: Backend) -> None:
        v1 = self.promoted(backend)
        v2 = self.promoted(backend)
        backend.promote(v1.credential, v1.version_id)
        self.assert_same_tokens(backend.read(v1.credential), v1)
        self.assert_same_tokens(backend.read(v1.credential, Stage.PREVIOUS), v2)

    def test_promote_unknown_version_is_not_found(self, backend: Backend) -> None:
        with pytest.raises(NotFound):
            backend.promote("nobody", new_version_id())
        v = self.promoted(backend)
        with pytest.raises(NotFound):
            backend.promote(v.credential, new_version_id())
        self.assert_same_tokens(backend.read(v.credential), v)

    def test_promote_unreadable_version_is_not_found(self, backend: Backend) -> None:
        v1 = self.promoted(backend)
        v2 = self.staged(backend)
        backend.make_unreadable(v2.credential, v2.version_id)
        with pytest.raises(NotFound):
            backend.promote(v2.credential, v2.version_id)
        self.assert_same_tokens(backend.read(v1.credential), v1)

    # -- make_unreadable -----------------------------------------------------------------------

    def test_make_unreadable(self, backend: Backend) -> None:
        cred = self.CREDENTIAL
        v1 = self.promoted(backend)
        v2 = self.promoted(backend)
        backend.make_unreadable(cred, v1.version_id)
        assert backend.read(cred, Stage.PREVIOUS) is None  # the label went with the value
        assert backend.read_version(cred, v1.version_id) is None
        assert backend.versions(cred) == [
            VersionInfo(v1.version_id, None, False),
            VersionInfo(v2.version_id, Stage.CURRENT, True),
        ]
        self.assert_same_tokens(backend.read(cred), v2)

    def test_make_unreadable_is_idempotent_and_unknown_is_fine(self, backend: Backend) -> None:
        cred = self.CREDENTIAL
        v = self.staged(backend)
        backend.make_unreadable(cred, v.version_id)
        backend.make_unreadable(cred, v.version_id)
        assert backend.read(cred, Stage.PENDING) is None
        assert backend.versions(cred) == [VersionInfo(v.version_id, None, False)]
        backend.make_unreadable(cred, new_version_id())
        backend.make_unreadable("nobody", new_version_id())
        assert backend.versions("nobody") == []

    def test_make_current_unreadable_drops_the_label(self, backend: Backend) -> None:
        v = self.promoted(backend)
        backend.make_unreadable(v.credential, v.version_id)
        assert backend.read(v.credential) is None
        assert backend.versions(v.credential) == [VersionInfo(v.version_id, None, False)]

    def test_current_version_id_follows_the_current_stage(self, backend: Backend) -> None:
        # what status and the backends-agree check compare with the journal, read as the
        # backend likes (the file backend does not open the token)
        cred = self.CREDENTIAL
        assert backend.current_version_id(cred) is None
        staged = self.staged(backend)
        assert backend.current_version_id(cred) is None  # pending is not current
        backend.promote(cred, staged.version_id)
        assert backend.current_version_id(cred) == staged.version_id
        v2 = self.promoted(backend)
        assert backend.current_version_id(cred) == v2.version_id
        backend.make_unreadable(cred, staged.version_id)  # the previous one: no change
        assert backend.current_version_id(cred) == v2.version_id
        backend.make_unreadable(cred, v2.version_id)
        assert backend.current_version_id(cred) is None
        backend.delete(cred)
        assert backend.current_version_id(cred) is None

    # -- delete and credentials ----------------------------------------------------------------

    def test_delete(self, backend: Backend) -> None:
        v = self.promoted(backend, "gone")
        kept = self.promoted(backend, "kept")
        backend.delete("gone")
        assert backend.read("gone") is None
        assert backend.read_version("gone", v.version_id) is None
        assert backend.versions("gone") == []
        assert "gone" not in backend.credentials()
        self.assert_same_tokens(backend.read("kept"), kept)
        backend.delete("gone")  # again: success
        backend.delete("nobody")
        again = self.promoted(backend, "gone")  # the name is free for a new start
        self.assert_same_tokens(backend.read("gone"), again)
        assert _ids(backend.versions("gone")) == [again.version_id]

    def test_credentials_lists_the_names(self, backend: Backend) -> None:
        assert backend.credentials() == []
        for name in ("beta", "alpha", "gamma-2"):
            self.staged(backend, name)
        assert sorted(backend.credentials()) == ["alpha", "beta", "gamma-2"]

    # -- instances, locations, environments ----------------------------------------------------

    def test_a_second_instance_sees_the_writes(self, make_backend: MakeBackend) -> None:
        """Two instances on one location are two clients of one store."""
        a, b = make_backend(self.ENVIRONMENT), make_backend(self.ENVIRONMENT)
        v1 = self.staged(a)
        self.assert_same_tokens(b.read(v1.credential, Stage.PENDING), v1)
        b.promote(v1.credential, v1.version_id)
        self.assert_same_tokens(a.read(v1.credential), v1)
        v2 = self.promoted(b)
        self.assert_same_tokens(a.read(v2.credential), v2)
        self.assert_same_tokens(a.read(v2.credential, Stage.PREVIOUS), v1)

    def test_data_survives_a_new_instance(self, make_backend: MakeBackend) -> None:
        first = make_backend(self.ENVIRONMENT)
        if not first.capabilities.persistent:
            pytest.skip("the backend keeps nothing across restarts (capabilities.persistent)")
        v = self.promoted(first)
        first.close()
        fresh = make_backend(self.ENVIRONMENT)
        self.assert_same_tokens(fresh.read(v.credential), v)
        assert fresh.credentials() == [v.credential]

    def test_environments_stay_apart(self, make_backend: MakeBackend) -> None:
        """Where the location is per environment, another environment sees nothing; where two
        environments would share one location, the second is refused."""
        prod = make_backend(self.ENVIRONMENT)
        v = self.promoted(prod)
        shared = prod.settings.location(self.OTHER_ENVIRONMENT) == prod.location
        if shared:
            with pytest.raises(BackendConflict) as info:
                dev = make_backend(self.OTHER_ENVIRONMENT)
                dev.stage_pending(make_version(self.OTHER_ENVIRONMENT, v.credential))
            assert info.value.where, "say which location is refused"
            assert info.value.hint, "say what to do"
            with pytest.raises(BackendConflict):
                make_backend(self.OTHER_ENVIRONMENT).read(v.credential)
        else:
            dev = make_backend(self.OTHER_ENVIRONMENT)
            assert dev.credentials() == []
            assert dev.read(v.credential) is None
            assert dev.read_version(v.credential, v.version_id) is None
            other = make_version(self.OTHER_ENVIRONMENT, v.credential)
            dev.stage_pending(other)
            dev.promote(other.credential, other.version_id)
            self.assert_same_tokens(dev.read(v.credential), other)
            assert prod.read_version(v.credential, other.version_id) is None
            assert [i.version_id for i in prod.versions(v.credential)] == [v.version_id]
        self.assert_same_tokens(prod.read(v.credential), v)
        assert prod.credentials() == [v.credential]

    # -- secrecy -------------------------------------------------------------------------------

    def test_no_token_in_repr_or_errors(self, backend: Backend) -> None:
        v = self.promoted(backend)
        texts = [repr(backend), str(backend), repr(backend.read(v.credential))]
        foreign = make_version(self.OTHER_ENVIRONMENT, v.credential)
        attempts: list[Callable[[], object]] = [
            lambda: backend.stage_pending(foreign),
            lambda: backend.promote(v.credential, foreign.version_id),
            lambda: backend.promote("nobody", v.version_id),
        ]
        for attempt in attempts:
            with pytest.raises((BackendError, NotFound)) as info:
                attempt()
            texts.append(error_texts(info.value))
        blob = "\n".join(texts)
        for fragment in token_fragments(v) + token_fragments(foreign):
            assert fragment not in blob

    # -- concurrency ---------------------------------------------------------------------------

    def test_threads_on_different_credentials(self, backend: Backend) -> None:
        names = [f"cred-{i}" for i in range(12)]

        def rotate_twice(name: str) -> tuple[StoredVersion, StoredVersion]:
            return self.promoted(backend, name), self.promoted(backend, name)

        with ThreadPoolExecutor(max_workers=6) as pool:
            results = list(pool.map(rotate_twice, names))
        for name, (v1, v2) in zip(names, results, strict=True):
            self.assert_same_tokens(backend.read(name), v2)
            self.assert_same_tokens(backend.read(name, Stage.PREVIOUS), v1)
        assert sorted(backend.credentials()) == sorted(names)

    def test_threads_on_one_credential(self, make_backend: MakeBackend) -> None:
        """Concurrent stage+promote of one credential (two instances, several threads) leave
        one consistent history: every version known and readable, distinct labels."""
        instances = [make_backend(self.ENVIRONMENT) for _ in range(2)]
        start = threading.Barrier(6)

        def stage_and_promote(i: int) -> StoredVersion:
            b = instances[i % 2]
            start.wait()
            return self.promoted(b)

        with ThreadPoolExecutor(max_workers=6) as pool:
            made = list(pool.map(stage_and_promote, range(6)))
        ids = {v.version_id for v in made}
        infos = instances[0].versions(self.CREDENTIAL)
        assert {i.version_id for i in infos} == ids
        assert all(i.readable for i in infos)
        current = instances[1].read(self.CREDENTIAL)
        previous = instances[1].read(self.CREDENTIAL, Stage.PREVIOUS)
        assert current is not None and current.version_id in ids
        assert previous is not None and previous.version_id in ids - {current.version_id}
        assert instances[0].read(self.CREDENTIAL, Stage.PENDING) is None
        for v in made:
            self.assert_same_tokens(instances[0].read_version(v.credential, v.version_id), v)


def unique_name(prefix: str = "t") -> str:
    """A short unique name for a per-test location (prefix, namespace, mount)."""
    return f"{prefix}{uuid.uuid4().hex[:10]}"

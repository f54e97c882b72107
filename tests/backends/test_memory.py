"""The in-memory reference backend (a test fake) passes the contract suite."""

from __future__ import annotations

from collections.abc import Iterator
from importlib.metadata import entry_points

import pytest

import backends
from backends.file import FileBackend
from rotator.errors import ConfigError
from rotator.model import Secret, StoredVersion, TokenPair, new_version_id
from tests.backends.contract import BackendContract, BackendFactory, MakeBackend, unique_name
from tests.fakes.memory import MemoryBackend, MemorySettings, MemoryStores


class TestMemoryBackend(BackendContract):
    @pytest.fixture
    def make_backend(self) -> Iterator[MakeBackend]:
        settings, stores = MemorySettings(namespace=unique_name()), MemoryStores()
        with BackendFactory(lambda env: MemoryBackend(settings, env, stores=stores)) as make:
            yield make


def test_the_fake_is_registered_for_the_tests_only(memory_stores: MemoryStores) -> None:
    installed = {ep.name for ep in entry_points(group=backends.GROUP)}
    assert "memory" not in installed and "file" in installed
    assert backends.registry()["memory"].kind == "memory"  # tests/conftest.py added it
    with pytest.raises(ConfigError, match="two backends register the name 'memory'"):
        backends.register(MemoryBackend)
    with pytest.raises(ConfigError, match="two backends register the name 'file'"):
        backends.register(FileBackend)


def test_each_test_has_stores_of_its_own(memory_stores: MemoryStores) -> None:
    settings = MemorySettings(namespace="shared-name")
    built = backends.build(settings, "prod")
    assert isinstance(built, MemoryBackend) and built.stores is memory_stores
    assert built.credentials() == []  # whatever another test wrote under this namespace
    version = StoredVersion("prod", "a", new_version_id(), TokenPair(Secret("t" * 20)))
    built.stage_pending(version)
    assert backends.build(settings, "prod").read_version("a", version.version_id) is not None
    assert MemoryBackend(settings, "prod").credentials() == []  # no stores given: its own

"""The in-memory reference backend passes the contract suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from backends.memory import MemoryBackend, MemorySettings
from tests.backends.contract import BackendContract, BackendFactory, MakeBackend, unique_name


class TestMemoryBackend(BackendContract):
    @pytest.fixture
    def make_backend(self) -> Iterator[MakeBackend]:
        settings = MemorySettings(namespace=unique_name())
        with BackendFactory(lambda env: MemoryBackend(settings, env)) as make:
            yield make

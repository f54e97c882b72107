"""Fixtures of the infrastructure tests. The tools come from infra/tools.mk (`make test`)."""

from __future__ import annotations

import pytest

from tests.infra._infra import Render, find_tool, render_all


@pytest.fixture(scope="session")
def kubectl() -> str:
    return find_tool("kubectl")


@pytest.fixture(scope="session")
def renders(
    kubectl: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, str], Render]:
    """Every environment in every mode, and each overlay as committed ("shipped")."""
    return render_all(kubectl, tmp_path_factory.mktemp("kustomize"))

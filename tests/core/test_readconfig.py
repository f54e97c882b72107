"""What ``rotator get`` validates of the configuration (:mod:`rotator.readconfig`): the same
backends, keys and logging as a full load where it reads; None (the whole configuration then
loaded, to read or to say what is wrong) for anything else."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rotator.crypto import generate_key
from rotator.readconfig import read_config
from rotator.settings import load_config
from tests.factories import (
    config_toml,
    credentials,
    environment_table,
    file_backend,
    store_token,
)


def tables(**changes: Any) -> dict[str, Any]:
    """prod and dev on file backends of their own; ``changes`` replace keys of prod's table."""
    envs = {
        name: environment_table(
            "http://127.0.0.1:9",
            f"read-{name}",
            credentials("acme-sap", "globex-fiix"),
            sealing_env=f"READ_{name.upper()}_SEAL",
            secret_env=f"READ_{name.upper()}_SECRET",
            backends=[
                file_backend(f"files/{name}", f"keys/{name}-file.key"),
                file_backend(f"files/{name}-copy", f"keys/{name}-copy.key", name="copy"),
            ],
        )
        for name in ("prod", "dev")
    }
    envs["prod"].update(changes)
    return envs


def write(tmp_path: Path, envs: dict[str, Any], file: str = "rotator.toml", **top: Any) -> Path:
    path = tmp_path / file
    path.write_text(config_toml("sqlite:///journal.db", envs, **top))
    return path


@pytest.fixture(autouse=True)
def _seals(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("READ_PROD_SEAL", generate_key())
    monkeypatch.setenv("READ_DEV_SEAL", generate_key())


def test_it_validates_what_a_read_uses_exactly_as_the_whole_configuration_does(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, tables(), logging={"level": "error", "format": "json"})
    whole = load_config(path)
    read = read_config(path, "prod")
    assert read is not None
    assert read.source == path and read.environment == "prod"
    assert read.credentials == {"acme-sap", "globex-fiix"}
    assert read.logging == whole.logging
    assert set(read.environments) == set(whole.environments)
    for name, env in whole.environments.items():
        # paths resolved against the file's folder, keys named with their key path and role
        assert read.environments[name].backend_settings == env.backend_settings
        assert read.environments[name].sealing_key == env.sealing_key
        assert read.environments[name].sealing_key.key_path == f"environments.{name}.sealing_key"


def test_the_process_variables_apply_as_they_do_to_a_full_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, tables())
    monkeypatch.setenv("ROTATOR_CONFIG", str(path))
    monkeypatch.setenv("ROTATOR_LOG_FORMAT", "JSON")
    read = read_config(None, "dev")
    assert read is not None and read.source == path
    assert read.logging.format == "json" == load_config().logging.format


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"backends": []}, id="no backend"),
        pytest.param({"backends": [{"type": "nosuch", "path": "x"}]}, id="unknown type"),
        pytest.param({"backends": [{"type": "file", "key": {"env": "K"}}]}, id="no path"),
        pytest.param(
            {"backends": [{"type": "file", "path": "f", "key": {"env": "K"}, "extra": 1}]},
            id="unknown key",
        ),
        pytest.param(
            {"backends": [file_backend("a", "keys/a.key"), file_backend("b", "keys/b.key")]},
            id="two backends named file",
        ),
        pytest.param({"sealing_key": {"env": "A", "file": "b"}}, id="two key sources"),
        pytest.param({"sealing_key": "READ_PROD_SEAL"}, id="a key that is no table"),
        pytest.param(
            {"backends": [file_backend("files/dev", "keys/prod-own.key")]},
            id="dev's folder",
        ),
    ],
)
def test_a_problem_in_what_a_read_uses_is_left_to_the_whole_configuration_to_say(
    tmp_path: Path, changes: dict[str, Any]
) -> None:
    path = write(tmp_path, tables(**changes))
    assert read_config(path, "prod") is None
    assert read_config(path, "dev") is None  # prod's storage is validated for dev's reads too


def test_a_bad_logging_key_or_environment_name_is_left_to_it_too(tmp_path: Path) -> None:
    assert read_config(write(tmp_path, tables(), logging={"level": "loud"}), "prod") is None
    envs = tables()
    envs["Prod_2"] = envs.pop("dev")
    assert read_config(write(tmp_path, envs), "prod") is None


def test_a_credential_or_environment_the_file_does_not_list_is_not_its_to_answer(
    tmp_path: Path,
) -> None:
    read = read_config(write(tmp_path, tables()), "prod")
    assert read is not None and "enrolled-by-discovery" not in read.credentials
    assert read_config(write(tmp_path, tables()), "nosuch") is None
    nameless = write(tmp_path, tables(credentials=[{"connection_id": "c"}]))
    assert read_config(nameless, "prod") is None
    assert read_config(nameless, "dev") is not None  # dev's credentials are all named


def test_keys_a_read_does_not_use_are_left_to_config_check(tmp_path: Path) -> None:
    # a schedule that makes no sense is the scheduler's problem, not a reader's: get reads
    # (config check, serve and run-due refuse it)
    path = write(tmp_path, tables(schedule={"rotate_before_expiry": "40d"}))
    assert read_config(path, "prod") is not None
    with pytest.raises(Exception, match="rotate_before_expiry"):
        load_config(path)


def test_get_refuses_what_the_whole_configuration_refuses_with_its_message(
    tmp_path: Path,
) -> None:
    # prod's second backend is dev's folder: every command says so, get included, and no token
    # is read from either
    envs = tables()
    envs["prod"]["backends"][1] = file_backend("files/dev", "keys/prod-copy.key", name="copy")
    path = write(tmp_path, envs)
    dev_alone = write(tmp_path, {"dev": envs["dev"]}, file="dev.toml")
    store_token(dev_alone, "dev", "acme-sap", "t" * 40)  # dev's token, stored
    proc = subprocess.run(
        [sys.executable, "-m", "rotator", "get", "dev", "acme-sap"],
        env={**os.environ, "ROTATOR_CONFIG": str(path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "share the backend location" in proc.stderr
    assert "environments.prod.backends[1].path" in proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr

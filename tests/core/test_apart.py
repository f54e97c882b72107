"""Production and development kept apart at the configuration level: backend places and keys are
compared in their canonical form (real paths, normalised URLs and prefixes) and by what they are
(key fingerprints), at load time, at ``rotator config check`` and before a run writes anything."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rotator.crypto import generate_key
from rotator.errors import ConfigError
from rotator.readconfig import read_config
from rotator.rotation.runtime import Runtime
from rotator.settings import Config, load_config

TEMPLATE = """
[journal]
url = "sqlite:///journal.db"

[environments.prod]
sealing_key = {{ {prod_seal} }}
[environments.prod.makini]
client_id = "p"
client_secret_env = "APART_P_SECRET"
[[environments.prod.backends]]
{prod}

[environments.dev]
sealing_key = {{ {dev_seal} }}
[environments.dev.makini]
client_id = "d"
client_secret_env = "APART_D_SECRET"
[[environments.dev.backends]]
{dev}
"""

PROD_KEY = 'key = { file = "keys/prod-file.key", generate = true }'
DEV_KEY = 'key = { file = "keys/dev-file.key", generate = true }'


def file_backend(path: str | Path, key: str) -> str:
    return f'type = "file"\npath = "{path}"\n{key}'


def write(
    tmp_path: Path,
    prod: str,
    dev: str,
    prod_seal: str = 'env = "APART_PROD_SEAL"',
    dev_seal: str = 'env = "APART_DEV_SEAL"',
) -> Path:
    path = tmp_path / "rotator.toml"
    path.write_text(
        TEMPLATE.format(prod=prod, dev=dev, prod_seal=prod_seal, dev_seal=dev_seal)
    )
    return path


def refused(path: Path) -> str:
    """What loading ``path`` says; what ``rotator get`` validates of it refuses it too (and then
    loads it whole, to say the same)."""
    for environment in ("prod", "dev"):
        assert read_config(path, environment) is None
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.describe()


@pytest.fixture(autouse=True)
def _secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APART_PROD_SEAL", generate_key())
    monkeypatch.setenv("APART_DEV_SEAL", generate_key())


@pytest.fixture
def srv(tmp_path: Path) -> Path:
    (tmp_path / "srv" / "b" / "dev").mkdir(parents=True)
    (tmp_path / "srv" / "b" / "prod").mkdir(parents=True)
    return tmp_path / "srv" / "b"


# -- file backends: real paths -----------------------------------------------------------------


def test_a_dev_path_through_dotdot_to_prods_folder_is_refused(tmp_path: Path, srv: Path) -> None:
    text = refused(write(
        tmp_path,
        file_backend(srv / "prod", PROD_KEY),
        file_backend(f"{srv}/dev/../prod", DEV_KEY),
    ))
    assert "share the backend location" in text
    assert "environments.prod.backends[0].path" in text
    assert "environments.dev.backends[0].path" in text
    assert str((srv / "prod").resolve()) in text


def test_a_symlink_to_prods_folder_is_refused(tmp_path: Path, srv: Path) -> None:
    (tmp_path / "looks-like-dev").symlink_to(srv / "prod")  # an absolute symbolic link
    text = refused(write(
        tmp_path,
        file_backend(srv / "prod", PROD_KEY),
        file_backend(tmp_path / "looks-like-dev", DEV_KEY),
    ))
    assert "share the backend location" in text
    assert "environments.dev.backends[0].path" in text


def test_parts_that_do_not_exist_yet_resolve_below_the_real_prefix(
    tmp_path: Path, srv: Path
) -> None:
    # neither store exists yet; dev's goes through a link to the same parent folder
    (tmp_path / "alias").symlink_to(srv)
    text = refused(write(
        tmp_path,
        file_backend(srv / "new" / "store", PROD_KEY),
        file_backend(tmp_path / "alias" / "tmp" / ".." / "new" / "store", DEV_KEY),
    ))
    assert "share the backend location" in text
    assert not (srv / "new").exists()  # refusing created nothing


@pytest.mark.parametrize("inner", ["dev", "prod"])
def test_one_environments_folder_inside_the_others_is_refused(
    tmp_path: Path, srv: Path, inner: str
) -> None:
    outer = "prod" if inner == "dev" else "dev"
    paths = {outer: srv / outer, inner: srv / outer / inner}
    text = refused(write(
        tmp_path,
        file_backend(paths["prod"], PROD_KEY),
        file_backend(paths["dev"], DEV_KEY),
    ))
    assert (
        f"environments.{inner}.backends[0].path (file://{paths[inner]}) is inside "
        f"environments.{outer}.backends[0].path" in text
    ), text


def test_sibling_folders_and_same_named_prefixes_are_fine(tmp_path: Path, srv: Path) -> None:
    # /srv/b/prod and /srv/b/prod-old share a string prefix but neither is inside the other
    config = load_config(write(
        tmp_path,
        file_backend(srv / "prod", PROD_KEY),
        file_backend(srv / "prod-old", DEV_KEY),
    ))
    assert set(config.environments) == {"prod", "dev"}


# -- cloud backends: canonical URLs and prefixes -----------------------------------------------


def vault(url: str, prefix: str, mount: str = "secret", namespace: str = "") -> str:
    ns = f'\nnamespace = "{namespace}"' if namespace else ""
    return f'type = "vault"\nurl = "{url}"\nmount = "{mount}"\npath_prefix = "{prefix}"{ns}'


def aws(prefix: str, endpoint: str = "", region: str = "eu-west-1") -> str:
    ep = f'\nendpoint_url = "{endpoint}"' if endpoint else ""
    return f'type = "aws"\nregion = "{region}"\nprefix = "{prefix}"{ep}'


def azure(url: str, prefix: str) -> str:
    return f'type = "azure"\nvault_url = "{url}"\nname_prefix = "{prefix}"'


@pytest.mark.parametrize(
    ("prod", "dev", "says"),
    [
        (vault("https://vault.example.com", "makini/prod"),
         vault("https://Vault.Example.com:443/", "makini/dev/../prod"), "share"),
        (vault("https://vault.example.com:8200", "makini/prod"),
         vault("https://VAULT.example.com:8200", "./makini/./prod/"), "share"),
        (vault("http://vault.internal:80", "makini/prod"),
         vault("http://vault.internal", "makini"), "is inside"),
        (vault("https://vault.example.com", "prod", namespace="team"),
         vault("https://vault.example.com", "prod", mount="team/secret"), "share"),
        (aws("makini/prod/"),
         aws("makini/prod/", endpoint="https://secretsmanager.eu-west-1.amazonaws.com/"), "share"),
        (aws("makini/prod-"), aws("makini/"), "is inside"),
        (aws("makini/x/", endpoint="http://LOCALHOST:4566/"),
         aws("makini/x/", endpoint="http://localhost:4566"), "share"),
        (azure("https://my-vault.vault.azure.net", "makini-prod-"),
         azure("https://My-Vault.Vault.Azure.Net:443/", "MAKINI-PROD-"), "share"),
        (azure("https://my-vault.vault.azure.net", "makini-prod-"),
         azure("https://my-vault.vault.azure.net", "makini-"), "is inside"),
    ],
    ids=[
        "vault-case-port-dotdot", "vault-dot-slashes", "vault-parent-prefix",
        "vault-namespace-is-a-path", "aws-default-endpoint", "aws-string-prefix",
        "aws-emulator-case", "azure-case-port", "azure-string-prefix",
    ],
)
def test_cloud_places_are_compared_canonically(
    tmp_path: Path, prod: str, dev: str, says: str
) -> None:
    text = refused(write(tmp_path, prod, dev))
    assert says in text, text
    assert "environments.prod.backends[0]." in text and "environments.dev.backends[0]." in text


@pytest.mark.parametrize(
    ("prod", "dev"),
    [
        (vault("https://vault.example.com", "makini/prod"),
         vault("https://vault.example.com", "makini/prod-old")),
        (vault("https://vault.example.com:8200", "makini/prod"),
         vault("https://vault.example.com:8201", "makini/prod")),
        (vault("https://vault.example.com", "makini/prod"),
         vault("https://vault.example.com", "makini/prod", mount="kv")),
        (aws("makini/prod/"), aws("makini/prod/", region="eu-central-1")),
        (aws("makini/prod/"), aws("makini/dev/")),
        (azure("https://a.vault.azure.net", "makini-"),
         azure("https://b.vault.azure.net", "makini-")),
    ],
    ids=["vault-sibling", "vault-other-server", "vault-other-mount", "aws-other-region",
         "aws-sibling", "azure-other-vault"],
)
def test_distinct_cloud_places_are_fine(tmp_path: Path, prod: str, dev: str) -> None:
    assert set(load_config(write(tmp_path, prod, dev)).environments) == {"prod", "dev"}


def test_two_backends_of_one_environment_in_one_place_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "rotator.toml"
    path.write_text(
        write(tmp_path, vault("https://v.example", "makini/prod"), aws("makini/dev/"))
        .read_text()
        + '[[environments.prod.backends]]\nname = "replica"\n'
        + vault("https://V.example:443", "makini/prod/")
    )
    text = refused(path)
    assert "environments.prod.backends[0].path_prefix and environments.prod.backends[1]" in text


# -- keys by where they come from (at load) ----------------------------------------------------


def test_a_sealing_key_file_reached_through_a_symlink_is_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "prod.key").write_text(generate_key() + "\n")
    (tmp_path / "dev-keys").symlink_to(keys)
    text = refused(write(
        tmp_path,
        file_backend("prod-files", PROD_KEY),
        file_backend("dev-files", DEV_KEY),
        prod_seal=f'file = "{keys}/prod.key"',
        dev_seal=f'file = "{tmp_path}/dev-keys/../keys/../dev-keys/prod.key"',
    ))
    assert "share the sealing key" in text
    assert "environments.prod.sealing_key and environments.dev.sealing_key" in text


def test_a_hard_link_to_a_key_file_is_the_same_key_file(tmp_path: Path) -> None:
    (tmp_path / "prod.key").write_text(generate_key() + "\n")
    os.link(tmp_path / "prod.key", tmp_path / "dev.key")
    text = refused(write(
        tmp_path,
        file_backend("prod-files", PROD_KEY),
        file_backend("dev-files", 'key = { file = "dev.key" }'),
        prod_seal='file = "prod.key"',
    ))
    assert "environments.prod.sealing_key and environments.dev.backends[0].key" in text


def test_the_same_variable_for_two_environments_is_refused(tmp_path: Path) -> None:
    text = refused(write(
        tmp_path,
        file_backend("prod-files", 'key = { env = "APART_PROD_SEAL" }'),
        file_backend("dev-files", DEV_KEY),
        dev_seal='env = "APART_PROD_SEAL"',
    ))
    assert "environments.prod.sealing_key and environments.dev.sealing_key" in text
    assert "environments.prod.backends[0].key and environments.dev.sealing_key" in text


def test_a_key_file_inside_another_environments_storage_is_refused(
    tmp_path: Path, srv: Path
) -> None:
    text = refused(write(
        tmp_path,
        file_backend(srv / "prod", PROD_KEY),
        file_backend(srv / "dev", f'key = {{ file = "{srv}/prod/dev.key", generate = true }}'),
    ))
    assert "environments.dev.backends[0].key" in text
    assert "inside environments.prod.backends[0].path" in text


# -- keys by what they are (at config check and before a run) ----------------------------------


def config_with_copied_keys(tmp_path: Path) -> Config:
    keys = tmp_path / "keys"
    keys.mkdir()
    key = generate_key()
    for name in ("prod-file.key", "dev-file.key"):
        (keys / name).write_text(key + "\n")
        (keys / name).chmod(0o600)
    return load_config(write(
        tmp_path, file_backend("prod-files", PROD_KEY), file_backend("dev-files", DEV_KEY)
    ))


def test_the_same_key_in_two_files_is_refused_before_a_run_writes_anything(
    tmp_path: Path,
) -> None:
    config = config_with_copied_keys(tmp_path)  # two files: nothing to see by where they are
    with pytest.raises(ConfigError) as info:
        Runtime.open(config)
    text = info.value.describe()
    assert "environments.prod.backends[0].key" in text
    assert "environments.dev.backends[0].key" in text
    assert (tmp_path / "keys" / "prod-file.key").read_text().strip() not in text
    written = {p.name for p in tmp_path.iterdir()}
    assert written == {"keys", "rotator.toml"}  # no journal, no backend folder


def test_the_same_key_in_two_variables_is_refused_before_a_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APART_DEV_SEAL", os.environ["APART_PROD_SEAL"])
    config = load_config(write(
        tmp_path, file_backend("prod-files", PROD_KEY), file_backend("dev-files", DEV_KEY)
    ))
    with pytest.raises(ConfigError) as info:
        Runtime.open(config, only=["dev"])
    text = info.value.describe()
    assert "environments.prod.sealing_key (environment variable APART_PROD_SEAL)" in text
    assert "environments.dev.sealing_key (environment variable APART_DEV_SEAL)" in text
    assert os.environ["APART_PROD_SEAL"] not in text
    assert not (tmp_path / "journal.db").exists()


def test_an_old_key_kept_for_rotation_counts_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # dev's variable holds NEW,OLD where OLD is prod's key: dev could open prod's data
    monkeypatch.setenv("APART_DEV_SEAL", f"{generate_key()},{os.environ['APART_PROD_SEAL']}")
    config = load_config(write(
        tmp_path, file_backend("prod-files", PROD_KEY), file_backend("dev-files", DEV_KEY)
    ))
    with pytest.raises(ConfigError, match="hold the same key"):
        Runtime.open(config)


async def test_one_environment_may_use_one_key_for_its_sealing_key_and_its_backend(
    tmp_path: Path,
) -> None:
    # the choice: key material is shared never between environments, but may be within one
    # (the journal's associated data start with "journal/", the file backend's do not)
    config = load_config(write(
        tmp_path,
        file_backend("prod-files", 'key = { env = "APART_PROD_SEAL" }'),
        file_backend("dev-files", DEV_KEY),
    ))
    runtime = Runtime.open(config)
    try:
        assert runtime.environments["prod"].sealing_keys is not None
    finally:
        await runtime.aclose()

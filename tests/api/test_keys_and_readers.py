"""``rotator keys`` (create, list, revoke), per-key read records, ``rotator status``'s readers
on an old version, and ending a grace period early once every reader has the new version."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rotator.cli.app import app as cli
from rotator.journal import Step
from rotator.keys import KeyIndex, list_keys
from rotator.readers import end_grace_early, readers_caught_up, stale_readers
from rotator.service import run_due_once
from tests.api.conftest import Factory, LogTrap, Served, bearer, connection

CONFIG = """
[journal]
url = "sqlite:///journal.db"

[environments.prod]
sealing_key = {{ env = "API_SEAL_PROD" }}
[environments.prod.makini]
base_url = "{url}"
client_id = "test-prod"
client_secret_env = "TEST_MAKINI_SECRET_TEST_PROD"
[[environments.prod.backends]]
type = "memory"
namespace = "{namespace}"
[[environments.prod.credentials]]
name = "alpha"
connection_id = "{alpha}"
[[environments.prod.credentials]]
name = "beta"
connection_id = "{beta}"
"""


def run(trap: LogTrap, config: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["--config", str(config), *args])
    trap.add(result.stderr)  # logs; stdout is the command's answer (a new key, by design)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def write_config(tmp_path: Path, sim_url: str, namespace: str) -> Path:
    path = tmp_path / "rotator.toml"
    path.write_text(
        CONFIG.format(
            url=sim_url,
            namespace=namespace,
            alpha=connection("prod", "alpha"),
            beta=connection("prod", "beta"),
        )
    )
    return path


@pytest.fixture
async def served(serve: Factory, tmp_path: Path, namespace: str) -> tuple[Served, Path]:
    """A started API, and a CLI config on the same simulator and memory backend."""
    api = await serve()
    return api, write_config(
        tmp_path, api.runtime.config.environments["prod"].makini.base_url, namespace
    )


async def test_keys_cli_and_stale_readers_in_status(
    served: tuple[Served, Path], log_trap: LogTrap
) -> None:
    api, config = served

    code, out, err = await asyncio.to_thread(
        run,
        log_trap,
        config,
        "keys",
        "create",
        "prod",
        "--name",
        "billing",
        "--credentials",
        "alpha",
    )
    assert code == 0 and "not shown again" in err
    billing = out.strip()
    code, out, _ = await asyncio.to_thread(
        run, log_trap, config, "keys", "create", "prod", "--name", "ops", "--admin", "--json"
    )
    ops = json.loads(out)
    log_trap.secrets.update({billing, ops["key"]})
    assert billing.startswith("mrk_") and ops["key"].startswith("mra_") and ops["kind"] == "admin"

    code, out, _ = await asyncio.to_thread(run, log_trap, config, "keys", "list", "--json")
    listed = json.loads(out)
    assert [(k["name"], k["kind"], k["credentials"]) for k in listed] == [
        ("billing", "reader", ["alpha"]),
        ("ops", "admin", None),
    ]
    assert billing not in out and ops["key"] not in out and "hash" not in out
    code, out, _ = await asyncio.to_thread(run, log_trap, config, "keys", "list")
    assert "billing" in out and billing not in out

    # the running API picks the new keys up from the journal
    key = bearer(billing)

    async def accepted() -> bool:
        r = await api.http.get("/v1/tokens/prod/alpha", headers=key)
        return r.status_code != 401

    first = await api.rotate("prod", "alpha")
    deadline = asyncio.get_running_loop().time() + 2
    while not await accepted():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)
    assert (await api.http.get("/v1/tokens/prod/alpha", headers=key)).json()["version"] == first
    assert await api.app.flush_reads() == 1
    journal = api.runtime.journal
    window = timedelta(hours=1)
    assert stale_readers(journal, "prod", "alpha", first, window=window) == []

    second = await api.rotate("prod", "alpha")
    [stale] = stale_readers(journal, "prod", "alpha", second, window=window)
    assert (stale.name, stale.version_id) == ("billing", first)
    assert not readers_caught_up(journal, "prod", "alpha", second, window=window)
    code, out, _ = await asyncio.to_thread(run, log_trap, config, "status", "prod", "--json")
    rows = {r["credential"]: r for r in json.loads(out)}
    assert [v["name"] for v in rows["alpha"]["stale_readers"]] == ["billing"]
    assert rows["alpha"]["stale_readers"][0]["version"] == first
    assert rows["beta"]["stale_readers"] == []
    code, _, err = await asyncio.to_thread(run, log_trap, config, "status", "prod")
    assert "readers on an old version" in err and "billing" in err

    assert (await api.http.get("/v1/tokens/prod/alpha", headers=key)).json()["version"] == second
    await api.app.flush_reads()
    assert readers_caught_up(journal, "prod", "alpha", second, window=window)
    code, out, _ = await asyncio.to_thread(run, log_trap, config, "status", "prod", "--json")
    assert json.loads(out)[0]["stale_readers"] == []

    # revoke by name; the API refuses the key within a second
    code, out, _ = await asyncio.to_thread(
        run, log_trap, config, "keys", "revoke", "billing", "--env", "prod"
    )
    assert code == 0 and "revoked" in out
    assert [k.name for k in list_keys(journal) if k.revoked_at is None] == ["ops"]

    async def refused() -> bool:
        return (await api.http.get("/v1/tokens/prod/alpha", headers=key)).status_code == 401

    deadline = asyncio.get_running_loop().time() + 1
    while not await refused():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)

    # an unknown credential is refused at creation
    result = CliRunner().invoke(
        cli,
        ["--config", str(config), "keys", "create", "prod", "--name", "x", "--credentials", "nope"],
    )
    assert result.exit_code != 0 and "nope" in str(result.exception)
    # a list that names nobody is refused, not taken as "every credential"
    create_y = ["--config", str(config), "keys", "create", "prod", "--name", "y"]
    for empty in (",", "", " , "):
        result = CliRunner().invoke(cli, [*create_y, "--credentials", empty])
        assert result.exit_code != 0 and "names no credential" in str(result.exception)
    assert "y" not in [k.name for k in list_keys(journal)]


async def test_grace_ends_early_once_every_reader_has_the_new_version(
    serve: Factory, log_trap: LogTrap, sim: object
) -> None:
    sim.set(issue_invalidates_previous=False)  # type: ignore[attr-defined]
    api = await serve(
        makini={"issue_invalidates_previous": False},
        schedule={"interval": "1h", "grace_period": "1h"},
        api={"readers": {"early_end_grace": True, "active_window": "1h"}},
    )
    from rotator.keys import create_key

    journal = api.runtime.journal
    _, key = create_key(journal, "prod", "billing")
    log_trap.secrets.add(key)
    api.app.state.keys.load(journal)
    config = api.runtime.config
    await api.rotate("prod", "alpha")
    await api.http.get("/v1/tokens/prod/alpha", headers=bearer(key))
    await api.app.flush_reads()
    second = await api.rotate("prod", "alpha")
    rot = journal.open_rotation("prod", "alpha")
    assert rot is not None and rot.step == Step.PROMOTED and rot.version_id == second

    assert end_grace_early(config, journal) == []  # billing still holds the old version
    await api.http.get("/v1/tokens/prod/alpha", headers=bearer(key))
    await api.app.flush_reads()
    assert end_grace_early(config, journal) == ["prod/alpha"]
    results = await run_due_once(api.runtime, environments=["prod"])
    assert [(r.credential, r.outcome) for r in results if r.credential == "alpha"] == [
        ("alpha", "retired")
    ]
    assert journal.open_rotation("prod", "alpha") is None
    [ended] = journal.audit_entries(action="rotation.grace_ended")
    assert ended.credential == "alpha"

    off = config.model_copy(
        update={
            "api": config.api.model_copy(
                update={"readers": config.api.readers.model_copy(update={"early_end_grace": False})}
            )
        }
    )
    assert end_grace_early(off, journal) == []


def test_key_index_refuses_lookalikes() -> None:
    index = KeyIndex()
    for key in (
        "",
        "Bearer",
        "mrk_",
        "mrk_0123456789ab_",
        "xyz_0123456789ab_" + "a" * 43,
        "mrk-0123456789ab-" + "a" * 43,
    ):
        assert index.verify(key) is None


SECRET_SHAPES = {
    "no underscore": "d" * 43,
    "underscore first": "_" + "a" * 42,
    "underscore last": "b" * 42 + "_",
    "looks like a second id": "0123456789ab_" + "c" * 30,
    "underscores only": "_" * 43,
    "url-safe mix": "-_-A9z_" * 6 + "Q",
}
"""Secrets as ``secrets.token_urlsafe`` may make them: its alphabet has ``_`` (the separator of
a key's parts) and ``-``. Each shape is tried on purpose, not left to chance."""


@pytest.mark.parametrize("admin", [False, True], ids=["reader key", "admin key"])
def test_a_pasted_whole_key_is_revoked_by_its_id_and_never_echoed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, admin: bool
) -> None:
    from rotator.errors import NotFound
    from rotator.journal import Journal
    from rotator.keys import create_key, revoke_key

    shapes = iter(SECRET_SHAPES.values())
    monkeypatch.setattr("rotator.keys.secrets.token_urlsafe", lambda _n: next(shapes))
    prefix = "mra" if admin else "mrk"
    journal = Journal(f"sqlite:///{tmp_path / 'journal.db'}")
    try:
        made = [create_key(journal, "prod", f"[/svc] {s}", admin=admin) for s in SECRET_SHAPES]
        index = KeyIndex()
        index.load(journal)
        for (info, key), secret in zip(made, SECRET_SHAPES.values(), strict=True):
            assert key == f"{prefix}_{info.key_id}_{secret}"
            assert index.verify(key) == info  # the API reads it as this very key
            other_kind = ("mrk" if admin else "mra") + key[3:]
            assert index.verify(other_kind) is None
            # pasted as is, and with the blanks a terminal or an editor adds
            for pasted in (key, f" {key}\n", f"{key}\t"):
                revoked = revoke_key(journal, pasted)
                assert revoked.key_id == info.key_id and revoked.revoked_at is not None
            # a key of the same shape that does not exist: refused, and none of it shown
            gone = f"{prefix}_{'0' * 12}_{secret}"
            for pasted in (gone, f"{gone}\n", f"  {gone}"):
                with pytest.raises(NotFound) as refused:
                    revoke_key(journal, pasted)
                said = refused.value.describe()
                assert secret not in said and gone not in said, said
                assert "0" * 12 in said  # the id alone names what was not found
            # mangled (the id lost): still refused, still not shown
            with pytest.raises(NotFound) as refused:
                revoke_key(journal, f"{prefix}_{secret}")
            assert secret not in refused.value.describe()
        index.load(journal)
        assert all(index.verify(key) is None for _, key in made)  # revoked
    finally:
        journal.close()


async def test_key_names_are_printed_as_text_not_markup(
    served: tuple[Served, Path], log_trap: LogTrap
) -> None:
    _, config = served
    code, out, err = await asyncio.to_thread(
        run, log_trap, config, "keys", "create", "prod", "--name", "[/svc]"
    )
    assert code == 0 and "'[/svc]'" in err and out.strip().startswith("mrk_")
    log_trap.secrets.add(out.strip())
    code, out, _ = await asyncio.to_thread(run, log_trap, config, "keys", "list")
    assert code == 0 and "[/svc]" in out

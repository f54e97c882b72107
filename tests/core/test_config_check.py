"""``rotator config check`` (and a run) as an operator meets them: a real subprocess, its exit
code and what it prints. Every problem names its key path and what to do; never a traceback,
never an "internal error", never a key's value."""

from __future__ import annotations

from pathlib import Path

import pytest

from rotator.crypto import generate_key
from tests.cli import RotatorCli

CONFIG = """
{top}
[environments.prod]
sealing_key = {{ env = "CHECK_PROD_SEAL" }}
[environments.prod.makini]
client_id = "p"
client_secret_env = "CHECK_P_SECRET"
[[environments.prod.backends]]
type = "file"
path = "{prod_path}"
key = {{ file = "keys/prod-file.key", generate = true }}

[environments.dev]
sealing_key = {{ {dev_seal} }}
[environments.dev.makini]
client_id = "d"
client_secret_env = "CHECK_D_SECRET"
[[environments.dev.backends]]
type = "file"
path = "{dev_path}"
key = {{ file = "keys/dev-file.key", generate = true }}
"""

PROD_SEAL = generate_key()


def cli(
    tmp_path: Path,
    *,
    top: str = "",
    dev_seal: str = 'env = "CHECK_DEV_SEAL"',
    dev_path: str = "files/dev",
    dev_key: str | None = None,
) -> RotatorCli:
    text = CONFIG.format(top=top, dev_seal=dev_seal, prod_path="files/prod", dev_path=dev_path)
    return RotatorCli(
        tmp_path,
        text,
        {
            "CHECK_PROD_SEAL": PROD_SEAL,
            "CHECK_DEV_SEAL": dev_key or generate_key(),
            "CHECK_P_SECRET": "p-secret",
            "CHECK_D_SECRET": "d-secret",
        },
    )


def clean(text: str) -> None:
    assert "Traceback" not in text and "internal error" not in text, text
    assert PROD_SEAL not in text


def test_a_valid_configuration_passes(tmp_path: Path) -> None:
    proc = cli(tmp_path)("config", "check")
    assert proc.returncode == 0, proc.stderr
    assert "configuration is valid" in proc.stdout and "warning" not in proc.stderr


def test_a_tick_too_large_for_a_timedelta_is_a_config_error(tmp_path: Path) -> None:
    proc = cli(tmp_path, top='[scheduler]\ntick = "99999999999999999999999d"')("config", "check")
    clean(proc.stderr)
    assert proc.returncode == 2, proc.stderr
    assert "scheduler.tick: '99999999999999999999999d' is far too long" in proc.stderr


def test_a_missing_sealing_key_file_without_generate_is_reported(tmp_path: Path) -> None:
    proc = cli(tmp_path, dev_seal='file = "keys/dev-sealing.key"')("config", "check")
    clean(proc.stdout + proc.stderr)
    assert proc.returncode == 0  # a warning: the check may run where the keys are not
    warning = " ".join(line for line in proc.stderr.splitlines() if "dev-sealing.key" in line)
    assert "environments.dev.sealing_key" in warning
    assert str(tmp_path / "keys" / "dev-sealing.key") in warning
    assert "rotator keygen >" in warning and "generate = true" in warning


def test_a_garbage_key_file_fails_the_check(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "dev-sealing.key").write_text("not-a-key\n")
    proc = cli(tmp_path, dev_seal='file = "keys/dev-sealing.key"')("config", "check")
    clean(proc.stdout + proc.stderr)
    assert proc.returncode == 2
    assert "environments.dev.sealing_key" in proc.stderr and "rotator keygen" in proc.stderr


def test_the_same_key_in_two_variables_fails_the_check_and_the_run(tmp_path: Path) -> None:
    rotator = cli(tmp_path, dev_key=PROD_SEAL)
    proc = rotator("config", "check")
    clean(proc.stdout + proc.stderr)
    assert proc.returncode == 2
    assert "environments.prod.sealing_key" in proc.stderr
    assert "environments.dev.sealing_key" in proc.stderr
    proc = rotator("run-due", "--env", "dev")
    clean(proc.stdout + proc.stderr)
    assert proc.returncode == 2 and "hold the same key" in proc.stderr
    assert not (tmp_path / "files").exists() and not (tmp_path / "keys").exists()


@pytest.mark.parametrize("dev_path", ["files/dev/../prod", "files/prod/dev"])
def test_a_dev_backend_in_prods_folder_fails_the_check_and_the_run(
    tmp_path: Path, dev_path: str
) -> None:
    (tmp_path / "files" / "dev").mkdir(parents=True)
    rotator = cli(tmp_path, dev_path=str(tmp_path / dev_path))  # absolute: kept as written
    for args in (("config", "check"), ("run-due",)):
        proc = rotator(*args)
        clean(proc.stdout + proc.stderr)
        assert proc.returncode == 2, proc.stderr
        assert "environments.dev.backends[0].path" in proc.stderr
        assert "environments.prod.backends[0].path" in proc.stderr
    assert not (tmp_path / "files" / "prod").exists()  # nothing was written


def test_a_garbage_file_backend_key_fails_the_check(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir(mode=0o700)
    bad = tmp_path / "keys" / "prod-file.key"
    bad.write_text("0123456789abcdef\n")
    bad.chmod(0o600)
    proc = cli(tmp_path)("config", "check")
    clean(proc.stdout + proc.stderr)
    assert proc.returncode == 2, proc.stdout
    line = next(line for line in proc.stderr.splitlines() if "prod-file.key" in line)
    assert "environments.prod.backends[0].key" in line
    assert "not 32 bytes of base64" in line and "rotator keygen >" in line
    assert "0123456789abcdef" not in proc.stderr  # not even a garbage key is shown


@pytest.mark.parametrize(
    ("top", "expected"),
    [
        # a token due as soon as it is issued: rotations without end
        (
            '[environments.prod.schedule]\nrotate_before_expiry = "40d"',
            "environments.prod.schedule.rotate_before_expiry: 40d is not below the token "
            "lifetime (30d, environments.prod.makini.default_token_lifetime)",
        ),
        # the lifetime is the environment's: 7d tokens, the default 7d margin
        (
            '[environments.prod.makini]\ndefault_token_lifetime = "7d"',
            "environments.prod.schedule.rotate_before_expiry: 7d is not below the token "
            "lifetime (7d,",
        ),
        (
            '[environments.prod.schedule]\ngrace_period = "31d"',
            "environments.prod.schedule.grace_period: 31d is not below the token lifetime",
        ),
        (
            '[environments.prod.schedule]\ninterval = "1h"\njitter = "2h"',
            "environments.prod.schedule.jitter: 2h is not below the interval (1h,",
        ),
        ("[scheduler]\ntick = -5", "scheduler.tick: must be positive, not -5s"),
        ('[scheduler]\nretry_after_failure = "30d"', "scheduler.retry_after_failure: must be "
         "at most 1d, not 30d"),
        ('[api.readers]\nactive_window = "400d"', "api.readers.active_window: must be at most"),
    ],
)
def test_durations_that_make_no_sense_fail_the_check(
    tmp_path: Path, top: str, expected: str
) -> None:
    if top.startswith("[environments.prod.makini]"):  # a key of a table the file has
        rotator = cli(tmp_path)
        rotator.config.write_text(
            rotator.config.read_text().replace('client_id = "p"', f'client_id = "p"\n{top[27:]}')
        )
    else:
        rotator = cli(tmp_path, top=top)
    proc = rotator("config", "check")
    clean(proc.stdout + proc.stderr)
    assert proc.returncode == 2, proc.stdout
    assert expected in proc.stderr, proc.stderr
    assert "`rotator config check` re-validates" in proc.stderr


def test_a_credential_override_is_named_where_it_is_written(tmp_path: Path) -> None:
    rotator = cli(tmp_path)
    rotator.config.write_text(
        rotator.config.read_text()
        + '[[environments.prod.credentials]]\nname = "acme"\nconnection_id = "c-acme"\n'
        + 'schedule = { rotate_before_expiry = "30d" }\n'
    )
    proc = rotator("config", "check")
    assert proc.returncode == 2
    assert "environments.prod.credentials[0].schedule.rotate_before_expiry: 30d" in proc.stderr

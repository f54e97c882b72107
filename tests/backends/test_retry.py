"""The one retry policy of the backends: what is tried again, how often, how long."""

from __future__ import annotations

import time

import pytest

from backends.retry import (
    CONFLICT,
    LABEL_RACE,
    LOCK,
    SETTLING,
    Retry,
    azure_retries,
    botocore_retries,
)


class Race(Exception):
    pass


class Broken(Exception):
    pass


class Flaky:
    """Raises ``error`` the first ``failures`` times it is called."""

    def __init__(self, failures: int, error: Exception | None = None) -> None:
        self.failures, self.calls = failures, 0
        self.error = error or Race()

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "done"


@pytest.mark.parametrize("policy", [CONFLICT, LABEL_RACE])
def test_a_lost_race_is_tried_again_up_to_the_attempts(policy: Retry) -> None:
    assert policy.attempts is not None
    assert policy.call(Race, Flaky(policy.attempts - 1)) == "done"
    gives_up = Flaky(policy.attempts)
    with pytest.raises(Race):
        policy.call(Race, gives_up)
    assert gives_up.calls == policy.attempts


def test_only_the_named_error_is_tried_again() -> None:
    broken = Flaky(1, Broken())
    with pytest.raises(Broken):
        CONFLICT.call(Race, broken)
    assert broken.calls == 1
    assert CONFLICT.call((Broken, Race), Flaky(2, Broken())) == "done"


def test_the_first_try_is_the_only_one_when_it_works() -> None:
    once = Flaky(0)
    assert Retry(attempts=1, timeout_s=None).call(Race, once) == "done" and once.calls == 1
    with pytest.raises(Race):
        Retry(attempts=1, timeout_s=None).call(Race, Flaky(1))


@pytest.mark.parametrize("policy", [LOCK, SETTLING])
def test_a_wait_is_bounded_by_its_timeout(policy: Retry) -> None:
    never = Flaky(10**9)
    started = time.monotonic()
    with pytest.raises(Race):
        policy.with_timeout(0.2).call(Race, never)
    assert 0.15 < time.monotonic() - started < 2
    assert never.calls > 2  # it polled, backing off


def test_transient_errors_are_the_sdks_to_retry() -> None:
    assert botocore_retries(4) == {"total_max_attempts": 4, "mode": "standard"}
    assert azure_retries(3) == {"retry_total": 3}


def test_the_backends_configure_their_sdk_from_the_policy(aws_credentials: None) -> None:
    from backends.aws import AwsBackend, AwsSettings
    from backends.azure import AzureBackend, AzureSettings

    aws = AwsBackend(AwsSettings(region="eu-west-1", max_attempts=4), "prod")
    assert aws._client()._client_config.retries == botocore_retries(4)
    aws.close()
    azure = AzureBackend(AzureSettings(vault_url="https://vault.example.net", retry_total=2),
                         "prod", credential=object())
    policy = azure._client()._client._config.retry_policy
    assert policy.total_retries == 2
    azure.close()

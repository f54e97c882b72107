"""Every exception the vendor SDKs can raise becomes an error of the project's tree, naming the
backend, its location and the cause in plain words, never a token (as httpx's
``tests/test_exceptions.py`` checks its transport's mapping).

Each vendor module's exception classes are enumerated and instantiated, so a class added by a
new SDK release is checked too; tables pin the specific classes and codes the rotator acts on.
"""

from __future__ import annotations

import inspect
import json
import string
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest

from backends._common import Mapper, Target, VersionRecord, resolve_stages
from backends.aws import map_aws_error
from backends.azure import map_azure_error
from backends.vault import CasMismatch, map_vault_error
from rotator.errors import (
    BackendConflict,
    BackendError,
    BackendInvalidName,
    BackendPermissionDenied,
    BackendUnavailable,
    NotFound,
    RotatorError,
)
from rotator.model import Stage
from rotator.scrub import scrub

TARGET = Target("store", "https://store.example/makini/prod/", "prod")
WHERE = TARGET.location + "acme-sap"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhY21lIn0.c2lnbmF0dXJlLXNlY3JldC12YWx1ZQ"
VAULT_TOKEN = "hvs.CAESIJlcnxlb2dxZmF1bHR5LXRva2VuLXZhbHVlcw"


def mapped(mapper: Mapper, exc: BaseException) -> RotatorError:
    result = mapper(exc, TARGET, WHERE)
    assert result is not None, f"{type(exc).__module__}.{type(exc).__name__} is not mapped"
    return result


def assert_well_formed(error: RotatorError) -> None:
    assert isinstance(error, BackendError | NotFound), type(error)
    assert error.message.strip()
    assert error.hint and error.hint.strip(), "say what to do next, in plain words"
    assert error.where == WHERE
    if isinstance(error, BackendError):
        assert error.backend == "store" and error.location == TARGET.location
        assert error.describe().startswith("backend store: ")
    else:
        assert "backend store" in error.message


# --- building any vendor exception ----------------------------------------------------------


class FakeResponse:
    """Just enough of an HTTP response for the SDKs' exception constructors."""

    def __init__(self, status: int = 500, body: object = None, reason: str = "Error") -> None:
        self.status_code = status
        self.status = status
        self.reason = reason
        self.headers: dict[str, str] = {"content-type": "application/json"}
        self._body = json.dumps(body if body is not None else {
            "error": {"code": "Oops", "message": "it went wrong"}})
        self.request = None
        self.content_type = "application/json"

    def text(self, encoding: str | None = None) -> str:
        return self._body

    def body(self) -> bytes:
        return self._body.encode()


def fmt_kwargs(cls: type[BaseException]) -> dict[str, str]:
    fmt = getattr(cls, "fmt", "") or ""
    return {name: "x" for _, name, _, _ in string.Formatter().parse(fmt) if name}


def instantiate(cls: type[BaseException]) -> BaseException:
    """An instance of ``cls`` however its constructor wants to be called."""
    make: Any = cls
    attempts: list[Callable[[], BaseException]] = [
        lambda: cls(**fmt_kwargs(cls)),
        lambda: cls("it went wrong"),
        lambda: cls(),
        lambda: make(message="it went wrong", response=FakeResponse()),
        lambda: make(FakeResponse()),
        lambda: make({"Error": {"Code": "Oops", "Message": "it went wrong"}}, "GetSecretValue"),
        lambda: make("it went wrong", "{", 0),
    ]
    try:
        params = [p for p in inspect.signature(cls).parameters.values()
                  if p.default is inspect.Parameter.empty
                  and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        attempts.append(lambda: cls(*(["x"] * len(params))))
        attempts.append(lambda: cls(*([FakeResponse()] * len(params))))
    except (TypeError, ValueError):
        pass
    for attempt in attempts:
        try:
            return attempt()
        except Exception:  # noqa: BLE001, S112 - try the next way of calling it
            continue
    raise AssertionError(f"cannot instantiate {cls.__module__}.{cls.__name__}")


def exception_classes(module: ModuleType) -> Iterator[type[BaseException]]:
    for _name, value in sorted(vars(module).items()):
        if (isinstance(value, type) and issubclass(value, Exception)
                and value.__module__.split(".")[0] == module.__name__.split(".")[0]
                and not value.__name__.startswith("_")):
            yield value


def vendor_cases() -> Iterator[Any]:
    import azure.core.exceptions
    import azure.identity
    import boto3.exceptions
    import botocore.exceptions
    import hvac.exceptions
    import requests.exceptions

    groups: list[tuple[str, Mapper, ModuleType]] = [
        ("aws", map_aws_error, botocore.exceptions),
        ("aws", map_aws_error, boto3.exceptions),
        ("vault", map_vault_error, hvac.exceptions),
        ("vault", map_vault_error, requests.exceptions),
        ("azure", map_azure_error, azure.core.exceptions),
    ]
    for backend, mapper, module in groups:
        for cls in exception_classes(module):
            if issubclass(cls, Warning):
                continue
            yield pytest.param(mapper, cls, id=f"{backend}-{module.__name__}.{cls.__name__}")
    for cls in (azure.identity.CredentialUnavailableError,
                azure.identity.AuthenticationRequiredError):
        yield pytest.param(map_azure_error, cls, id=f"azure-azure.identity.{cls.__name__}")


@pytest.mark.parametrize(("mapper", "cls"), list(vendor_cases()))
def test_every_vendor_exception_is_mapped(mapper: Mapper, cls: type[BaseException]) -> None:
    error = mapped(mapper, instantiate(cls))
    assert_well_formed(error)


@pytest.mark.parametrize("mapper", [map_aws_error, map_vault_error, map_azure_error])
@pytest.mark.parametrize("exc", [ValueError("x"), KeyError("k"), RuntimeError("r")])
def test_foreign_exceptions_are_not_swallowed(mapper: Mapper, exc: Exception) -> None:
    assert mapper(exc, TARGET, WHERE) is None


def test_calling_maps_with_a_cause_and_lets_the_rest_through() -> None:
    import hvac.exceptions

    vendor = hvac.exceptions.Forbidden(errors=["permission denied"], method="get", url="u")
    with pytest.raises(BackendPermissionDenied) as info, TARGET.calling(map_vault_error, WHERE):
        raise vendor
    assert info.value.__cause__ is vendor
    with pytest.raises(ZeroDivisionError), TARGET.calling(map_vault_error, WHERE):
        1 / 0  # noqa: B018
    own = BackendConflict("mine")
    with pytest.raises(BackendConflict) as caught, TARGET.calling(map_vault_error, WHERE):
        raise own
    assert caught.value is own


# --- AWS ------------------------------------------------------------------------------------


def client_error(code: str, message: str = "it went wrong", status: int = 400) -> Exception:
    from botocore.exceptions import ClientError

    made: Exception = ClientError({"Error": {"Code": code, "Message": message},
                                   "ResponseMetadata": {"HTTPStatusCode": status}},
                                  "GetSecretValue")
    return made


@pytest.mark.parametrize(("code", "message", "status", "expected"), [
    ("ResourceNotFoundException", "Secrets Manager can't find the secret", 400, NotFound),
    ("AccessDeniedException", "not authorized to perform", 400, BackendPermissionDenied),
    ("UnrecognizedClientException", "invalid security token", 400, BackendPermissionDenied),
    ("ExpiredTokenException", "expired", 400, BackendPermissionDenied),
    ("DecryptionFailure", "can't decrypt", 400, BackendPermissionDenied),
    ("KMSDisabledException", "key disabled", 400, BackendPermissionDenied),
    ("ThrottlingException", "Rate exceeded", 400, BackendUnavailable),
    ("InternalServiceError", "oops", 500, BackendUnavailable),
    ("SomethingNew", "oops", 503, BackendUnavailable),
    ("ResourceExistsException", "already exists", 400, BackendConflict),
    ("InvalidRequestException", "marked for deletion", 400, BackendConflict),
    ("LimitExceededException", "too many versions", 400, BackendConflict),
    ("InvalidParameterException", "invalid name", 400, BackendInvalidName),
    ("ValidationException", "Invalid name: must be ...", 400, BackendInvalidName),
])
def test_aws_client_errors(code: str, message: str, status: int,
                           expected: type[RotatorError]) -> None:
    error = mapped(map_aws_error, client_error(code, message, status))
    assert type(error) is expected
    assert code in error.message
    assert_well_formed(error)


def test_aws_details() -> None:
    import botocore.exceptions as bex

    kms = mapped(map_aws_error, client_error("DecryptionFailure"))
    assert kms.hint and "kms" in kms.hint.lower()
    deleting = mapped(map_aws_error, client_error("InvalidRequestException",
                                                  "the secret is marked for deletion"))
    assert deleting.hint and "restore" in deleting.hint
    other = mapped(map_aws_error, client_error("InvalidParameterException", "bad stage"))
    assert type(other) is BackendError
    cases: list[tuple[Exception, type[RotatorError], str]] = [
        (bex.NoCredentialsError(), BackendPermissionDenied, "AWS_PROFILE"),
        (bex.PartialCredentialsError(provider="env", cred_var="AWS_SECRET_ACCESS_KEY"),
         BackendPermissionDenied, "credentials"),
        (bex.EndpointConnectionError(endpoint_url="https://secretsmanager.x.amazonaws.com"),
         BackendUnavailable, "region"),
        (bex.ConnectTimeoutError(endpoint_url="https://e"), BackendUnavailable, "retried"),
        (bex.ReadTimeoutError(endpoint_url="https://e"), BackendUnavailable, "retried"),
        (bex.SSLError(endpoint_url="https://e", error="bad cert"), BackendUnavailable,
         "certificate"),
        (bex.NoRegionError(), BackendError, "region"),
        (bex.ParamValidationError(report="Invalid length for parameter SecretId"),
         BackendInvalidName, ""),
    ]
    for exc, expected, hint in cases:
        error = mapped(map_aws_error, exc)
        assert type(error) is expected, (exc, error)
        assert hint in (error.hint or "") + error.message


# --- Vault ----------------------------------------------------------------------------------


def vault_error(cls_name: str, *errors: str) -> Exception:
    import hvac.exceptions as hx

    cls: Any = getattr(hx, cls_name)
    made: Exception = cls(errors=list(errors) or None, method="get",
               url="http://vault:8200/v1/secret/data/makini/prod/acme-sap",
               text='{"data": {"access_token": "' + JWT + '"}}')
    return made


@pytest.mark.parametrize(("cls_name", "errors", "expected"), [
    ("Forbidden", ["1 error occurred:\n\t* permission denied\n\n"], BackendPermissionDenied),
    ("Unauthorized", ["missing client token"], BackendPermissionDenied),
    ("InvalidPath", [], NotFound),
    ("InvalidPath", ['no handler for route "nothing/data/x"'], BackendError),
    ("InvalidRequest", ["check-and-set parameter did not match the current version"],
     CasMismatch),
    ("InvalidRequest", ["custom_metadata validation failed"], BackendError),
    ("PreconditionFailed", ["wait for index"], BackendUnavailable),
    ("RateLimitExceeded", ["rate limited"], BackendUnavailable),
    ("InternalServerError", ["oops"], BackendUnavailable),
    ("BadGateway", [], BackendUnavailable),
    ("VaultDown", ["Vault is sealed"], BackendUnavailable),
    ("VaultNotInitialized", [], BackendUnavailable),
    ("UnsupportedOperation", [], BackendError),
    ("UnexpectedError", [], BackendError),
])
def test_vault_errors(cls_name: str, errors: list[str], expected: type[RotatorError]) -> None:
    error = mapped(map_vault_error, vault_error(cls_name, *errors))
    assert type(error) is expected
    assert JWT not in error.message and "access_token" not in error.message  # never the body
    assert_well_formed(error)


def test_vault_http_errors() -> None:
    import requests.exceptions as rx

    cases: list[tuple[Exception, type[RotatorError], str]] = [
        (rx.ConnectionError("Connection refused"), BackendUnavailable, "cannot reach"),
        (rx.ConnectTimeout("timed out"), BackendUnavailable, "in time"),
        (rx.ReadTimeout("timed out"), BackendUnavailable, "in time"),
        (rx.SSLError("certificate verify failed"), BackendUnavailable, "TLS"),
        (rx.InvalidURL("bad url"), BackendError, "HTTP request"),
    ]
    for exc, expected, words in cases:
        error = mapped(map_vault_error, exc)
        assert type(error) is expected and words in error.message, (exc, error)


# --- Azure ----------------------------------------------------------------------------------


def azure_http_error(status: int, code: str, message: str, inner: str | None = None,
                     cls_name: str = "HttpResponseError") -> Exception:
    import azure.core.exceptions as ax

    body: dict[str, Any] = {"error": {"code": code, "message": message}}
    if inner:
        body["error"]["innererror"] = {"code": inner}
    cls: Any = getattr(ax, cls_name)
    made: Exception = cls(response=FakeResponse(status, body))
    return made


@pytest.mark.parametrize(("status", "code", "message", "inner", "cls_name", "expected"), [
    (404, "SecretNotFound", "A secret with (name/id) x was not found", None,
     "ResourceNotFoundError", NotFound),
    (401, "Unauthorized", "AKV10032: Invalid issuer", None, "ClientAuthenticationError",
     BackendPermissionDenied),
    (403, "Forbidden", "does not have secrets set permission", "ForbiddenByPolicy",
     "HttpResponseError", BackendPermissionDenied),
    (403, "Forbidden", "Operation get is not allowed on a disabled secret.", "SecretDisabled",
     "HttpResponseError", NotFound),
    (409, "Conflict", "Secret x is currently in a deleted but recoverable state",
     "ObjectIsDeletedButRecoverable", "ResourceExistsError", BackendConflict),
    (400, "BadParameter", "The request URI contains an invalid name: a_b", None,
     "HttpResponseError", BackendInvalidName),
    (429, "Throttled", "too many requests", None, "HttpResponseError", BackendUnavailable),
    (503, "ServiceUnavailable", "try later", None, "HttpResponseError", BackendUnavailable),
    (412, "PreconditionFailed", "changed", None, "ResourceModifiedError", BackendConflict),
    (400, "BadParameter", "Too many tags", None, "HttpResponseError", BackendError),
])
def test_azure_http_errors(status: int, code: str, message: str, inner: str | None,
                           cls_name: str, expected: type[RotatorError]) -> None:
    error = mapped(map_azure_error, azure_http_error(status, code, message, inner, cls_name))
    assert type(error) is expected
    assert_well_formed(error)
    if status == 409:
        assert error.hint and "purge" in error.hint


def test_azure_transport_errors() -> None:
    import azure.core.exceptions as ax
    import azure.identity

    cases: list[tuple[Exception, type[RotatorError], str]] = [
        (ax.ServiceRequestError("Connection refused"), BackendUnavailable, "cannot reach"),
        (ax.ServiceRequestError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"),
         BackendUnavailable, "TLS"),
        (ax.ServiceResponseTimeoutError("read timed out"), BackendUnavailable, "in time"),
        (ax.ServiceResponseError("connection reset"), BackendUnavailable, "cannot reach"),
        (azure.identity.CredentialUnavailableError("no identity found"),
         BackendPermissionDenied, "authentication"),
        (ax.SerializationError("bad"), BackendError, "serialise"),
    ]
    for exc, expected, words in cases:
        error = mapped(map_azure_error, exc)
        assert type(error) is expected and words in error.message, (exc, error)


def test_azure_refused_name_through_the_real_sdk(keyvault: Any) -> None:
    from azure.keyvault.secrets import SecretClient

    client = SecretClient(keyvault.url, keyvault.credential(), verify_challenge_resource=False,
                          connection_verify=str(keyvault.ca_path))
    with pytest.raises(BackendInvalidName) as info, TARGET.calling(map_azure_error, WHERE):
        client.set_secret("bad_name", "value")
    assert "invalid name" in info.value.message


# --- secrecy --------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    f"Authorization: Bearer {JWT}",
    f"token {VAULT_TOKEN} is not allowed",
    f'{{"access_token": "{JWT}", "x": 1}}',
    f"X-Vault-Token: {VAULT_TOKEN}",
    "key AKIAIOSFODNN7EXAMPLE denied",
    f"refresh_token={JWT}&grant=x",
])
def test_scrub_removes_token_like_text(text: str) -> None:
    out = scrub(text)
    for secret in (JWT, VAULT_TOKEN, "AKIAIOSFODNN7EXAMPLE", JWT.rsplit(".", 1)[-1]):
        assert secret not in out
    assert "redacted" in out


def test_vendor_messages_are_scrubbed() -> None:
    import azure.core.exceptions as ax
    import requests.exceptions as rx

    errors = [
        mapped(map_vault_error, vault_error("Forbidden", f"permission denied for {VAULT_TOKEN}")),
        mapped(map_aws_error, client_error("AccessDeniedException", f"Bearer {JWT}")),
        mapped(map_vault_error, rx.ConnectionError(f"Authorization: Bearer {JWT}")),
        mapped(map_azure_error, ax.ServiceRequestError(f"failed with token={JWT}")),
    ]
    for error in errors:
        text = error.describe()
        assert JWT not in text and VAULT_TOKEN not in text and JWT[-12:] not in text


# --- shared stage resolution (vault, azure) -------------------------------------------------


def test_stage_resolution_replays_promotions_and_retirements() -> None:
    def rec(key: str, promoted: int | None = None, retired: int | None = None,
            readable: bool = True) -> VersionRecord:
        return VersionRecord(key, f"v{key}", int(key), promoted, retired, readable)

    assert resolve_stages([]) == {}
    assert resolve_stages([rec("1")]) == {"1": Stage.PENDING}
    assert resolve_stages([rec("1", 10), rec("2", 20)]) == {"1": Stage.PREVIOUS,
                                                            "2": Stage.CURRENT}
    # promoting the previous one back, then retiring the current one
    assert resolve_stages([rec("1", 30), rec("2", 20)]) == {"1": Stage.CURRENT,
                                                            "2": Stage.PREVIOUS}
    assert resolve_stages([rec("1", 10), rec("2", 20, retired=25)]) == {"1": Stage.PREVIOUS}
    # nothing current: the next promotion keeps the previous version as it was
    assert resolve_stages([rec("1", 10), rec("2", 20, 25), rec("3", 30)]) == {
        "1": Stage.PREVIOUS, "3": Stage.CURRENT}
    # a version unreadable without a recorded time lost its stage "last"
    assert resolve_stages([rec("1", 10), rec("2", 20, readable=False)]) == {"1": Stage.PREVIOUS}
    # the last staged version is pending only while neither promoted nor retired
    assert resolve_stages([rec("1", 10), rec("2")])["2"] is Stage.PENDING
    assert "2" not in resolve_stages([rec("1", 10), rec("2", retired=15)])


# --- optional dependencies ------------------------------------------------------------------


def test_modules_import_without_their_extra_and_say_what_to_install() -> None:
    script = textwrap.dedent("""
        import sys
        for name in ("boto3", "botocore", "hvac", "azure", "azure.keyvault",
                     "azure.keyvault.secrets", "azure.identity"):
            sys.modules[name] = None  # as if not installed
        from rotator.errors import NotSupported
        from backends.aws import AwsBackend
        from backends.vault import VaultBackend
        from backends.azure import AzureBackend
        for cls, extra in ((AwsBackend, "aws"), (VaultBackend, "vault"), (AzureBackend, "azure")):
            try:
                cls.available()
            except NotSupported as exc:
                assert exc.hint == f"install makini-rotator[{extra}]", exc.hint
            else:
                raise SystemExit(f"{cls.__name__}.available() did not refuse")
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"

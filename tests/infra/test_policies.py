"""Least privilege, per environment: the AWS IAM policies, the Vault policies and the Azure role
assignment each reach one environment's tokens only, and agree with that environment's
Kubernetes overlay (identity) and rotator.toml (backends). (The Vault policies are also to be
exercised against a real OpenBao; that test lives with the vault backend's tests.)"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.infra._infra import ENVS, K8S, POLICIES, ROOT, Render

AWS = POLICIES / "aws"
VAULT = POLICIES / "vault"
AZURE = POLICIES / "azure"
KEY_VAULT_SECRETS_OFFICER = "b86a8fe4-44ce-4948-aee5-eccb2c155cd7"
# IAM accepts only "Resource": "*" for these (no resource-level permissions); metadata only.
NO_RESOURCE_LEVEL = {"secretsmanager:ListSecrets"}
NEVER = re.compile(
    r"^(iam|sts|organizations):|ResourcePolicy$|^kms:(CreateGrant|Encrypt|ReEncrypt|Put|Schedule"
    r"|Disable|Create)|^secretsmanager:(BatchGetSecretValue|ReplicateSecretToRegions|"
    r"RotateSecret|CancelRotateSecret)"
)


def other(env: str) -> str:
    return next(e for e in ENVS if e != env)


def env_config(env: str) -> dict[str, Any]:
    data = tomllib.loads((K8S / "overlays" / env / "rotator.toml").read_text())
    return dict(data["environments"][env])


def backends_of(env: str, kind: str) -> list[dict[str, Any]]:
    return [b for b in env_config(env)["backends"] if b["type"] == kind]


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


# --- AWS ------------------------------------------------------------------------------------


def aws_policy(env: str) -> list[dict[str, Any]]:
    doc = json.loads((AWS / f"{env}.json").read_text())
    assert doc["Version"] == "2012-10-17"
    statements: list[dict[str, Any]] = doc["Statement"]
    return statements


@pytest.mark.parametrize("env", ENVS)
def test_aws_policy_shape(env: str) -> None:
    statements = aws_policy(env)
    sids = [s["Sid"] for s in statements]
    assert len(set(sids)) == len(sids) == len(statements), "every statement has its own Sid"
    for s in statements:
        assert s["Effect"] == "Allow", s["Sid"]
        assert not {"NotAction", "NotResource", "NotPrincipal", "Principal"} & set(s), s["Sid"]
        for action in as_list(s["Action"]):
            assert re.fullmatch(r"(secretsmanager|kms):[A-Z][A-Za-z]+", action), (
                f"{s['Sid']}: {action!r} (no wildcards, no other service)"
            )
            assert not NEVER.search(action), f"{s['Sid']}: {action} is never needed"


@pytest.mark.parametrize("env", ENVS)
def test_aws_policy_reaches_only_its_environments_secrets(env: str) -> None:
    own = f"arn:aws:secretsmanager:*:*:secret:makini/{env}/*"
    for s in aws_policy(env):
        actions = as_list(s["Action"])
        resources = as_list(s["Resource"])
        service = {a.split(":")[0] for a in actions}
        assert len(service) == 1, f"{s['Sid']}: one service per statement"
        if service == {"secretsmanager"}:
            if resources == ["*"]:
                assert set(actions) <= NO_RESOURCE_LEVEL, f"{s['Sid']}: {actions} on *"
            else:
                assert resources == [own], f"{s['Sid']}: {resources}"
    text = (AWS / f"{env}.json").read_text()
    assert f"makini/{other(env)}" not in text


@pytest.mark.parametrize("env", ENVS)
def test_aws_policy_uses_only_the_named_kms_key_through_secrets_manager(env: str) -> None:
    kms = [s for s in aws_policy(env) if as_list(s["Action"])[0].startswith("kms:")]
    assert len(kms) == 1
    (s,) = kms
    (key,) = as_list(s["Resource"])
    m = re.fullmatch(r"arn:aws:kms:([a-z0-9-]+):(\d{12}):key/[0-9a-f-]{36}", key)
    assert m, f"a key ARN, not an alias or a wildcard: {key}"
    region, account = m.groups()
    assert set(as_list(s["Action"])) <= {"kms:Decrypt", "kms:GenerateDataKey", "kms:DescribeKey"}
    cond = s["Condition"]
    assert cond["StringEquals"]["kms:ViaService"] == f"secretsmanager.{region}.amazonaws.com"
    context = cond["StringLike"]["kms:EncryptionContext:SecretARN"]
    assert context == f"arn:aws:secretsmanager:{region}:{account}:secret:makini/{env}/*"
    # the key is the one the environment's aws backend encrypts with, in its region
    for backend in backends_of(env, "aws"):
        assert backend["kms_key_id"] == key
        assert backend["region"] == region
        assert backend["prefix"] == f"makini/{env}/"


@pytest.mark.parametrize("env", ENVS)
def test_aws_trust_admits_only_the_environments_service_account(
    env: str, renders: dict[tuple[str, str], Render]
) -> None:
    trust = json.loads((AWS / f"{env}-trust.json").read_text())
    (s,) = trust["Statement"]
    assert s["Effect"] == "Allow" and s["Action"] == "sts:AssumeRoleWithWebIdentity"
    provider = s["Principal"]["Federated"]
    m = re.fullmatch(r"arn:aws:iam::(\d{12}):oidc-provider/(.+)", provider)
    assert m
    account, issuer = m.groups()
    sa = renders[(env, "shipped")].one("ServiceAccount")
    subject = f"system:serviceaccount:{sa['metadata']['namespace']}:{sa['metadata']['name']}"
    assert s["Condition"]["StringEquals"] == {
        f"{issuer}:sub": subject,
        f"{issuer}:aud": "sts.amazonaws.com",
    }, "StringEquals on the exact subject (no StringLike wildcards)"
    role = sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert role == f"arn:aws:iam::{account}:role/makini-rotator-{env}"
    kms = next(s for s in aws_policy(env) if as_list(s["Action"])[0].startswith("kms:"))
    assert f":{account}:key/" in kms["Resource"], "role and key in the same account"


def test_prod_and_dev_aws_documents_share_no_resource() -> None:
    def resources(env: str) -> set[str]:
        return {r for s in aws_policy(env) for r in as_list(s["Resource"]) if r != "*"}

    assert not resources("prod") & resources("dev")


def aws_backend_operations() -> set[str]:
    """The Secrets Manager API operations backends/aws.py calls, as IAM action names."""
    source = (ROOT / "backends" / "aws.py").read_text()
    ops = set(re.findall(r"_call\(\s*\"([a-z_]+)\"", source))
    ops |= set(re.findall(r"\bclient\.([a-z_]+)\(", source))
    ops |= set(re.findall(r"get_paginator\(\s*\"([a-z_]+)\"", source))
    ops -= {"get_paginator", "close", "meta", "can_paginate", "exceptions"}
    return {"secretsmanager:" + "".join(p.title() for p in op.split("_")) for op in ops}


@pytest.mark.parametrize("env", ENVS)
def test_aws_policy_allows_exactly_the_calls_the_aws_backend_makes(env: str) -> None:
    if not (ROOT / "backends" / "aws.py").exists():
        pytest.fail("backends/aws.py is gone: update this test with the backend's new home")
    allowed = {a for s in aws_policy(env) for a in as_list(s["Action"])}
    calls = aws_backend_operations()
    assert calls, "found no Secrets Manager call in backends/aws.py: is the parser stale?"
    assert calls <= allowed, f"the aws backend calls {sorted(calls - allowed)}, not allowed"
    granted = {a for a in allowed if a.startswith("secretsmanager:")}
    assert granted <= calls, f"granted but never called: {sorted(granted - calls)}"
    source = (ROOT / "backends" / "aws.py").read_text()
    if re.search(r"\"Tags\"|Tags=", source):
        assert "secretsmanager:TagResource" in allowed, "CreateSecret with Tags needs it"


# --- Vault ----------------------------------------------------------------------------------

_BLOCK = re.compile(r'path\s+"([^"]+)"\s*\{\s*capabilities\s*=\s*\[([^\]]*)\]\s*\}')


def vault_rules(env: str) -> dict[str, set[str]]:
    text = (VAULT / f"{env}.hcl").read_text()
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    rules = {m.group(1): {c.strip().strip('"') for c in m.group(2).split(",") if c.strip()}
             for m in _BLOCK.finditer(body)}
    assert _BLOCK.sub("", body).strip() == "", "only path blocks with capabilities"
    return rules


@pytest.mark.parametrize("env", ENVS)
def test_vault_policy_confines_to_its_kv_paths(env: str) -> None:
    rules = vault_rules(env)
    assert f"secret/data/makini/{env}/*" in rules
    assert f"secret/metadata/makini/{env}/*" in rules
    for path, caps in rules.items():
        assert re.fullmatch(rf"secret/(data|metadata|delete|destroy)/makini/{env}/\*", path), path
        assert caps and caps <= {"create", "read", "update", "delete", "list", "patch"}, caps
    assert "list" not in rules[f"secret/data/makini/{env}/*"]
    assert other(env) not in (VAULT / f"{env}.hcl").read_text()


@pytest.mark.parametrize("env", ENVS)
def test_vault_policy_matches_the_backend_and_the_kubernetes_role(
    env: str, renders: dict[tuple[str, str], Render]
) -> None:
    text = (VAULT / f"{env}.hcl").read_text()
    sa = renders[(env, "shipped")].one("ServiceAccount")
    role = sa["metadata"]["annotations"]["makini-rotator/vault-role"]
    assert f"auth/kubernetes/role/{role}" in text
    assert f"bound_service_account_names={sa['metadata']['name']}" in text
    assert f"bound_service_account_namespaces={sa['metadata']['namespace']}" in text
    assert "audience=vault" in text
    for backend in backends_of(env, "vault"):
        assert backend.get("mount", "secret") == "secret"
        assert backend.get("path_prefix", "makini/{environment}").replace(
            "{environment}", env
        ) == f"makini/{env}"
        assert backend["auth"]["role"] == role


# --- Azure ----------------------------------------------------------------------------------


def azure_template() -> dict[str, Any]:
    return dict(json.loads((AZURE / "rotator-access.json").read_text()))


def azure_parameters(env: str) -> dict[str, Any]:
    doc = json.loads((AZURE / f"{env}.parameters.json").read_text())
    return {k: v["value"] for k, v in doc["parameters"].items()}


def test_azure_role_is_secrets_officer_on_the_vault_scope_only() -> None:
    template = azure_template()
    assert "deploymentTemplate.json" in template["$schema"]
    assignments = [r for r in template["resources"]
                   if r["type"] == "Microsoft.Authorization/roleAssignments"]
    assert len(assignments) == 1
    (ra,) = assignments
    role = ra["properties"]["roleDefinitionId"]
    if role.startswith("[variables("):
        role = template["variables"][re.search(r"variables\('(\w+)'\)", role).group(1)]
    assert KEY_VAULT_SECRETS_OFFICER in role
    assert ra["scope"] == "[format('Microsoft.KeyVault/vaults/{0}', parameters('keyVaultName'))]"
    assert ra["properties"]["principalType"] == "ServicePrincipal"
    kinds = {r["type"] for r in template["resources"]}
    assert kinds == {
        "Microsoft.Authorization/roleAssignments",
        "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials",
    }, "nothing else: no vault, no other role"
    fic = next(r for r in template["resources"] if r["type"].endswith("Credentials"))
    assert fic["properties"]["audiences"] == ["api://AzureADTokenExchange"]
    assert "system:serviceaccount:" in fic["properties"]["subject"]


@pytest.mark.parametrize("env", ENVS)
def test_azure_parameters_name_the_environments_own_vault_and_service_account(
    env: str, renders: dict[tuple[str, str], Render]
) -> None:
    params = azure_parameters(env)
    declared = azure_template()["parameters"]
    assert set(params) == set(declared)
    assert params["environment"] == env
    sa = renders[(env, "shipped")].one("ServiceAccount")
    assert params["serviceAccountNamespace"] == sa["metadata"]["namespace"]
    assert params["serviceAccountName"] == sa["metadata"]["name"]
    assert params["keyVaultName"] == f"kv-makini-{env}"
    assert params["identityName"].endswith(f"-{env}")
    for backend in backends_of(env, "azure"):
        assert backend["vault_url"].rstrip("/") == f"https://{params['keyVaultName']}.vault.azure.net"
    assert re.fullmatch(r"https://\S+/", params["oidcIssuerUrl"])


def test_prod_and_dev_azure_parameters_share_no_vault_or_identity() -> None:
    prod, dev = azure_parameters("prod"), azure_parameters("dev")
    for key in ("keyVaultName", "identityName", "serviceAccountNamespace", "serviceAccountName"):
        assert prod[key] != dev[key], key


def test_every_policy_file_is_tested() -> None:
    known = {f"aws/{e}{s}.json" for e in ENVS for s in ("", "-trust")}
    known |= {f"vault/{e}.hcl" for e in ENVS}
    known |= {"azure/rotator-access.json"} | {f"azure/{e}.parameters.json" for e in ENVS}
    found = {p.relative_to(POLICIES).as_posix() for p in POLICIES.rglob("*")
             if p.is_file() and p.suffix != ".md"}
    assert found == known, f"untested or missing: {found ^ known}"


def test_policy_documents_are_valid_json() -> None:
    for path in list(AWS.glob("*.json")) + list(AZURE.glob("*.json")):
        json.loads(Path(path).read_text())

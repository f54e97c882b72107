"""prod and dev share nothing that could let one reach the other's tokens: namespace, service
account and its cloud identities, configuration, backends, Secrets, sealing key, network
admission. Checked in every mode, and between every pair of modes (an operator may run prod
in one mode and dev in another)."""

from __future__ import annotations

import copy
import itertools
import tomllib
from typing import Any

import pytest

from tests.infra._infra import MODES, Render, container, secret_refs

ALL_MODES = (*MODES, "shipped")
PAIRS = list(itertools.product(ALL_MODES, ALL_MODES))


def identity(render: Render) -> dict[str, Any]:
    """Everything that names what a deployment can reach."""
    sa = render.one("ServiceAccount")
    config = tomllib.loads(render.config_toml())
    envs = config["environments"]
    secrets: set[tuple[str, str]] = set()
    volumes: set[str] = set()
    for _, pod in render.workloads():
        secrets |= {(render.one("Namespace")["metadata"]["name"], name)
                    for name, _ in secret_refs(pod)}
        for vol in pod["volumes"]:
            if "persistentVolumeClaim" in vol:
                volumes.add(vol["persistentVolumeClaim"]["claimName"])
    backends = set()
    for env in envs.values():
        for b in env["backends"]:
            backends |= {f"{b['type']}:{k}={v}" for k, v in b.items()
                         if k in ("prefix", "kms_key_id", "vault_url", "path_prefix", "path")}
            if b["type"] == "vault":
                backends.add(f"vault-role:{b['auth']['role']}")
    consumers = set()
    for policy in render.all("NetworkPolicy"):
        for rule in policy["spec"].get("ingress", []):
            for peer in rule["from"]:
                labels = peer["namespaceSelector"]["matchLabels"]
                consumers |= {f"{k}={v}" for k, v in labels.items() if "consumer-of" in k}
    notes = sa["metadata"]["annotations"]
    return {
        "namespace": {render.one("Namespace")["metadata"]["name"]},
        "service account": {f"{sa['metadata']['namespace']}/{sa['metadata']['name']}"},
        "AWS role": {notes["eks.amazonaws.com/role-arn"]},
        "AWS account": {notes["eks.amazonaws.com/role-arn"].split(":")[4]},
        "Azure identity": {notes["azure.workload.identity/client-id"]},
        "Vault role": {notes["makini-rotator/vault-role"]},
        "environment names": set(envs),
        "Makini admin client": {e["makini"]["client_id"] for e in envs.values()},
        "sealing key variable": {e["sealing_key"]["env"] for e in envs.values()},
        "Makini secret variable": {e["makini"]["client_secret_env"] for e in envs.values()},
        "backend locations": backends,
        "Secrets": secrets,
        "Secret names": {name for _, name in secrets},
        "journal volumes": volumes,
        "consumer labels": consumers,
        "config maps": {render.one("ConfigMap")["metadata"]["name"]},
    }


@pytest.mark.parametrize(("prod_mode", "dev_mode"), PAIRS, ids=[f"{p}+{d}" for p, d in PAIRS])
def test_prod_and_dev_share_nothing(
    renders: dict[tuple[str, str], Render], prod_mode: str, dev_mode: str
) -> None:
    prod = identity(renders[("prod", prod_mode)])
    dev = identity(renders[("dev", dev_mode)])
    for what in prod:
        shared = prod[what] & dev[what]
        assert not shared, f"prod and dev share {what}: {shared}"
    assert prod["backend locations"] and dev["backend locations"]


@pytest.mark.parametrize("mode", ALL_MODES)
def test_each_side_names_only_itself(renders: dict[tuple[str, str], Render], mode: str) -> None:
    for env, other in (("prod", "dev"), ("dev", "prod")):
        render = renders[(env, mode)]
        for doc in render.docs:
            if doc["kind"] == "ConfigMap":
                continue
            text = repr(doc)
            assert f"rotator-{other}" not in text and f"makini/{other}/" not in text, doc["kind"]
            assert f"consumer-of': '{other}'" not in text
        config = render.config_toml()
        assert f"environments.{other}" not in config and f"makini/{other}" not in config
        for _, pod in render.workloads():
            for entry in container(pod)["env"]:
                assert other.upper() not in entry["name"], entry["name"]


def test_the_separation_check_does_bite(renders: dict[tuple[str, str], Render]) -> None:
    """Guards the guard: a dev deployment reading prod's Secret is caught."""
    dev = copy.deepcopy(renders[("dev", "shipped")])
    pod = dev.one("Deployment")["spec"]["template"]["spec"]
    for entry in container(pod)["env"]:
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            ref["name"] = "makini-rotator-secrets-prod"
    prod = identity(renders[("prod", "shipped")])
    assert prod["Secret names"] & identity(dev)["Secret names"]

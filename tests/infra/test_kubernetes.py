"""The Kubernetes manifests: every overlay renders in every mode, matches the Kubernetes schemas,
and holds the spec's rules (workloads, probes, security context, journal, network, identity)."""

from __future__ import annotations

import copy
import ipaddress
import tomllib
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.infra._infra import (
    CRD_GROUPS,
    ENVS,
    INFRA,
    KUBERNETES_VERSIONS,
    MODES,
    Render,
    container,
    shipped_mode,
)

KEYS = [(env, mode) for env in ENVS for mode in (*MODES, "shipped")]
IDS = [f"{env}-{mode}" for env, mode in KEYS]


def _with(part: str) -> list[tuple[str, str]]:
    """The renders whose mode includes a component (so no test is skipped for want of it)."""
    return [(e, m) for e, m in KEYS if part in MODES[shipped_mode(e) if m == "shipped" else m]]


CRONJOB_KEYS = _with("cronjob")
SERVICE_KEYS = _with("service")
UID = 10001
API_PORT = 8080


@pytest.fixture(params=KEYS, ids=IDS)
def render(request: pytest.FixtureRequest, renders: dict[tuple[str, str], Render]) -> Render:
    return renders[request.param]


def mode_of(render: Render) -> str:
    return shipped_mode(render.env) if render.mode == "shipped" else render.mode


def test_shipped_overlays_pick_a_known_mode() -> None:
    # prod runs both modes on PostgreSQL; dev the API alone on SQLite (docs/runbook.md)
    assert shipped_mode("prod") == "both"
    assert shipped_mode("dev") == "service"


def test_each_mode_renders_what_it_promises(render: Render) -> None:
    mode = mode_of(render)
    kinds = {d["kind"] for d in render.docs}
    has_cronjob = "cronjob" in MODES[mode]
    has_service = "service" in MODES[mode]
    assert ("CronJob" in kinds) == has_cronjob
    assert ({"Deployment", "Service", "PodDisruptionBudget"} <= kinds) == has_service
    assert ("Deployment" in kinds) == has_service
    assert ("PersistentVolumeClaim" in kinds) == ("journal-sqlite" in MODES[mode])
    assert {"Namespace", "ServiceAccount", "ConfigMap", "NetworkPolicy"} <= kinds
    assert "Secret" not in kinds, "secrets are only referenced, never part of the manifests"


def test_everything_is_in_the_environments_own_namespace(render: Render) -> None:
    ns = f"makini-rotator-{render.env}"
    assert render.one("Namespace")["metadata"]["name"] == ns
    for doc in render.docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == ns, doc["metadata"]["name"]
            assert doc["metadata"]["name"].endswith(f"-{render.env}") or doc["kind"] == "ConfigMap"
        assert doc["metadata"]["labels"]["makini-rotator/environment"] == render.env


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_match_the_kubernetes_schemas(render: Render, version: str) -> None:
    for doc in render.docs:
        if not doc["apiVersion"].startswith(CRD_GROUPS):  # test_monitoring_objects_fit
            kubernetes_validate.validate(doc, version, strict=True)


def test_schema_validation_does_bite(renders: dict[tuple[str, str], Render]) -> None:
    """Guards the guard: a misspelt field fails strict validation."""
    deployment = copy.deepcopy(renders[("prod", "both")].one("Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_pods_are_locked_down(render: Render) -> None:
    for obj, pod in render.workloads():
        where = f"{render.id} {obj['kind']}"
        assert pod["serviceAccountName"] == f"makini-rotator-{render.env}", where
        assert pod["automountServiceAccountToken"] is False, where
        assert pod.get("hostNetwork") is not True and pod.get("hostPID") is not True, where
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == UID, where
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", where
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
            assert sc.get("privileged") is not True, where
            assert sc["runAsNonRoot"] is True, where
            res = c["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res[kind]), f"{where}: {kind}"
            assert ":" in c["image"] or "@sha256:" in c["image"], f"{where}: untagged image"
            assert not c["image"].endswith(":latest"), where


def test_only_the_journal_folder_and_tmp_are_writable(render: Render) -> None:
    for obj, pod in render.workloads():
        volumes = {v["name"]: v for v in pod["volumes"]}
        for mount in container(pod)["volumeMounts"]:
            vol = volumes[mount["name"]]
            if mount.get("readOnly"):
                continue
            if mount["mountPath"] == "/tmp":
                assert "emptyDir" in vol and vol["emptyDir"].get("sizeLimit")
            else:
                assert mount["mountPath"] == "/var/lib/rotator", f"{obj['kind']}: {mount}"
                assert "persistentVolumeClaim" in vol
        config = next(m for m in container(pod)["volumeMounts"] if m["mountPath"] == "/etc/rotator")
        assert config["readOnly"] is True
        cm = render.one("ConfigMap", "makini-rotator-config")["metadata"]["name"]
        assert volumes[config["name"]]["configMap"]["name"] == cm, "the generated (hashed) name"


@pytest.mark.parametrize("key", CRONJOB_KEYS, ids=[f"{e}-{m}" for e, m in CRONJOB_KEYS])
def test_cronjob_runs_run_due_once_at_a_time(
    renders: dict[tuple[str, str], Render], key: tuple[str, str]
) -> None:
    cronjob = renders[key].one("CronJob")
    spec = cronjob["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert 0 < spec["startingDeadlineSeconds"] < 300, "below the schedule's period"
    assert spec["successfulJobsHistoryLimit"] >= 1 and spec["failedJobsHistoryLimit"] >= 1
    job = spec["jobTemplate"]["spec"]
    assert job["activeDeadlineSeconds"] > 0 and job["backoffLimit"] >= 0
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    c = container(pod)
    assert c["command"] + c["args"] == ["rotator", "run-due"]


@pytest.mark.parametrize("key", SERVICE_KEYS, ids=[f"{e}-{m}" for e, m in SERVICE_KEYS])
def test_deployment_serves_with_probes_on_its_port(
    renders: dict[tuple[str, str], Render], key: tuple[str, str]
) -> None:
    render = renders[key]
    deployment = render.one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    c = container(pod)
    argv = c["command"] + c["args"]
    assert argv[:2] == ["rotator", "serve"]
    port = int(argv[argv.index("--port") + 1])
    assert port == API_PORT
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": port}
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in ("http", port)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    service = render.one("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(port, "http")]
    pdb = render.one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"]


def test_the_journal_matches_the_mode(render: Render) -> None:
    mode = mode_of(render)
    for obj, pod in render.workloads():
        env = {e["name"]: e for e in container(pod)["env"]}
        journal = env["ROTATOR_JOURNAL_URL"]
        if "journal-sqlite" in MODES[mode]:
            assert journal["value"] == "sqlite:////var/lib/rotator/journal.db"
            claim = render.one("PersistentVolumeClaim")["metadata"]["name"]
            claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                      if "persistentVolumeClaim" in v]
            assert claims == [claim]
            if obj["kind"] == "Deployment":
                # one process per SQLite file: never two pods, not even during a rollout
                assert obj["spec"]["replicas"] == 1
                assert obj["spec"]["strategy"]["type"] == "Recreate"
        else:
            ref = journal["valueFrom"]["secretKeyRef"]
            assert ref == {"name": f"makini-rotator-journal-{render.env}", "key": "url"}
            assert not any("persistentVolumeClaim" in v for v in pod["volumes"])
            if obj["kind"] == "Deployment":
                assert obj["spec"]["replicas"] >= 2
    # the CronJob beside the service needs a shared journal
    kinds = {d["kind"] for d in render.docs}
    if {"CronJob", "Deployment"} <= kinds:
        assert "journal-postgres" in MODES[mode]


def test_secrets_are_only_referenced(render: Render) -> None:
    allowed_plain = {"ROTATOR_CONFIG", "ROTATOR_LOG_FORMAT", "ROTATOR_JOURNAL_URL"}
    config = tomllib.loads(render.config_toml())
    ((_, env_cfg),) = config["environments"].items()
    needed = {env_cfg["makini"]["client_secret_env"], env_cfg["sealing_key"]["env"]}
    for obj, pod in render.workloads():
        env = {e["name"]: e for e in container(pod)["env"]}
        for name, entry in env.items():
            if "value" in entry:
                assert name in allowed_plain, f"{obj['kind']}: {name} has an inline value"
                assert "postgres" not in entry["value"], "a database URL carries a password"
            else:
                assert set(entry["valueFrom"]) == {"secretKeyRef"}, name
        for name in needed:
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == f"makini-rotator-secrets-{render.env}", name
        assert not container(pod).get("envFrom"), "no wholesale envFrom"


def test_the_config_map_is_one_environments_config_without_secrets(render: Render) -> None:
    config = tomllib.loads(render.config_toml())
    assert list(config["environments"]) == [render.env]
    env = config["environments"][render.env]
    assert set(env["sealing_key"]) == {"env"}, "the sealing key comes from the Secret"
    text = render.config_toml().lower()
    for word in ("client_secret =", "password", "token =", "-----begin"):
        assert word not in text, word
    assert config["journal"]["url"].startswith("sqlite:////var/lib/rotator/")


def _peers(rule: dict[str, Any], side: str) -> list[dict[str, Any]]:
    return list(rule.get(side, []))


def test_network_policies_fence_the_namespace(render: Render) -> None:
    policies = {p["metadata"]["name"].removesuffix(f"-{render.env}"): p["spec"]
                for p in render.all("NetworkPolicy")}
    deny = policies["makini-rotator-default-deny"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    mode = mode_of(render)
    egress_ports: set[int] = set()
    for name, spec in policies.items():
        for rule in spec.get("egress", []):
            assert rule.get("ports"), f"{name}: an egress rule without ports allows everything"
            ports = {p["port"] for p in rule["ports"]}
            egress_ports |= ports
            for peer in _peers(rule, "to"):
                if "ipBlock" in peer:
                    net = ipaddress.ip_network(peer["ipBlock"]["cidr"])
                    assert net != ipaddress.ip_network("192.0.2.0/24"), f"{name}: placeholder"
                    if net.prefixlen == 0:
                        assert ports == {443}, f"{name}: the whole internet only on 443"
                        assert "169.254.0.0/16" in peer["ipBlock"]["except"], "metadata service"
            if 53 in ports:
                assert all("namespaceSelector" in p for p in _peers(rule, "to"))
        for rule in spec.get("ingress", []):
            assert [p["port"] for p in rule["ports"]] == [API_PORT], name
            for peer in _peers(rule, "from"):
                assert set(peer) == {"namespaceSelector"}, f"{name}: only labelled namespaces"
    expected = {53, 443} | ({5432} if "journal-postgres" in MODES[mode] else set())
    expected |= {9091} if "monitoring" in MODES[mode] else set()  # run-due -> Pushgateway
    assert expected <= egress_ports <= expected | {8200}
    if "service" in MODES[mode]:
        ingress = policies["makini-rotator-api-ingress"]
        selectors = [peer["namespaceSelector"]["matchLabels"]
                     for rule in ingress["ingress"] for peer in rule["from"]]
        assert {"makini-rotator/consumer-of": render.env} in selectors
        assert all(s == {"makini-rotator/consumer-of": render.env}
                   or s == {"makini-rotator/metrics-scraper": "true"} for s in selectors)
    else:
        assert "makini-rotator-api-ingress" not in policies


def test_every_workload_may_resolve_names_and_reach_https(render: Render) -> None:
    """The default deny holds every pod; each workload's pods must be selected by the policy
    that lets them out (DNS, and HTTPS to Makini and the cloud backends)."""
    policies = render.all("NetworkPolicy")
    for workload, template in render.pod_templates():
        labels = template.get("labels", {})
        ports: set[int] = set()
        for policy in policies:
            wanted = policy["spec"]["podSelector"].get("matchLabels", {})
            if wanted.items() <= labels.items():
                ports |= {p["port"] for r in policy["spec"].get("egress", []) for p in r["ports"]}
        assert {53, 443} <= ports, f"{workload['kind']}: its pods may not reach DNS and HTTPS"


def test_identity_is_bound_for_irsa_workload_identity_and_vault(render: Render) -> None:
    sa = render.one("ServiceAccount")
    name = f"makini-rotator-{render.env}"
    assert sa["metadata"]["name"] == name
    assert sa["automountServiceAccountToken"] is False
    notes = sa["metadata"]["annotations"]
    assert notes["eks.amazonaws.com/role-arn"].endswith(f":role/{name}")
    assert notes["azure.workload.identity/client-id"]
    assert notes["makini-rotator/vault-role"] == name
    for obj, meta in render.pod_templates():
        assert meta["labels"]["azure.workload.identity/use"] == "true", obj["kind"]
    for _, pod in render.workloads():
        vault = next(v for v in pod["volumes"] if v["name"] == "vault-token")
        (source,) = vault["projected"]["sources"]
        token = source["serviceAccountToken"]
        assert token["audience"] == "vault" and token["expirationSeconds"] <= 3600
        mount = next(m for m in container(pod)["volumeMounts"] if m["name"] == "vault-token")
        assert mount["readOnly"] is True
    # the vault backend logs in with that very file
    config = tomllib.loads(render.config_toml())
    for backend in config["environments"][render.env]["backends"]:
        if backend["type"] == "vault":
            assert backend["auth"] == {
                "method": "kubernetes",
                "role": name,
                "jwt_path": "/var/run/secrets/vault/token",
            }


def test_the_pods_grace_period_covers_the_drain(render: Render) -> None:
    # SIGTERM drains: rotations in flight get scheduler.drain, then serve closes its runtime
    # and exits 0. A grace period shorter than that turns every rollout into a SIGKILL.
    from datetime import timedelta

    from rotator.settings import SchedulerSettings

    config = tomllib.loads(render.config_toml())
    scheduler = SchedulerSettings.model_validate(config.get("scheduler", {}))
    needed = scheduler.drain + timedelta(seconds=5)
    for workload, pod in render.workloads():
        grace = timedelta(seconds=pod.get("terminationGracePeriodSeconds", 30))
        assert grace >= needed, f"{render.id} {workload['kind']}: {grace} < drain + 5 s"


MONITORED_KEYS = _with("monitoring")


@pytest.mark.parametrize("key", MONITORED_KEYS, ids=[f"{e}-{m}" for e, m in MONITORED_KEYS])
def test_monitoring_objects_fit(
    key: tuple[str, str], renders: dict[tuple[str, str], Render]
) -> None:
    """The Prometheus Operator's objects (no Kubernetes schema covers them): the ServiceMonitor
    scrapes the API Service's port at /metrics, the PrometheusRule holds the shipped rules, and
    the CronJob's pods may reach a Pushgateway."""
    render = renders[key]
    service = render.one("Service", "makini-rotator-api")
    monitor = render.one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
    # the job label is the Service's name, which RotatorDown matches
    assert service["metadata"]["name"].startswith("makini-rotator")
    rule = render.one("PrometheusRule")
    shipped = yaml.safe_load((INFRA / "prometheus" / "rules.yml").read_text())
    assert rule["spec"] == shipped
    egress = render.one("NetworkPolicy", "makini-rotator-pushgateway-egress")
    [(_, template)] = [(w, t) for w, t in render.pod_templates() if w["kind"] == "CronJob"]
    wanted = egress["spec"]["podSelector"]["matchLabels"]
    assert wanted.items() <= template["labels"].items()

"""Helpers of the infrastructure tests: where things are, the tools, rendering the kustomize
overlays in every mode, and walking the rendered objects."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
POLICIES = INFRA / "policies"

ENVS = ("prod", "dev")
# The modes an operator picks with the overlay's `components:` list (docs/runbook.md).
MODES: dict[str, tuple[str, ...]] = {
    "cronjob": ("cronjob", "journal-sqlite"),
    "service": ("service", "journal-sqlite"),
    "both": ("cronjob", "service", "journal-postgres"),
    # any mode plus the Prometheus Operator's objects (not shipped on: it needs their CRDs)
    "monitored": ("cronjob", "service", "journal-postgres", "monitoring"),
}
CRD_GROUPS = ("monitoring.coreos.com/",)
"""API groups of custom resources the Kubernetes schemas do not cover (checked on their own)"""
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")  # oldest still commonly run, newest with schemas
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# --- tools ---------------------------------------------------------------------------------

_TOOLS = {
    # name: (override variable, places infra/tools.mk installs it, in order)
    "kubectl": ("ROTATOR_KUBECTL", (ROOT / ".venv-tools" / "bin" / "kubectl",)),
    "checkov": ("ROTATOR_CHECKOV", (ROOT / ".venv-tools" / "bin" / "checkov",)),
    "hadolint": ("ROTATOR_HADOLINT", (Path(sys.executable).parent / "hadolint",)),
}


def find_tool(name: str) -> str:
    """The tool's path. Missing: a failure in CI (infra/tools.mk must have installed it), a skip
    that says how to get it elsewhere."""
    variable, places = _TOOLS[name]
    if os.environ.get(variable):
        return os.environ[variable]
    for place in places:
        if place.is_file() and os.access(place, os.X_OK):
            return str(place)
    found = shutil.which(name)
    if found:
        return found
    pytest.fail(f"{name} is not installed: `make test` (or `make infra-tools`) installs it")


def run(
    argv: list[str], *, timeout: float = 120, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)


# --- rendering -----------------------------------------------------------------------------


@dataclass
class Render:
    """One overlay rendered in one mode."""

    env: str
    mode: str
    text: str
    docs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.env}-{self.mode}"

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name_prefix: str = "") -> dict[str, Any]:
        found = [d for d in self.all(kind) if d["metadata"]["name"].startswith(name_prefix)]
        assert len(found) == 1, f"{self.id}: {len(found)} {kind} {name_prefix!r}, not one"
        return found[0]

    def maybe(self, kind: str) -> dict[str, Any] | None:
        found = self.all(kind)
        assert len(found) <= 1, f"{self.id}: more than one {kind}"
        return found[0] if found else None

    def workloads(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(object, pod spec) of the CronJob and the Deployment, whichever are present."""
        for doc in self.docs:
            if doc["kind"] == "Deployment":
                yield doc, doc["spec"]["template"]["spec"]
            elif doc["kind"] == "CronJob":
                yield doc, doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]

    def pod_templates(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(object, pod template metadata) of the workloads."""
        for doc in self.docs:
            if doc["kind"] == "Deployment":
                yield doc, doc["spec"]["template"]["metadata"]
            elif doc["kind"] == "CronJob":
                yield doc, doc["spec"]["jobTemplate"]["spec"]["template"]["metadata"]

    def config_toml(self) -> str:
        cm = self.one("ConfigMap", "makini-rotator-config")
        return str(cm["data"]["rotator.toml"])


def overlay_components(env: str) -> list[str]:
    data = yaml.safe_load((K8S / "overlays" / env / "kustomization.yaml").read_text())
    return [Path(c).name for c in data.get("components", [])]


def shipped_mode(env: str) -> str:
    chosen = tuple(sorted(overlay_components(env)))
    for mode, parts in MODES.items():
        if tuple(sorted(parts)) == chosen:
            return mode
    raise AssertionError(f"overlays/{env} picks components {chosen}, which is no known mode")


def kustomize(kubectl: str, path: Path) -> str:
    proc = run([kubectl, "kustomize", str(path)], timeout=60)
    assert proc.returncode == 0, f"kustomize {path} failed:\n{proc.stderr}"
    return proc.stdout


def render_all(kubectl: str, workdir: Path) -> dict[tuple[str, str], Render]:
    """Every environment in every mode (a copy of the tree whose overlays differ only in their
    `components:`), plus each overlay exactly as committed (mode "shipped")."""
    tree = workdir / "k8s"
    shutil.copytree(K8S, tree)
    jobs: dict[tuple[str, str], Path] = {}
    for env in ENVS:
        jobs[(env, "shipped")] = K8S / "overlays" / env
        for mode, parts in MODES.items():
            variant = tree / "overlays" / f"{env}-{mode}"
            shutil.copytree(tree / "overlays" / env, variant)
            kfile = variant / "kustomization.yaml"
            data = yaml.safe_load(kfile.read_text())
            data["components"] = [f"../../components/{p}" for p in parts]
            kfile.write_text(yaml.safe_dump(data, sort_keys=False))
            jobs[(env, mode)] = variant
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=4) as pool:
        outputs = pool.map(lambda p: kustomize(kubectl, p), jobs.values())
        texts = dict(zip(jobs, outputs, strict=True))
    return {
        key: Render(key[0], key[1], text, [d for d in yaml.load_all(text, Loader=_Loader) if d])
        for key, text in texts.items()
    }


# --- pod specs -----------------------------------------------------------------------------


def container(pod_spec: dict[str, Any], name: str = "rotator") -> dict[str, Any]:
    found = [c for c in pod_spec["containers"] if c["name"] == name]
    assert len(found) == 1, f"no single container {name!r}"
    return found[0]


def secret_refs(pod_spec: dict[str, Any]) -> set[tuple[str, str]]:
    """(Secret name, key) of every secretKeyRef, envFrom secret and secret volume."""
    refs: set[tuple[str, str]] = set()
    for c in pod_spec.get("containers", []) + pod_spec.get("initContainers", []):
        for env in c.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs.add((ref["name"], ref["key"]))
        for src in c.get("envFrom", []):
            if "secretRef" in src:
                refs.add((src["secretRef"]["name"], "*"))
    for vol in pod_spec.get("volumes", []):
        if "secret" in vol:
            refs.add((vol["secret"]["secretName"], "*"))
    return refs


# --- .dockerignore -------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if pattern.startswith("/", i):
                out = out[:-2] + "(?:.*/)?"
                i += 1
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    # a pattern matching a folder matches everything inside it
    return re.compile(f"^{out}(?:/.*)?$")


def dockerignored(path: str, rules: list[str]) -> bool:
    """Whether the build context leaves ``path`` out, with Docker's rules: the last matching
    pattern wins, ``!`` re-includes."""
    ignored = False
    for raw in rules:
        rule = raw.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        rule = rule[1:] if negate else rule
        rule = rule.strip("/")
        if _pattern_regex(rule).match(path):
            ignored = not negate
    return ignored

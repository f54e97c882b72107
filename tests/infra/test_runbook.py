"""docs/runbook.md stays true: the objects, Secrets and keys its commands name exist in the
rendered manifests, and the `rotator` subcommands it uses exist in the CLI."""

from __future__ import annotations

import re

from tests.infra._infra import ROOT, Render, secret_refs

RUNBOOK = ROOT / "docs" / "runbook.md"
# Subcommands the runbook documents before the CLI has them (the lead's list to empty).
def shell_blocks() -> str:
    """The runbook's shell code, continuation lines joined."""
    text = RUNBOOK.read_text()
    code = "\n".join(re.findall(r"```sh\n(.*?)```", text, re.S))
    return re.sub(r"\\\n\s*", " ", code)


def test_objects_the_runbook_names_exist(renders: dict[tuple[str, str], Render]) -> None:
    names = {(d["kind"], d["metadata"]["name"]) for r in renders.values() for d in r.docs}
    kinds = {"deploy": "Deployment", "cronjob": "CronJob", "pvc": "PersistentVolumeClaim"}
    commands = shell_blocks()
    for env in ("prod", "dev"):
        text = commands.replace("$ENV", env).replace("$NS", f"makini-rotator-{env}")
        found = set(re.findall(r"\b(deploy|cronjob)/([a-z0-9-]+)", text))
        found |= {("pvc", n) for n in re.findall(r"delete pvc ([a-z0-9-]+)", text)}
        assert found
        for short, name in found:
            assert (kinds[short], name) in names, f"{short}/{name}"
        for ns in re.findall(r"-n (makini-rotator-[a-z]+)\b", text):
            assert ("Namespace", ns) in names, ns


def test_secrets_the_runbook_creates_are_the_ones_the_pods_read(
    renders: dict[tuple[str, str], Render],
) -> None:
    commands = shell_blocks()
    for env in ("prod", "dev"):
        text = commands.replace("$ENV", env)
        created: set[tuple[str, str]] = set()
        for m in re.finditer(r"create secret generic ([a-z0-9-]+)(.*)", text):
            keys = re.findall(r"--from-literal=([a-z-]+)", m.group(2))
            created |= {(m.group(1), k) for k in keys}
        read: set[tuple[str, str]] = set()
        for _, pod in renders[(env, "both")].workloads():
            read |= secret_refs(pod)
        for _, pod in renders[(env, "cronjob")].workloads():
            read |= secret_refs(pod)
        assert read == created, f"{env}: pods read {sorted(read)}, the runbook creates {created}"


def test_rotator_commands_in_the_runbook_exist() -> None:
    from rotator.cli.app import app

    known = {c.name or c.callback.__name__  # type: ignore[union-attr]
             for c in app.registered_commands}
    known |= {g.name for g in app.registered_groups if g.name}
    used = set(re.findall(r"(?:^|[\s(`])rotator(?:_job)? ([a-z][a-z-]+)", shell_blocks(), re.M))
    used |= set(re.findall(r"`rotator ([a-z][a-z-]+)", RUNBOOK.read_text()))
    missing = used - known
    assert not missing, f"the runbook uses commands the CLI lacks: {missing}"

"""The shipped alert rules (infra/prometheus/rules.yml): promtool checks them, promtool's unit
tests (infra/prometheus/rules_test.yml) show every alert firing when it should and silent when
it should not, the PrometheusRule holds the same rules, and each alert's runbook link leads to
a section of docs/runbook.md."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from tests.infra._infra import INFRA, K8S, ROOT, run
from tests.infra._peers import binary

RULES = INFRA / "prometheus" / "rules.yml"
RULE_TESTS = INFRA / "prometheus" / "rules_test.yml"
PROMETHEUS_RULE = K8S / "components" / "monitoring" / "prometheusrule.yaml"
RUNBOOK = ROOT / "docs" / "runbook.md"


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def promtool_test(folder: Path) -> tuple[int, str]:
    proc = run([binary("promtool"), "test", "rules", "rules_test.yml"], cwd=folder, timeout=60)
    return proc.returncode, proc.stdout + proc.stderr


def test_promtool_checks_the_rules() -> None:
    proc = run([binary("promtool"), "check", "rules", str(RULES)], timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in proc.stdout


def test_the_alerts_the_issue_asks_for_are_there() -> None:
    names = {rule["alert"] for rule in alerts()}
    assert names == {
        "RotatorRotationFailing",
        "RotatorTokenExpiringUnrotated",
        "RotatorRunDueStale",
        "RotatorBackendsDisagree",
        "RotatorAttention",
        "RotatorReadersOnOldVersion",
        "RotatorWebhookBacklog",
        "RotatorDown",
    }
    for rule in alerts():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"]), rule["alert"]


def test_every_alert_is_tested_firing_and_silent() -> None:
    cases = [
        c for t in yaml.safe_load(RULE_TESTS.read_text())["tests"] for c in t["alert_rule_test"]
    ]
    for rule in alerts():
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c["exp_alerts"] for c in mine), f"{rule['alert']}: no case where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{rule['alert']}: no silent case"


def test_promtool_unit_tests_pass() -> None:
    code, out = promtool_test(RULE_TESTS.parent)
    assert code == 0, out
    assert "SUCCESS" in out


def test_the_unit_tests_bite(tmp_path: Path) -> None:
    """Guards the guard: an alert that waits longer than its tests expect fails them."""
    shutil.copy(RULE_TESTS, tmp_path / "rules_test.yml")
    text = RULES.read_text()
    slower = re.sub(r"(alert: RotatorAttention\n(?:.*\n)*?\s+for: )1m", r"\g<1>10m", text, count=1)
    assert slower != text
    (tmp_path / "rules.yml").write_text(slower)
    code, out = promtool_test(tmp_path)
    assert code != 0
    assert "RotatorAttention" in out


def test_the_prometheus_rule_holds_the_same_rules() -> None:
    doc = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert doc["spec"] == yaml.safe_load(RULES.read_text()), (
        "infra/k8s/components/monitoring/prometheusrule.yaml differs from "
        "infra/prometheus/rules.yml: change both"
    )


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def test_each_runbook_link_leads_to_a_runbook_section() -> None:
    headings = re.findall(r"^#+ (.+)$", RUNBOOK.read_text(), re.M)
    anchors = {_anchor(h) for h in headings}
    for rule in alerts():
        url = rule["annotations"]["runbook_url"]
        page, _, anchor = url.partition("#")
        assert page == "docs/runbook.md", rule["alert"]
        assert anchor in anchors, f"{rule['alert']}: docs/runbook.md has no section #{anchor}"

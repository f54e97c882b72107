"""The Grafana dashboard's every query returns data from a real Prometheus that scrapes a real
``rotator serve`` (a subprocess, against the simulator) and a real Pushgateway to which a real
``rotator run-due`` pushed; the same Prometheus loads the shipped alert rules."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from rotator.journal import Journal
from rotator.keys import create_key
from tests.infra._infra import INFRA
from tests.infra._monitoring import Monitored, run, scrape, value
from tests.infra._peers import prometheus, pushgateway
from tests.wait import wait_until

DASHBOARD = INFRA / "grafana" / "rotator.json"
RULES = INFRA / "prometheus" / "rules.yml"
# What Grafana puts in place of the dashboard's variables
VARIABLES = {"$__rate_interval": "5m", "$environment": ".+"}


def queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target, variables replaced as Grafana would."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, replacement in VARIABLES.items():
                expr = expr.replace(name, replacement)
            assert "$" not in expr, f"{panel['title']}: a variable the test does not know"
            out.append((panel["title"], expr))
    return out


def test_the_dashboard_is_grafana_json_with_a_query_per_panel() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "makini-rotator"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) >= 10
    for panel in dashboard["panels"]:
        assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
    assert len(queries()) >= len(ids)


def config(serve: str, gateway: str) -> str:
    return f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {RULES}
scrape_configs:
  - job_name: makini-rotator
    static_configs:
      - targets: ["{serve.removeprefix("http://")}"]
  - job_name: pushgateway
    honor_labels: true
    static_configs:
      - targets: ["{gateway.removeprefix("http://")}"]
"""


def query(url: str, expr: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    assert r.status_code == 200, (expr, r.text)
    result: list[dict[str, Any]] = r.json()["data"]["result"]
    return result


def has_data(url: str, expr: str) -> bool:
    """At least one series with a finite value."""
    return any(math.isfinite(float(s["value"][1])) for s in query(url, expr))


@pytest.mark.timeout(150)
def test_every_dashboard_query_returns_data_from_serve_and_the_pushgateway(
    tmp_path: Path, sim: Any
) -> None:
    journal_url = f"sqlite:///{tmp_path / 'journal.db'}"
    with pushgateway(tmp_path) as gateway:
        rig = Monitored(
            tmp_path,
            sim,
            {
                "expiry_warning": "2d",
                "backend_check_interval": "1s",
                "pushgateway": {"url": gateway},
            },
            journal=journal_url,
        )
        assert run(rig, "run-due").returncode == 0  # first tokens, pushed
        journal = Journal(journal_url, migrate="off")
        try:
            _, reader = create_key(journal, "prod", "billing", actor="test")
            _, admin = create_key(journal, "prod", "ops", admin=True, actor="test")
        finally:
            journal.close()

        with rig.serving() as serve, prometheus(tmp_path, config(serve, gateway)) as prom:
            wait_until(
                "Prometheus to scrape serve and the Pushgateway",
                lambda: len([s for s in query(prom, "up == 1")]) == 2,
            )
            # activity while Prometheus watches: reads, a rotation, an emergency revoke
            api = httpx.Client(base_url=serve, timeout=30)
            reads = {"Authorization": f"Bearer {reader}"}
            ops = {"Authorization": f"Bearer {admin}"}
            token = api.get("/v1/tokens/prod/alpha", headers=reads).json()["token"]
            assert api.get("/v1/tokens/prod/nobody", headers=reads).status_code == 404
            rotated = api.post("/v1/admin/rotate/prod/alpha", headers=ops, json={})
            assert rotated.status_code == 200, rotated.text
            # more Makini calls once Prometheus has seen the first: a latency needs a rate
            wait_until(
                "Prometheus to scrape serve's Makini calls",
                lambda: query(
                    prom, 'rotator_makini_request_duration_seconds_count{job="makini-rotator"}'
                ),
            )
            revoked = api.post(
                "/v1/admin/revoke/prod",
                headers=ops,
                json={"credentials": ["beta"], "reason": "dashboard test"},
            )
            assert revoked.status_code == 200, revoked.text

            deadline = time.monotonic() + 60
            for title, expr in queries():
                wait_until(
                    f"data for the panel {title!r}: {expr}",
                    lambda expr=expr: has_data(prom, expr),
                    timeout_s=max(1.0, deadline - time.monotonic()),
                    every_s=0.5,
                )

            # serve and the Pushgateway both report the journal's gauges
            jobs = {s["metric"]["job"] for s in query(prom, "rotator_token_expiry_warning_seconds")}
            assert jobs == {"makini-rotator", "rotator-run-due"}
            # as does a run over what is due: run-due's, and each of serve's scheduler ticks
            runs = query(prom, "rotator_run_due_last_success_timestamp_seconds")
            assert {s["metric"]["job"] for s in runs} == {"makini-rotator", "rotator-run-due"}
            rules = httpx.get(f"{prom}/api/v1/rules", timeout=10).json()["data"]["groups"]
            loaded = [r for g in rules for r in g["rules"]]
            assert len(loaded) == 8 and all(r["health"] == "ok" for r in loaded), loaded

            # the shipped rules load in a real Prometheus; none fires, and the one the test
            # provoked (a reader read alpha, then alpha was rotated) is on its way
            # (serve writes reads to the journal every api.readers.flush_interval, 5 s)
            def alerts() -> list[dict[str, Any]]:
                found: list[dict[str, Any]] = httpx.get(f"{prom}/api/v1/alerts", timeout=10).json()[
                    "data"
                ]["alerts"]
                return found

            wait_until("the readers' alert to be pending", alerts, timeout_s=30, every_s=0.5)
            assert [a for a in alerts() if a["state"] == "firing"] == []
            assert {
                (a["labels"]["alertname"], a["labels"].get("credential")) for a in alerts()
            } == {("RotatorReadersOnOldVersion", "alpha")}

            text, found = scrape(serve)
            assert token not in text and reader not in text and admin not in text
            route = "/v1/tokens/{env}/{name}"
            assert (
                value(
                    found,
                    "rotator_http_request_duration_seconds_count",
                    method="GET",
                    route=route,
                    status="200",
                )
                == 1
            )

"""The Grafana dashboard and its provisioning files: the JSON is what config/grafana/dashboard.py
builds, every panel queries the provisioned Prometheus, the panels ops asked for are there,
and the layout is sound. (tests/integration/test_promql.py evaluates the expressions.)"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

from config.grafana import dashboard

# PyYAML is in the test extra; imported by name, as no stubs are installed
yaml: Any = importlib.import_module("yaml")

GRAFANA = Path(dashboard.__file__).resolve().parent
PROVISIONING = GRAFANA / "provisioning"

#: The rows and panels issue 14 asks for, by title.
ASKED_FOR = {
    "Throughput by outcome",
    "Accepted vs rejected by error code",
    "Queue depth and pending reports",
    "Oldest queued age vs deadline",
    "Rate-limit usage per account",
    "API latency quantiles",
    "Dead letters held by reason",
    "Paused accounts",
    "Workers up",
}
#: Grafana's own variables a query may use; any other must be a template variable.
BUILT_IN = {"__rate_interval", "__interval", "__range"}


def loaded() -> dict[str, Any]:
    model: dict[str, Any] = json.loads(dashboard.JSON_PATH.read_text(encoding="utf-8"))
    return model


def provisioned(path: str) -> Any:
    return yaml.safe_load((PROVISIONING / path).read_text(encoding="utf-8"))


def panels() -> list[dict[str, Any]]:
    return [p for p in loaded()["panels"] if p["type"] != "row"]


def test_json_is_what_the_generator_builds() -> None:
    """The checked-in JSON is byte for byte what `python -m config.grafana.dashboard` writes
    (edit the generator, then run it)."""
    assert dashboard.render() == dashboard.JSON_PATH.read_text(encoding="utf-8")


def test_every_panel_has_a_title_the_provisioned_datasource_and_queries() -> None:
    """Every panel and every target names the provisioned Prometheus by uid, and every
    panel has a title, a description and at least one target with an expression."""
    (source,) = provisioned("datasources/prometheus.yml")["datasources"]
    expected = {"type": "prometheus", "uid": source["uid"]}
    assert "prometheus" == source["type"]
    for panel in panels():
        assert panel["title"], panel["id"]
        assert panel["description"], panel["title"]
        assert expected == panel["datasource"], panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert expected == target["datasource"], panel["title"]
            assert target["expr"].strip(), panel["title"]
    (variable,) = loaded()["templating"]["list"]
    assert expected == variable["datasource"]


def test_the_panels_ops_asked_for_are_present() -> None:
    """Throughput, outcomes by code, backlog and age against the deadline, rate-limit use,
    API latency quantiles, dead letters, pauses and workers each have their panel."""
    titles = [p["title"] for p in panels()]
    assert set() == ASKED_FOR - set(titles)
    assert len(titles) == len(set(titles)), "two panels share a title"
    quantiles = next(p for p in panels() if p["title"] == "API latency quantiles")
    assert ["p50", "p90", "p99"] == [t["legendFormat"] for t in quantiles["targets"]]
    assert all("histogram_quantile" in t["expr"] for t in quantiles["targets"])


def test_the_deadline_is_drawn_on_the_oldest_age_panel() -> None:
    """The oldest-queued-age panel draws threshold lines, red at the default report
    deadline (config/report-forwarder.toml), and says so in its description."""
    panel = next(p for p in panels() if p["title"] == "Oldest queued age vs deadline")
    defaults = panel["fieldConfig"]["defaults"]
    assert "line" == defaults["custom"]["thresholdsStyle"]["mode"]
    steps = {s["color"]: s["value"] for s in defaults["thresholds"]["steps"]}
    default_toml = (GRAFANA.parent / "report-forwarder.toml").read_text()
    deadline = re.search(r"^report_deadline_s = (\d+)", default_toml, re.M)
    assert deadline is not None
    assert float(deadline.group(1)) == steps["red"]
    assert f"{deadline.group(1)} s" in panel["description"]


def test_ids_are_unique_and_panels_do_not_overlap() -> None:
    """Ids are 1..n in order, and no two panels share a cell of the 24-column grid."""
    every = loaded()["panels"]
    assert list(range(1, len(every) + 1)) == [p["id"] for p in every]
    taken: dict[tuple[int, int], str] = {}
    for panel in every:
        grid = panel["gridPos"]
        assert 0 <= grid["x"], panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]


def test_every_variable_a_query_uses_is_defined() -> None:
    """A `$name` in a query is one of Grafana's own or a template variable of the dashboard."""
    defined = {v["name"] for v in loaded()["templating"]["list"]} | BUILT_IN
    used = {
        name
        for panel in panels()
        for target in panel["targets"]
        for name in re.findall(r"\$\{?(\w+)", target["expr"])
    }
    assert set() == used - defined


def test_fleet_gauges_are_not_summed_across_workers() -> None:
    """Every worker reports the same fleet gauges from Redis: a panel takes their max (or
    min), never their sum, which would multiply the backlog by the number of workers."""
    gauges = r"report_forwarder_(queue_depth|pending_reports|waiting_retry_reports|orphaned_" \
        r"reports|workers|oldest_queued_age_seconds|dead_letters|paused_accounts|ratelimit_" \
        r"usage_ratio)\b"  # fmt: skip
    for panel in panels():
        for target in panel["targets"]:
            assert not re.search(rf"\bsum\b[^(]*\(\s*{gauges}", target["expr"]), target["expr"]


def test_provisioning_points_at_the_dashboard_folder_and_prometheus() -> None:
    """The provider loads the folder the dashboard JSON is mounted at, and the datasource
    is the compose Prometheus."""
    (provider,) = provisioned("dashboards/report-forwarder.yml")["providers"]
    assert ("file", dashboard.DASHBOARDS_PATH) == (provider["type"], provider["options"]["path"])
    (source,) = provisioned("datasources/prometheus.yml")["datasources"]
    assert (dashboard.DATASOURCE_UID, "http://prometheus:9090") == (source["uid"], source["url"])
    assert dashboard.JSON_PATH.parent == GRAFANA / "dashboards"

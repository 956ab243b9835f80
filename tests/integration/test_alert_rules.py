"""The alert rules are checked by Prometheus's own tool: `promtool check rules` accepts
config/prometheus/alerts.yml, `promtool test rules` passes its unit tests
(config/prometheus/alerts_test.yml: series in, alerts out), every rule has a firing and a
not-firing case there, the compose Prometheus configuration loads the rules, and every PromQL
query of the runbook (docs/operations.md) parses. promtool ships with Debian's `prometheus`
package (.ci/run installs it where it can); without it those tests are skipped, saying so."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

yaml: Any = importlib.import_module("yaml")  # PyYAML (in the test extra)

ROOT = Path(__file__).resolve().parents[2]
RULES_DIR = ROOT / "config" / "prometheus"
ALERTS = RULES_DIR / "alerts.yml"
ALERTS_TEST = RULES_DIR / "alerts_test.yml"
PROMETHEUS_CONFIG = ROOT / "config" / "prometheus.yml"
RUNBOOK = ROOT / "docs" / "operations.md"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="no `promtool` binary (Debian package `prometheus`); .ci/run installs it where "
    "apt-get runs as root",
)


def promtool(*args: str, cwd: Path = RULES_DIR) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def alert_names() -> list[str]:
    return [r["alert"] for g in load(ALERTS)["groups"] for r in g["rules"] if "alert" in r]


@needs_promtool
def test_promtool_check_rules_accepts_every_rule() -> None:
    """`promtool check rules` accepts alerts.yml and finds every rule in it."""
    done = promtool("check", "rules", ALERTS.name)
    assert 0 == done.returncode, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in done.stdout


@needs_promtool
def test_promtool_unit_tests_of_the_rules_pass() -> None:
    """`promtool test rules alerts_test.yml` passes: each rule fires on its series, with
    its labels and rendered annotations, and stays quiet where it should."""
    done = promtool("test", "rules", ALERTS_TEST.name)
    assert 0 == done.returncode, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


@needs_promtool
def test_promtool_unit_tests_fail_when_a_rule_breaks(tmp_path: Path) -> None:
    """The unit tests can fail: with one threshold changed (150 s -> 600 s), promtool
    reports the alert that no longer fires."""
    broken = ALERTS.read_text(encoding="utf-8").replace(
        "max(report_forwarder_oldest_queued_age_seconds) > 150",
        "max(report_forwarder_oldest_queued_age_seconds) > 600",
    )
    assert broken != ALERTS.read_text(encoding="utf-8")
    (tmp_path / ALERTS.name).write_text(broken, encoding="utf-8")
    shutil.copy(ALERTS_TEST, tmp_path / ALERTS_TEST.name)
    done = promtool("test", "rules", ALERTS_TEST.name, cwd=tmp_path)
    assert 0 != done.returncode
    assert "alertname: ReportsNearDeadline" in done.stdout + done.stderr


def test_every_rule_has_a_firing_and_a_not_firing_case() -> None:
    """alerts_test.yml has, for every alert, a case expecting it and a case expecting
    none, and no case for an alert that does not exist."""
    firing: set[str] = set()
    quiet: set[str] = set()
    for test in load(ALERTS_TEST)["tests"]:
        for case in test.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = set(alert_names())
    assert set() == names - firing, "rules with no firing case"
    assert set() == names - quiet, "rules with no not-firing case"
    assert set() == (firing | quiet) - names, "cases for alerts that do not exist"


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """A compose service's bind mounts, target -> source (short and long syntax)."""
    out = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume.get("source", ""), volume["target"]
        out[target] = source
    return out


def test_the_compose_prometheus_mounts_the_rule_file_it_names() -> None:
    """config/prometheus.yml loads /etc/prometheus/alerts.yml, which docker-compose.yml
    mounts from config/prometheus/alerts.yml."""
    assert ["/etc/prometheus/alerts.yml"] == load(PROMETHEUS_CONFIG)["rule_files"]
    prometheus = load(ROOT / "docker-compose.yml")["services"]["prometheus"]
    source = _mounts(prometheus).get("/etc/prometheus/alerts.yml", "")
    assert ALERTS == (ROOT / source).resolve()


@needs_promtool
def test_promtool_check_config_loads_the_rules(tmp_path: Path) -> None:
    """`promtool check config` accepts config/prometheus.yml and finds every rule, with the
    rule file where it is on this machine instead of where compose mounts it."""
    config = load(PROMETHEUS_CONFIG)
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    config["rule_files"] = [str(tmp_path / "alerts.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    done = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert 0 == done.returncode, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in done.stdout


@needs_promtool
def test_every_promql_query_of_the_runbook_parses(tmp_path: Path) -> None:
    """Each query in a ```promql block of docs/operations.md parses: promtool checks them
    as recording rules."""
    blocks = re.findall(r"^```promql\n(.*?)^```", RUNBOOK.read_text(encoding="utf-8"), re.M | re.S)
    queries = [line.strip() for block in blocks for line in block.splitlines() if line.strip()]
    assert len(queries) >= len(alert_names())
    rules = [{"record": f"runbook:query_{n}", "expr": q} for n, q in enumerate(queries)]
    (tmp_path / "runbook.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "runbook", "rules": rules}]}), encoding="utf-8"
    )
    done = promtool("check", "rules", str(tmp_path / "runbook.yml"))
    assert 0 == done.returncode, done.stdout + done.stderr
    assert f"SUCCESS: {len(queries)} rules found" in done.stdout

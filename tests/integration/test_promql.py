"""Every PromQL expression of the Grafana dashboard and of the alert rules, evaluated by a
real Prometheus that scraped a real worker through a short run of accepted, retried,
rejected and account-fault reports: each parses and evaluates, the panels show data, the
core panels show the outcomes the run produced, and every metric named exists."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from worker.producer import Producer
from worker.settings import load_settings
from worker.testing.processes import RedisProcess, WorkerProcesses, free_port
from worker.testing.sandbox import Rule, Sandbox

from .conftest import CLIENT_KEY, FAST_RECOVERY, cli_env, wait_until

# PyYAML is in the test extra; imported by name, as no stubs are installed
yaml: Any = importlib.import_module("yaml")

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "config" / "grafana" / "dashboards" / "report-forwarder.json"
RULES_DIR = ROOT / "config" / "prometheus"
PROMETHEUS = shutil.which("prometheus")

pytestmark = [
    pytest.mark.skipif(
        PROMETHEUS is None,
        reason="no `prometheus` binary (Debian package `prometheus`); .ci/run installs it "
        "where apt-get runs as root",
    ),
    pytest.mark.timeout(120),
]

#: What Grafana would put in place of its variables (rate windows that hold several 1-s
#: scrapes; every account).
GRAFANA_VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "5m",
    "account": ".*",
}
#: Panels that may rightly show nothing after a short, healthy run, and why.
MAY_BE_EMPTY = {
    "Recovered reports by why": "counted only when the sweeper recovers a report",
}
#: Metrics an expression may name that this run does not export, and why.
NOT_EXPORTED_HERE = {
    "report_forwarder_recovered_total": "created by the first recovery; none in this run",
    "report_forwarder_intake_": "the intake's metrics; no intake runs here",
}

SPARE_KEY = "spare-key-7d41c0"
CONFIG = (
    FAST_RECOVERY
    + """
[accounts.default]
provider = "capmonster"
key_env = "CAPMONSTER_CLIENT_KEY"
rate_limit = "100000/second"
[accounts.spare]
provider = "capmonster"
key_env = "SPARE_KEY"
rate_limit = "100000/second"
"""
)
REPORTS = 60  # task ids 1..60 on the default account
REJECTED = tuple(range(10, REPORTS + 1, 10))  # ERROR_NO_SUCH_CAPCHA_ID
TRANSIENT = 7  # a 503 once, then accepted on its retry
SPARE_REPORTS = (1001, 1002, 1003)  # ERROR_ZERO_BALANCE: the account is paused


def substitute(expr: str) -> str:
    """``expr`` with Grafana's ``$var`` / ``${var}`` / ``${var:format}`` replaced."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in GRAFANA_VARIABLES:
            raise AssertionError(f"${name} in {expr!r}: add its value to GRAFANA_VARIABLES")
        return GRAFANA_VARIABLES[name]

    return re.sub(r"\$(?:\{(\w+)(?::\w+)?\}|([A-Za-z_]\w*))", value, expr)


@dataclass(frozen=True)
class Expression:
    where: str  # "panel title/refId" or "rule file/group/rule name"
    expr: str


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def dashboard_expressions() -> list[Expression]:
    return [
        Expression(f"{panel['title']}/{target['refId']}", target["expr"])
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
    ]


def rule_expressions() -> list[Expression]:
    """Every rule's expr in config/prometheus/ rule files (YAML with ``groups``); none
    while there is no such file."""
    out = []
    for path in sorted([*RULES_DIR.glob("*.yml"), *RULES_DIR.glob("*.yaml")]):
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(document, dict) or "groups" not in document:
            continue  # a Prometheus config or a promtool test file
        for group in document["groups"]:
            for rule in group["rules"]:
                name = rule.get("alert") or rule.get("record")
                out.append(Expression(f"{path.name}/{group['name']}/{name}", str(rule["expr"])))
    return out


def _params(expressions: list[Expression], none: str) -> list[Any]:
    if not expressions:
        return [pytest.param(None, marks=pytest.mark.skip(reason=none), id="none")]
    return [pytest.param(e, id=e.where) for e in expressions]


class PromQL:
    """The instant-query API of a Prometheus server."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}/api/v1"

    def query(self, expr: str) -> dict[str, Any]:
        """Prometheus's answer to an instant query of ``expr`` (its JSON envelope)."""
        answer: dict[str, Any] = requests.get(
            f"{self.base}/query", params={"query": expr}, timeout=10
        ).json()
        return answer

    def value(self, expr: str) -> float | None:
        """The value of a one-series query; None while there is none (or no server yet)."""
        try:
            result = self.query(expr).get("data", {}).get("result", [])
        except requests.RequestException:
            return None
        return float(result[0]["value"][1]) if result else None

    def metric_names(self) -> set[str]:
        answer = requests.get(f"{self.base}/label/__name__/values", timeout=10).json()
        return set(answer["data"])


@pytest.fixture(scope="module")
def prometheus(
    redis_server: RedisProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PromQL]:
    """A Prometheus server (1-s scrapes) that has scraped a worker through the whole run."""
    tmp = tmp_path_factory.mktemp("promql")
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    metrics_port, prom_port = free_port(), free_port()
    (tmp / "w.toml").write_text(CONFIG)
    (tmp / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: report-forwarder\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n"
    )
    assert PROMETHEUS is not None
    with Sandbox() as sandbox:
        for task_id in REJECTED:
            sandbox.add_rule(Rule(task_id=task_id, error_code="ERROR_NO_SUCH_CAPCHA_ID"))
        sandbox.add_rule(Rule(task_id=TRANSIENT, http_status=503, times=1))
        sandbox.add_rule(Rule(client_key=SPARE_KEY, error_code="ERROR_ZERO_BALANCE"))
        environ = cli_env(
            {},
            REDIS_URL=redis_server.url,
            REPORT_FORWARDER_API_URL=sandbox.url,
            CAPMONSTER_CLIENT_KEY=CLIENT_KEY,
            SPARE_KEY=SPARE_KEY,
            REPORT_FORWARDER_HOME=str(tmp / "home"),
            REPORT_FORWARDER_LOG_FORMAT="json",
            REPORT_FORWARDER_CONFIG=str(tmp / "w.toml"),
            REPORT_FORWARDER_WORKER_METRICS_PORT=str(metrics_port),
        )
        workers = WorkerProcesses(environ, tmp / "logs")
        workers.spawn()
        server = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        producer = Producer(load_settings(environ=environ))
        promql = PromQL(prom_port)
        try:
            # the worker is scraped before the run starts, so every counter is seen from 0
            wait_until(lambda: promql.value("report_forwarder_redis_up") == 1, 30, 0.2)
            producer.enqueue_many(
                [(n, "image" if n % 2 else "token") for n in range(1, REPORTS + 1)]
                + [(n, "image", "spare") for n in SPARE_REPORTS]
            )
            accepted = REPORTS - len(REJECTED)
            wait_until(
                lambda: (
                    promql.value('sum(report_forwarder_reports_total{outcome="accepted"})')
                    == accepted
                    and promql.value("max(report_forwarder_pending_reports)") == 0
                    and promql.value("max(report_forwarder_paused_accounts)") == 1
                    # every series has two samples in the window: rate() has a value
                    and promql.value(
                        "count(rate(report_forwarder_reports_total[1m])) "
                        "== count(report_forwarder_reports_total)"
                    )
                ),
                30,
                0.2,
            )
            yield promql
        finally:
            server.terminate()
            server.wait(20)
            workers.stop_all()
            producer.client.close()
            client.close()


@pytest.mark.parametrize("expression", _params(dashboard_expressions(), "no dashboard targets"))
def test_dashboard_expression_evaluates_and_shows_data(
    prometheus: PromQL, expression: Expression
) -> None:
    """Each dashboard query (Grafana's variables substituted) parses, evaluates, and returns
    at least one series after the run, unless its panel may rightly be empty."""
    answer = prometheus.query(substitute(expression.expr))
    assert "success" == answer["status"], answer
    panel = expression.where.rsplit("/", 1)[0]
    if panel not in MAY_BE_EMPTY:
        assert answer["data"]["result"], f"no series for {expression.expr}"


@pytest.mark.parametrize(
    "expression", _params(rule_expressions(), f"no rule file with groups in {RULES_DIR}")
)
def test_rule_expression_evaluates(prometheus: PromQL, expression: Expression) -> None:
    """Each alerting or recording rule's expression parses and evaluates (an alert that
    does not fire returns no series, which is fine)."""
    answer = prometheus.query(expression.expr)
    assert "success" == answer["status"], answer


def test_core_panels_show_the_runs_outcomes(prometheus: PromQL) -> None:
    """Throughput by outcome, accepted vs rejected by error code, and the backlog show
    what the run produced: accepted, rejected with the API's code, account faults, and
    an empty backlog once it is over."""
    targets = {e.where: substitute(e.expr) for e in dashboard_expressions()}

    def labels(where: str, label: str) -> set[str]:
        result = prometheus.query(targets[where])["data"]["result"]
        return {series["metric"].get(label, "") for series in result}

    outcomes = labels("Throughput by outcome/A", "outcome")
    assert {"accepted", "retrying", "rejected", "account_fault"} <= outcomes
    assert prometheus.value(targets["Accepted vs rejected by error code/A"]) is not None
    assert {"ERROR_NO_SUCH_CAPCHA_ID"} == labels(
        "Accepted vs rejected by error code/B", "error_code"
    )
    assert 0 == prometheus.value(targets["Queue depth and pending reports/B"])
    assert 0 == prometheus.value(targets["Backlog/A"])
    assert 1 == prometheus.value(targets["Paused accounts/A"])
    assert 1 == prometheus.value(targets["Workers up/A"])


def test_every_metric_named_is_exported(prometheus: PromQL) -> None:
    """Every report_forwarder_* name in the dashboard and the rules is one the worker
    exports (a misspelt name would parse and quietly show nothing)."""
    exported = prometheus.metric_names()
    texts = [e.expr for e in dashboard_expressions() + rule_expressions()]
    texts += [v["query"] for v in dashboard()["templating"]["list"]]
    named = set(re.findall(r"\breport_forwarder_\w+", " ".join(texts)))
    missing = {
        name
        for name in named - exported
        if not any(name.startswith(prefix) for prefix in NOT_EXPORTED_HERE)
    }
    assert set() == missing


def test_account_variable_lists_every_configured_account(prometheus: PromQL) -> None:
    """The dashboard's account variable (label_values of a metric) finds both accounts."""
    (variable,) = dashboard()["templating"]["list"]
    match = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["query"])
    assert match is not None, variable["query"]
    metric, label = match.groups()
    result = prometheus.query(metric)["data"]["result"]
    assert {"default", "spare"} == {series["metric"][label] for series in result}

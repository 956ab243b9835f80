"""The Grafana dashboard, as code: ``python -m config.grafana.dashboard`` (from the repository
root) rewrites ``config/grafana/dashboards/report-forwarder.json`` from the panels below.

Edit this file, not the JSON: ``tests/unit/test_dashboard.py`` checks that the JSON is what
this builds, and ``tests/integration/test_promql.py`` evaluates every expression against a
real Prometheus that scraped a real worker.

How to read the metrics (README, "Metrics"): counters and histograms are per worker process,
so they are summed; the fleet gauges (backlog, oldest age, dead letters, pauses, rate-limit
use, workers) are the same value read from Redis by every worker, so they take ``max``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The datasource that config/grafana/provisioning/datasources/prometheus.yml provisions.
DATASOURCE_UID = "report-forwarder-prometheus"
DATASOURCE = {"type": "prometheus", "uid": DATASOURCE_UID}
#: Where Grafana finds the dashboard (config/grafana/provisioning/dashboards/*.yml).
DASHBOARDS_PATH = "/var/lib/grafana/dashboards"
DASHBOARD_UID = "report-forwarder"
JSON_PATH = Path(__file__).resolve().parent / "dashboards" / "report-forwarder.json"

#: The default report deadline, [delivery] report_deadline_s in config/report-forwarder.toml.
#: It is a setting, not a metric, so the dashboard draws it as a fixed line.
DEADLINE_S = 300

R = "$__rate_interval"
_REPORTS = "report_forwarder_reports_total"
_DEAD = 'outcome!~"accepted|retrying"'  # a dead letter's outcome is its reason


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    """A stat or time-series panel; ``steps`` colour it (and draw lines on a time series)
    from each value up, above a green (or ``base``) start."""

    title: str
    description: str
    queries: tuple[Query, ...]
    type: str = "timeseries"
    unit: str = "short"
    width: int = 12
    height: int = 8
    steps: tuple[tuple[str, float], ...] = ()
    base: str = "green"
    mappings: tuple[tuple[int, str, str], ...] = ()  # value, text, colour
    bars: bool = False


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...] = field(default_factory=tuple)


def _quantiles(metric: str, by: str = "", legend: str = "") -> tuple[Query, ...]:
    labels = f"{by}, le" if by else "le"
    return tuple(
        Query(
            f"histogram_quantile({q}, sum by ({labels}) (rate({metric}_bucket[{R}])))",
            f"p{round(q * 100)}{legend}",
        )
        for q in (0.5, 0.9, 0.99)
    )


OVERVIEW = Row(
    "Overview",
    (
        Panel(
            "Throughput",
            "Reports finished per second by all workers: accepted or dead-lettered "
            "(retries are not finished).",
            (Query(f'sum(rate({_REPORTS}{{outcome!="retrying"}}[{R}])) or vector(0)'),),
            type="stat",
            unit="ops",
            width=4,
            height=4,
        ),
        Panel(
            "Backlog",
            "Reports enqueued and not yet at a terminal outcome (queued, in flight, waiting "
            "for a retry or a rate-limit slot).",
            (Query("max(report_forwarder_pending_reports)"),),
            type="stat",
            width=4,
            height=4,
        ),
        Panel(
            "Oldest queued",
            f"Age of the oldest queued message. Red at the default report deadline "
            f"({DEADLINE_S} s, [delivery] report_deadline_s; Anti-Captcha accounts: 60 s), "
            f"orange at half of it: reports older than their deadline are dead-lettered as "
            f"expired.",
            (Query("max(report_forwarder_oldest_queued_age_seconds)"),),
            type="stat",
            unit="s",
            width=4,
            height=4,
            steps=(("orange", DEADLINE_S / 2), ("red", DEADLINE_S)),
        ),
        Panel(
            "Live workers",
            "Worker processes with a live heartbeat in Redis (0 when no process is scraped).",
            (Query("max(report_forwarder_workers) or vector(0)"),),
            type="stat",
            width=4,
            height=4,
            base="red",
            steps=(("green", 1),),
        ),
        Panel(
            "Accounts paused",
            "Accounts paused after a key, balance or IP fault; their reports are "
            "dead-lettered as account_paused until the pause ends or `accounts resume`.",
            (Query("max(report_forwarder_paused_accounts) or vector(0)"),),
            type="stat",
            width=4,
            height=4,
            steps=(("red", 1),),
        ),
        Panel(
            "Redis",
            "Whether Redis answered every worker's last scrape (the worst of them).",
            (Query("min(report_forwarder_redis_up)"),),
            type="stat",
            width=4,
            height=4,
            base="red",
            steps=(("green", 1),),
            mappings=((0, "DOWN", "red"), (1, "up", "green")),
        ),
    ),
)

THROUGHPUT = Row(
    "Throughput",
    (
        Panel(
            "Throughput by outcome",
            "Reports per second by outcome: accepted, retrying, or the dead-letter reason.",
            (Query(f"sum by (outcome) (rate({_REPORTS}[{R}]))", "{{outcome}}"),),
            unit="ops",
        ),
        Panel(
            "Accepted vs rejected by error code",
            "Reports the API accepted, against those it rejected for good (dead letter "
            "`rejected`), by the API's error code.",
            (
                Query(f'sum(rate({_REPORTS}{{outcome="accepted"}}[{R}]))', "accepted"),
                Query(
                    f'sum by (error_code) (rate({_REPORTS}{{outcome="rejected"}}[{R}]))',
                    "rejected {{error_code}}",
                ),
            ),
            unit="ops",
        ),
        Panel(
            "API error codes by outcome",
            "Every answer that was not a success, by error code (HTTP_<status> when the "
            "body had none) and what followed: a retry, or a dead letter.",
            (
                Query(
                    f'sum by (error_code, outcome) (rate({_REPORTS}{{error_code!=""}}[{R}]))',
                    "{{error_code}} → {{outcome}}",
                ),
            ),
            unit="ops",
        ),
        Panel(
            "Accepted by kind",
            "Accepted reports per second by endpoint kind (image, token).",
            (Query(f'sum by (kind) (rate({_REPORTS}{{outcome="accepted"}}[{R}]))', "{{kind}}"),),
            unit="ops",
        ),
    ),
)

BACKLOG = Row(
    "Backlog",
    (
        Panel(
            "Queue depth and pending reports",
            "Messages in the queue, reports pending (queued to terminal outcome), reports "
            "waiting for a retry or their rate-limit slot, and orphaned reports (no message, "
            "no live worker: the sweeper hands them on; above 0 for long, see the runbook).",
            (
                Query("max(report_forwarder_queue_depth)", "queued messages"),
                Query("max(report_forwarder_pending_reports)", "pending reports"),
                Query("max(report_forwarder_waiting_retry_reports)", "waiting (retry, rate limit)"),
                Query("max(report_forwarder_orphaned_reports)", "orphaned"),
            ),
        ),
        Panel(
            "Oldest queued age vs deadline",
            f"Age of the oldest queued message. The red line is the default report deadline "
            f"({DEADLINE_S} s, [delivery] report_deadline_s; an account's deadline_s or its "
            f"provider's, e.g. Anti-Captcha's 60 s, may be shorter), the orange one half of "
            f"it. The deadline is a setting, not a metric: the lines are drawn at the default.",
            (Query("max(report_forwarder_oldest_queued_age_seconds)", "oldest queued"),),
            unit="s",
            steps=(("orange", DEADLINE_S / 2), ("red", DEADLINE_S)),
        ),
        Panel(
            "Queue wait quantiles",
            "Time from enqueue until a worker took the report.",
            _quantiles("report_forwarder_queue_seconds"),
            unit="s",
        ),
        Panel(
            "Recovered reports by why",
            "Reports the sweeper put back in flight, per interval: worker lost mid-flight, "
            "worker lost, message orphaned, lease expired. Steady recoveries mean workers "
            "are dying.",
            (Query(f"sum by (why) (increase(report_forwarder_recovered_total[{R}]))", "{{why}}"),),
            bars=True,
        ),
    ),
)

RATE_LIMIT = Row(
    "Rate limit",
    (
        Panel(
            "Rate-limit usage per account",
            "Share of each account's fleet-wide rate limit used in the last window. Near 1 "
            "for minutes: the limit, not the workers, bounds throughput.",
            (
                Query(
                    "max by (account) "
                    '(report_forwarder_ratelimit_usage_ratio{account=~"$account"})',
                    "{{account}}",
                ),
            ),
            unit="percentunit",
            steps=(("orange", 0.9), ("red", 1)),
        ),
        Panel(
            "Rate-limit wait per account",
            "Time reports waited for their account's rate-limit slot (p50 and p99).",
            tuple(
                Query(
                    f"histogram_quantile({q}, sum by (account, le) (rate("
                    f'report_forwarder_ratelimit_wait_seconds_bucket{{account=~"$account"}}'
                    f"[{R}])))",
                    f"p{round(q * 100)} {{{{account}}}}",
                )
                for q in (0.5, 0.99)
            ),
            unit="s",
        ),
    ),
)

API = Row(
    "Upstream API",
    (
        Panel(
            "API latency quantiles",
            "Duration of each POST to the captcha API, all kinds.",
            _quantiles("report_forwarder_request_seconds"),
            unit="s",
        ),
        Panel(
            "API latency p99 by kind",
            "p99 of each POST's duration by endpoint kind.",
            (
                Query(
                    "histogram_quantile(0.99, sum by (kind, le) "
                    f"(rate(report_forwarder_request_seconds_bucket[{R}])))",
                    "{{kind}}",
                ),
            ),
            unit="s",
        ),
        Panel(
            "API requests by kind",
            "POSTs to the captcha API per second (retries included).",
            (
                Query(
                    f"sum by (kind) (rate(report_forwarder_request_seconds_count[{R}]))",
                    "{{kind}}",
                ),
            ),
            unit="reqps",
        ),
        Panel(
            "Transient error ratio",
            "Share of API requests answered with a transient error (5xx, 429, timeout, "
            "busy codes) and retried.",
            (
                Query(
                    f'sum(rate({_REPORTS}{{outcome="retrying"}}[{R}])) '
                    f"/ sum(rate(report_forwarder_request_seconds_count[{R}]))",
                    "transient",
                ),
            ),
            unit="percentunit",
        ),
    ),
)

DEAD_LETTERS = Row(
    "Dead letters and accounts",
    (
        Panel(
            "Dead letters held by reason",
            "Entries in the dead-letter stream by reason (`dead-letters list --reason R`, "
            "`dead-letters replay`).",
            (Query("max by (reason) (report_forwarder_dead_letters)", "{{reason}}"),),
            width=8,
        ),
        Panel(
            "Dead-lettered per second by reason",
            "Reports dead-lettered per second, by reason.",
            (Query(f"sum by (outcome) (rate({_REPORTS}{{{_DEAD}}}[{R}]))", "{{outcome}}"),),
            unit="ops",
            width=8,
        ),
        Panel(
            "Paused accounts",
            "Accounts paused after a key, balance or IP fault (`accounts resume` ends a pause).",
            (Query("max(report_forwarder_paused_accounts)", "paused accounts"),),
            width=8,
            steps=(("red", 1),),
        ),
    ),
)

WORKERS = Row(
    "Workers and Redis",
    (
        Panel(
            "Workers up",
            "Worker processes with a live heartbeat in Redis, and worker processes "
            "Prometheus scrapes (every target exporting the fleet gauges, less the intake).",
            (
                Query("max(report_forwarder_workers)", "heartbeats"),
                Query(
                    "count(report_forwarder_redis_up unless on (instance) "
                    "report_forwarder_intake_connections)",
                    "scraped",
                ),
            ),
        ),
        Panel(
            "Redis reachable",
            "Whether Redis answered each scraped process (1) or not (0).",
            (Query("max by (instance) (report_forwarder_redis_up)", "{{instance}}"),),
        ),
    ),
)

ROWS = (OVERVIEW, THROUGHPUT, BACKLOG, RATE_LIMIT, API, DEAD_LETTERS, WORKERS)


def _thresholds(panel: Panel) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [{"color": panel.base, "value": None}]
    steps += [{"color": color, "value": value} for color, value in panel.steps]
    return {"mode": "absolute", "steps": steps}


def _field_config(panel: Panel) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "color": {"mode": "thresholds" if panel.type == "stat" else "palette-classic"},
        "mappings": [
            {
                "options": {
                    str(value): {"color": color, "index": index, "text": text}
                    for index, (value, text, color) in enumerate(panel.mappings)
                },
                "type": "value",
            }
        ]
        if panel.mappings
        else [],
        "thresholds": _thresholds(panel),
        "unit": panel.unit,
    }
    if panel.type == "timeseries":
        defaults["min"] = 0
        defaults["custom"] = {
            "drawStyle": "bars" if panel.bars else "line",
            "fillOpacity": 50 if panel.bars else 10,
            "lineWidth": 1,
            "showPoints": "never",
            "spanNulls": False,
            "thresholdsStyle": {"mode": "line" if panel.steps else "off"},
        }
    return {"defaults": defaults, "overrides": []}


def _options(panel: Panel) -> dict[str, Any]:
    if panel.type == "stat":
        return {
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "textMode": "auto",
        }
    return {
        "legend": {"calcs": [], "displayMode": "list", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }


def _panel(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    return {
        "datasource": DATASOURCE,
        "description": panel.description,
        "fieldConfig": _field_config(panel),
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "id": panel_id,
        "options": _options(panel),
        "targets": [
            {
                "datasource": DATASOURCE,
                "editorMode": "code",
                "expr": query.expr,
                "legendFormat": query.legend or "__auto",
                "range": True,
                "refId": chr(ord("A") + n),
            }
            for n, query in enumerate(panel.queries)
        ],
        "title": panel.title,
        "type": panel.type,
    }


def _panels() -> list[dict[str, Any]]:
    """Rows and their panels, ids in order, laid out left to right on a 24-column grid."""
    out: list[dict[str, Any]] = []
    y = 0
    for row in ROWS:
        out.append(
            {
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "id": len(out) + 1,
                "panels": [],
                "title": row.title,
                "type": "row",
            }
        )
        y += 1
        x = line_height = 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y, line_height = 0, y + line_height, 0
            out.append(_panel(panel, len(out) + 1, x, y))
            x += panel.width
            line_height = max(line_height, panel.height)
        y += line_height
    return out


def build() -> dict[str, Any]:
    """The dashboard's JSON model (Grafana schema version 39)."""
    account = "label_values(report_forwarder_ratelimit_usage_ratio, account)"
    return {
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "description": "report-forwarder: throughput, backlog against the deadline, the API's "
        "answers, rate limits, dead letters, paused accounts, workers. Generated by "
        "config/grafana/dashboard.py.",
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "links": [],
        "panels": _panels(),
        "refresh": "10s",
        "schemaVersion": 39,
        "tags": ["report-forwarder"],
        "templating": {
            "list": [
                {
                    "allValue": ".*",
                    "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                    "datasource": DATASOURCE,
                    "definition": account,
                    "hide": 0,
                    "includeAll": True,
                    "label": "Account",
                    "multi": True,
                    "name": "account",
                    "options": [],
                    "query": {
                        "qryType": 1,
                        "query": account,
                        "refId": "PrometheusVariableQueryEditor-VariableQuery",
                    },
                    "refresh": 2,
                    "regex": "",
                    "skipUrlSync": False,
                    "sort": 1,
                    "type": "query",
                }
            ]
        },
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": "report-forwarder",
        "uid": DASHBOARD_UID,
        "version": 1,
        "weekStart": "",
    }


def render() -> str:
    """The JSON file's text: sorted keys, two-space indent, a final newline."""
    return json.dumps(build(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main() -> None:
    JSON_PATH.write_text(render(), encoding="utf-8")
    print(f"wrote {JSON_PATH}")


if __name__ == "__main__":
    main()

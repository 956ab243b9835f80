"""The Grafana dashboard, as code: ``python -m config.grafana.dashboard`` (from the repository
root) rewrites ``config/grafana/dashboards/report-forwarder.json`` from the panels below.

The panels are built with Grafana's typed builders, ``grafana-foundation-sdk`` (in the
``test`` extra; the 11.1 flavour, the Grafana of docker-compose.yml), which also lays them out
on the grid: each row's panels left to right, a new line when 24 columns are full.

Edit this file, not the JSON: ``tests/unit/test_dashboard.py`` checks that the JSON is what
this builds, and ``tests/integration/test_promql.py`` evaluates every expression against a
real Prometheus that scraped a real worker.

How to read the metrics (README, "Metrics"): counters and histograms are per worker process,
so they are summed; the fleet gauges (backlog, oldest age, dead letters, pauses, rate-limit
use, workers) are the same value read from Redis by every worker, so they take ``max``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    Dashboard,
    DashboardCursorSync,
    DataSourceRef,
    FieldColorModeId,
    Threshold,
    ThresholdsMode,
    ValueMap,
    ValueMappingResult,
    VariableHide,
    VariableOption,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import QueryEditorMode

#: The datasource that config/grafana/provisioning/datasources/prometheus.yml provisions.
DATASOURCE_UID = "report-forwarder-prometheus"
DATASOURCE = DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)
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
_ACCOUNTS = "label_values(report_forwarder_ratelimit_usage_ratio, account)"

Steps = tuple[tuple[str, float], ...]  # (colour, from this value up), above the base colour
P = TypeVar("P", stat.Panel, timeseries.Panel)


def query(expr: str, legend: str = "__auto") -> prometheus.Dataquery:
    """A range query in the code editor, on the provisioned Prometheus."""
    return (
        prometheus.Dataquery()
        .expr(expr)
        .legend_format(legend)
        .range()
        .editor_mode(QueryEditorMode.CODE)
        .datasource(DATASOURCE)
    )


def quantiles(metric: str) -> tuple[prometheus.Dataquery, ...]:
    """p50, p90 and p99 of a histogram, over every worker."""
    return tuple(
        query(
            f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket[{R}])))",
            f"p{round(q * 100)}",
        )
        for q in (0.5, 0.9, 0.99)
    )


def _thresholds(steps: Steps, base: str) -> dashboard.ThresholdsConfig:
    return (
        dashboard.ThresholdsConfig()
        .mode(ThresholdsMode.ABSOLUTE)
        .steps([Threshold(None, base), *(Threshold(value, color) for color, value in steps)])
    )


def _common(
    panel: P,
    title: str,
    description: str,
    queries: tuple[prometheus.Dataquery, ...],
    *,
    unit: str,
    width: int,
    height: int,
    steps: Steps,
    base: str,
) -> P:
    for n, target in enumerate(queries):
        panel.with_target(target.ref_id(chr(ord("A") + n)))
    return (
        panel.title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(width)
        .height(height)
        .thresholds(_thresholds(steps, base))
        .mappings([])
        .overrides([])
    )


def single(
    title: str,
    description: str,
    target: prometheus.Dataquery,
    *,
    unit: str = "short",
    steps: Steps = (),
    base: str = "green",
    mappings: tuple[tuple[int, str, str], ...] = (),  # value, text, colour
) -> stat.Panel:
    """A 4x4 stat panel of the last value, coloured by ``steps``."""
    panel = _common(
        stat.Panel(),
        title,
        description,
        (target,),
        unit=unit,
        width=4,
        height=4,
        steps=steps,
        base=base,
    )
    if mappings:
        results = {
            str(value): ValueMappingResult(text=text, color=color, index=index)
            for index, (value, text, color) in enumerate(mappings)
        }
        panel.mappings([ValueMap(options=results)])
    return (
        panel.color_scheme(dashboard.FieldColor().mode(FieldColorModeId.THRESHOLDS))
        .color_mode(common.BigValueColorMode.VALUE)
        .graph_mode(common.BigValueGraphMode.AREA)
        .justify_mode(common.BigValueJustifyMode.AUTO)
        .orientation(common.VizOrientation.AUTO)
        .text_mode(common.BigValueTextMode.AUTO)
        .reduce_options(
            common_builders.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False)
        )
    )


def series(
    title: str,
    description: str,
    *queries: prometheus.Dataquery,
    unit: str = "short",
    width: int = 12,
    steps: Steps = (),
    bars: bool = False,
) -> timeseries.Panel:
    """A time series from 0 up; ``steps`` are drawn as lines."""
    return (
        _common(
            timeseries.Panel(),
            title,
            description,
            queries,
            unit=unit,
            width=width,
            height=8,
            steps=steps,
            base="green",
        )
        .color_scheme(dashboard.FieldColor().mode(FieldColorModeId.PALETTE_CLASSIC))
        .min(0)
        .draw_style(common.GraphDrawStyle.BARS if bars else common.GraphDrawStyle.LINE)
        .fill_opacity(50 if bars else 10)
        .line_width(1)
        .show_points(common.VisibilityMode.NEVER)
        .span_nulls(False)
        .thresholds_style(
            common_builders.GraphThresholdsStyleConfig().mode(
                common.GraphThresholdsStyleMode.LINE
                if steps
                else common.GraphThresholdsStyleMode.OFF
            )
        )
        .legend(
            common_builders.VizLegendOptions()
            .calcs([])
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
        .tooltip(
            common_builders.VizTooltipOptions()
            .mode(common.TooltipDisplayMode.MULTI)
            .sort(common.SortOrder.DESCENDING)
        )
    )


def rows() -> tuple[tuple[str, tuple[stat.Panel | timeseries.Panel, ...]], ...]:
    """The rows, top to bottom, each with its panels left to right (new builders each call:
    the dashboard builder places the panels it is given)."""
    return (
        (
            "Overview",
            (
                single(
                    "Throughput",
                    "Reports finished per second by all workers: accepted or dead-lettered "
                    "(retries are not finished).",
                    query(f'sum(rate({_REPORTS}{{outcome!="retrying"}}[{R}])) or vector(0)'),
                    unit="ops",
                ),
                single(
                    "Backlog",
                    "Reports enqueued and not yet at a terminal outcome (queued, in flight, "
                    "waiting for a retry or a rate-limit slot).",
                    query("max(report_forwarder_pending_reports)"),
                ),
                single(
                    "Oldest queued",
                    f"Age of the oldest queued message. Red at the default report deadline "
                    f"({DEADLINE_S} s, [delivery] report_deadline_s; Anti-Captcha accounts: "
                    f"60 s), orange at half of it: reports older than their deadline are "
                    f"dead-lettered as expired.",
                    query("max(report_forwarder_oldest_queued_age_seconds)"),
                    unit="s",
                    steps=(("orange", DEADLINE_S / 2), ("red", DEADLINE_S)),
                ),
                single(
                    "Live workers",
                    "Worker processes with a live heartbeat in Redis (0 when no process is "
                    "scraped).",
                    query("max(report_forwarder_workers) or vector(0)"),
                    base="red",
                    steps=(("green", 1),),
                ),
                single(
                    "Accounts paused",
                    "Accounts paused after a key, balance or IP fault; their reports are "
                    "dead-lettered as account_paused until the pause ends or `accounts resume`.",
                    query("max(report_forwarder_paused_accounts) or vector(0)"),
                    steps=(("red", 1),),
                ),
                single(
                    "Redis",
                    "Whether Redis answered every worker's last scrape (the worst of them).",
                    query("min(report_forwarder_redis_up)"),
                    base="red",
                    steps=(("green", 1),),
                    mappings=((0, "DOWN", "red"), (1, "up", "green")),
                ),
            ),
        ),
        (
            "Throughput",
            (
                series(
                    "Throughput by outcome",
                    "Reports per second by outcome: accepted, retrying, or the dead-letter reason.",
                    query(f"sum by (outcome) (rate({_REPORTS}[{R}]))", "{{outcome}}"),
                    unit="ops",
                ),
                series(
                    "Accepted vs rejected by error code",
                    "Reports the API accepted, against those it rejected for good (dead letter "
                    "`rejected`), by the API's error code.",
                    query(f'sum(rate({_REPORTS}{{outcome="accepted"}}[{R}]))', "accepted"),
                    query(
                        f'sum by (error_code) (rate({_REPORTS}{{outcome="rejected"}}[{R}]))',
                        "rejected {{error_code}}",
                    ),
                    unit="ops",
                ),
                series(
                    "API error codes by outcome",
                    "Every answer that was not a success, by error code (HTTP_<status> when "
                    "the body had none) and what followed: a retry, or a dead letter.",
                    query(
                        f'sum by (error_code, outcome) (rate({_REPORTS}{{error_code!=""}}[{R}]))',
                        "{{error_code}} → {{outcome}}",
                    ),
                    unit="ops",
                ),
                series(
                    "Accepted by kind",
                    "Accepted reports per second by endpoint kind (image, token).",
                    query(
                        f'sum by (kind) (rate({_REPORTS}{{outcome="accepted"}}[{R}]))', "{{kind}}"
                    ),
                    unit="ops",
                ),
            ),
        ),
        (
            "Backlog",
            (
                series(
                    "Queue depth and pending reports",
                    "Messages in the queue, reports pending (queued to terminal outcome), "
                    "reports waiting for a retry or their rate-limit slot, and orphaned reports "
                    "(no message, no live worker: the sweeper hands them on; above 0 for long, "
                    "see the runbook).",
                    query("max(report_forwarder_queue_depth)", "queued messages"),
                    query("max(report_forwarder_pending_reports)", "pending reports"),
                    query(
                        "max(report_forwarder_waiting_retry_reports)",
                        "waiting (retry, rate limit)",
                    ),
                    query("max(report_forwarder_orphaned_reports)", "orphaned"),
                ),
                series(
                    "Oldest queued age vs deadline",
                    f"Age of the oldest queued message. The red line is the default report "
                    f"deadline ({DEADLINE_S} s, [delivery] report_deadline_s; an account's "
                    f"deadline_s or its provider's, e.g. Anti-Captcha's 60 s, may be shorter), "
                    f"the orange one half of it. The deadline is a setting, not a metric: the "
                    f"lines are drawn at the default.",
                    query("max(report_forwarder_oldest_queued_age_seconds)", "oldest queued"),
                    unit="s",
                    steps=(("orange", DEADLINE_S / 2), ("red", DEADLINE_S)),
                ),
                series(
                    "Queue wait quantiles",
                    "Time from enqueue until a worker took the report.",
                    *quantiles("report_forwarder_queue_seconds"),
                    unit="s",
                ),
                series(
                    "Recovered reports by why",
                    "Reports the sweeper put back in flight, per interval: worker lost "
                    "mid-flight, worker lost, message orphaned, lease expired. Steady "
                    "recoveries mean workers are dying.",
                    query(
                        f"sum by (why) (increase(report_forwarder_recovered_total[{R}]))",
                        "{{why}}",
                    ),
                    bars=True,
                ),
            ),
        ),
        (
            "Rate limit",
            (
                series(
                    "Rate-limit usage per account",
                    "Share of each account's fleet-wide rate limit used in the last window. "
                    "Near 1 for minutes: the limit, not the workers, bounds throughput.",
                    query(
                        "max by (account) "
                        '(report_forwarder_ratelimit_usage_ratio{account=~"$account"})',
                        "{{account}}",
                    ),
                    unit="percentunit",
                    steps=(("orange", 0.9), ("red", 1)),
                ),
                series(
                    "Rate-limit wait per account",
                    "Time reports waited for their account's rate-limit slot (p50 and p99).",
                    *(
                        query(
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
        ),
        (
            "Upstream API",
            (
                series(
                    "API latency quantiles",
                    "Duration of each POST to the captcha API, all kinds.",
                    *quantiles("report_forwarder_request_seconds"),
                    unit="s",
                ),
                series(
                    "API latency p99 by kind",
                    "p99 of each POST's duration by endpoint kind.",
                    query(
                        "histogram_quantile(0.99, sum by (kind, le) "
                        f"(rate(report_forwarder_request_seconds_bucket[{R}])))",
                        "{{kind}}",
                    ),
                    unit="s",
                ),
                series(
                    "API requests by kind",
                    "POSTs to the captcha API per second (retries included).",
                    query(
                        f"sum by (kind) (rate(report_forwarder_request_seconds_count[{R}]))",
                        "{{kind}}",
                    ),
                    unit="reqps",
                ),
                series(
                    "Transient error ratio",
                    "Share of API requests answered with a transient error (5xx, 429, timeout, "
                    "busy codes) and retried.",
                    query(
                        f'sum(rate({_REPORTS}{{outcome="retrying"}}[{R}])) '
                        f"/ sum(rate(report_forwarder_request_seconds_count[{R}]))",
                        "transient",
                    ),
                    unit="percentunit",
                ),
            ),
        ),
        (
            "Dead letters and accounts",
            (
                series(
                    "Dead letters held by reason",
                    "Entries in the dead-letter stream by reason (`dead-letters list --reason "
                    "R`, `dead-letters replay`).",
                    query("max by (reason) (report_forwarder_dead_letters)", "{{reason}}"),
                    width=8,
                ),
                series(
                    "Dead-lettered per second by reason",
                    "Reports dead-lettered per second, by reason.",
                    query(f"sum by (outcome) (rate({_REPORTS}{{{_DEAD}}}[{R}]))", "{{outcome}}"),
                    unit="ops",
                    width=8,
                ),
                series(
                    "Paused accounts",
                    "Accounts paused after a key, balance or IP fault (`accounts resume` ends "
                    "a pause).",
                    query("max(report_forwarder_paused_accounts)", "paused accounts"),
                    width=8,
                    steps=(("red", 1),),
                ),
            ),
        ),
        (
            "Workers and Redis",
            (
                series(
                    "Workers up",
                    "Worker processes with a live heartbeat in Redis, and worker processes "
                    "Prometheus scrapes (every target exporting the fleet gauges, less the "
                    "intake).",
                    query("max(report_forwarder_workers)", "heartbeats"),
                    query(
                        "count(report_forwarder_redis_up unless on (instance) "
                        "report_forwarder_intake_connections)",
                        "scraped",
                    ),
                ),
                series(
                    "Redis reachable",
                    "Whether Redis answered each scraped process (1) or not (0).",
                    query("max by (instance) (report_forwarder_redis_up)", "{{instance}}"),
                ),
            ),
        ),
    )


def build() -> Dashboard:
    """The dashboard (Grafana schema version 39): the rows, panel ids 1..n in order, the
    account variable and Grafana's built-in annotations."""
    board = (
        dashboard.Dashboard("report-forwarder")
        .uid(DASHBOARD_UID)
        .description(
            "report-forwarder: throughput, backlog against the deadline, the API's answers, "
            "rate limits, dead letters, paused accounts, workers. Generated by "
            "config/grafana/dashboard.py."
        )
        .tags(["report-forwarder"])
        .editable()
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .refresh("10s")
        .time("now-1h", "now")
        .timezone("")
        .week_start("")
        .version(1)
        .links([])
        .annotation(
            dashboard.AnnotationQuery()
            .name("Annotations & Alerts")
            .datasource(DataSourceRef(type_val="grafana", uid="-- Grafana --"))
            .built_in(1)
            .enable(True)
            .hide(True)
            .icon_color("rgba(0, 211, 255, 1)")
            .type("dashboard")
        )
        .with_variable(
            dashboard.QueryVariable("account")
            .label("Account")
            .datasource(DATASOURCE)
            .query(_ACCOUNTS)
            .current(VariableOption(selected=True, text=["All"], value=["$__all"]))
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .hide(VariableHide.DONT_HIDE)
            .regex("")
            .options([])
        )
    )
    panel_id = 0
    for title, panels in rows():
        panel_id += 1
        board.with_row(dashboard.Row(title).id(panel_id))
        for panel in panels:
            panel_id += 1
            board.with_panel(panel.id(panel_id))
    return board.build()


def render() -> str:
    """The JSON file's text: sorted keys, two-space indent, a final newline."""
    return json.dumps(build(), cls=JSONEncoder, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main() -> None:
    JSON_PATH.write_text(render(), encoding="utf-8")
    print(f"wrote {JSON_PATH}")


if __name__ == "__main__":
    main()

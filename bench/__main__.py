"""``python -m bench SCENARIO [--option value ...]``; prints a table and writes JSON.

Scenarios: ratelimit (real workers against a limit), ratelimit-compare (our limiter vs the
``limits`` library, no Celery), intake (the HTTP intake vs its constant-answer ceiling),
intake-servers (candidate ASGI servers), http (candidate HTTP clients for the worker's
POST), perf (every throughput, latency and memory figure), replication. Results go to
bench/results/<scenario>-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import http, intake, perf, ratelimit, replication

RESULTS = Path(__file__).resolve().parent / "results"


def _save(name: str, doc: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(doc, indent=2))
    return path


def _table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows
    )


def run_ratelimit(args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    for processes in args.processes:
        doc = ratelimit.pipeline(
            processes, args.threads, args.limit, args.seconds, args.other_limit
        )
        runs.append(doc)
    rows = [
        (
            "workers",
            "account",
            "limit/s",
            "requests",
            "max in 1 s",
            "achieved",
            "wait p50 ms",
            "wait p99 ms",
        )
    ]
    for doc in runs:
        for account, a in doc["accounts"].items():
            rows.append(
                (
                    f"{doc['processes']}x{doc['threads']}",
                    account,
                    str(a["limit_per_s"]),
                    str(a["requests"]),
                    str(a["max_in_any_1s_window"]),
                    f"{a['achieved_fraction']:.1%}",
                    str(a["limiter_wait_p50_ms"]),
                    str(a["limiter_wait_p99_ms"]),
                )
            )
    print(_table(rows))
    return {"scenario": "ratelimit", "runs": runs}


def run_compare(args: argparse.Namespace) -> dict[str, Any]:
    doc = ratelimit.compare(args.processes[0], args.threads, args.limit, args.seconds)
    rows = [("limiter", "requests", "max in 1 s", "limit", "achieved")]
    for name, r in doc["limiters"].items():
        rows.append(
            (
                name,
                str(r["requests"]),
                str(r["max_in_any_1s_window"]),
                str(args.limit),
                f"{r['achieved_fraction']:.1%}",
            )
        )
    print(_table(rows))
    return doc


def run_intake(args: argparse.Namespace) -> dict[str, Any]:
    doc = intake.intake(int(args.seconds), args.connections)
    rows = [("server", "requests/s", "p50 ms", "p90 ms", "p99 ms", "non-2xx")]
    for name in ("ceiling", "intake"):
        r = doc[name]
        rows.append(
            (
                name,
                f"{r['requests_per_s']:,.0f}",
                str(r.get("p50_ms")),
                str(r.get("p90_ms")),
                str(r.get("p99_ms")),
                str(r["non_2xx"]),
            )
        )
    print(_table(rows))
    print(
        f"intake / ceiling: {doc['ratio']:.1%} (target >= 70%); "
        f"reports queued: {doc['intake']['reports_queued']:,}"
    )
    return doc


def run_servers(args: argparse.Namespace) -> dict[str, Any]:
    doc = intake.servers(int(args.seconds), args.connections)
    rows = [("server", "requests/s", "p99 ms")]
    for name in ("uvicorn", "granian", "hypercorn"):
        rows.append((name, f"{doc[name]['requests_per_s']:,.0f}", str(doc[name].get("p99_ms"))))
    print(_table(rows))
    return doc


def run_http(args: argparse.Namespace) -> dict[str, Any]:
    doc = http.compare(args.requests, args.threads, args.rounds)
    rows = [("client", "CPU-ms/POST", "POSTs/s", "CPU vs requests", "rate vs requests")]
    for name in http.CANDIDATES:
        r = doc[name]
        rows.append(
            (
                name,
                f"{r['cpu_ms_per_post']:.3f}",
                f"{r['posts_per_s']:,}",
                f"{r['cpu_vs_requests']:.2f}",
                f"{r['rate_vs_requests']:.2f}",
            )
        )
    print(_table(rows))
    support = [("client", "self-signed cert", "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "as CIDR")]
    for name, r in doc["support"].items():
        # a client that uses no proxy has no NO_PROXY to honour
        proxies = r["https_proxy_used"] or r["http_proxy_used"]
        no_proxy = [
            ("honoured" if r[key] else "NOT honoured") if proxies else "-"
            for key in ("no_proxy_honoured", "no_proxy_cidr_honoured")
        ]
        support.append(
            (
                name,
                r["self_signed_cert"],
                "used" if r["https_proxy_used"] else "ignored",
                "used" if r["http_proxy_used"] else "ignored",
                *no_proxy,
            )
        )
    print()
    print(_table(support))
    return {"scenario": "http", **doc}


def run_perf(args: argparse.Namespace) -> dict[str, Any]:
    """Every throughput, latency and memory scenario, with its baseline and target."""
    doc: dict[str, Any] = {"scenario": "perf"}
    rows = [("figure", "ours", "baseline", "ratio", "target", "met")]

    def row(name: str, ours: str, base: str, ratio: float | None, target: str, met: bool) -> None:
        shown = "" if ratio is None else f"{ratio:.2f}"
        rows.append((name, ours, base, shown, target, "yes" if met else "NO"))
        print(f"{name}: {ours} vs {base} ({shown}) target {target}", file=sys.stderr, flush=True)

    single = doc["producer_single"] = perf.producer_single()
    row(
        "enqueue p50 vs LPUSH p50",
        f"{single['enqueue_p50_us']} us",
        f"{single['lpush_p50_us']} us",
        single["ratio_p50"],
        "<= 5x",
        single["ratio_p50"] <= 5,
    )
    bulk = doc["producer_bulk"] = perf.producer_bulk()
    row(
        "bulk enqueue_reports/s",
        f"{bulk['enqueue_reports_per_s']:,}",
        f"{bulk['raw_lpush_per_s']:,}",
        bulk["ratio"],
        ">= 50,000/s, >= 0.20",
        bulk["enqueue_reports_per_s"] >= 50_000 and bulk["ratio"] >= 0.2,
    )
    row(
        "bulk enqueue --file/s",
        f"{bulk['enqueue_file_per_s']:,}",
        f"{bulk['raw_lpush_per_s']:,}",
        bulk["enqueue_file_per_s"] / bulk["raw_lpush_per_s"],
        "-",
        True,
    )
    w = doc["worker_throughput"] = perf.worker_throughput(threads=16)
    naive = w["naive_celery"]["reports_per_s"]
    row(
        "worker, single-report messages/s",
        f"{w['single_messages']['reports_per_s']:,}",
        f"naive {naive:,}",
        w["single_vs_naive"],
        ">= 0.85",
        w["single_vs_naive"] >= 0.85,
    )
    row(
        "worker, bulk messages/s",
        f"{w['bulk_messages']['reports_per_s']:,}",
        f"naive {naive:,}",
        w["bulk_vs_naive"],
        ">= 1,000/s, >= 1.5",
        w["bulk_messages"]["reports_per_s"] >= 1000 and w["bulk_vs_naive"] >= 1.5,
    )
    for name in ("single_messages", "bulk_messages", *perf.BASELINES):
        row(
            f"CPU ms/report (reports/s), {name}",
            f"{w[name]['cpu_ms_per_report']} ({w[name]['reports_per_s']:,}/s)",
            "-",
            None,
            "-",
            True,
        )
    # the CPU targets, as same-run ratios (absolute CPU differs between machines)
    targets = {
        ("single_messages", "naive_celery"): 0.65,
        ("bulk_messages", "dramatiq"): 0.5,
    }
    for ours in ("single_messages", "bulk_messages"):
        for name in perf.BASELINES:
            ratio = w["cpu_ratio"][ours][name]
            limit = targets.get((ours, name))
            row(
                f"CPU/report, {ours} vs {name}",
                f"{w[ours]['cpu_ms_per_report']} ms",
                f"{w[name]['cpu_ms_per_report']} ms",
                ratio,
                "-" if limit is None else f"<= {limit}",
                limit is None or ratio <= limit,
            )
    ratio = w["rate_ratio"]["bulk_messages"]["dramatiq"]
    row(
        "worker, bulk messages/s vs Dramatiq",
        f"{w['bulk_messages']['reports_per_s']:,}",
        f"dramatiq {w['dramatiq']['reports_per_s']:,}",
        ratio,
        ">= 2",
        ratio >= 2,
    )
    lat = doc["latency_bound"] = perf.latency_bound()
    for t, target in ((16, 0.9), (64, 0.75)):
        r = lat[f"threads_{t}"]
        row(
            f"50 ms API, {t} threads, single",
            f"{r['reports_per_s']}/s",
            f"bound {r['bound_per_s']}/s",
            r["efficiency"],
            f">= {target}",
            r["efficiency"] >= target,
        )
    lat = doc["latency_bound_bulk"] = perf.latency_bound(per_message=20)
    for t, target in ((16, 0.9), (64, 0.9)):
        r = lat[f"threads_{t}"]
        row(
            f"50 ms API, {t} threads, bulk",
            f"{r['reports_per_s']}/s",
            f"bound {r['bound_per_s']}/s",
            r["efficiency"],
            f">= {target}",
            r["efficiency"] >= target,
        )
    capacity = w["single_messages"]["reports_per_s"]
    e2e = doc["end_to_end"] = perf.end_to_end(rate=capacity / 2)
    row(
        "enqueue->API p99 at 50% load",
        f"{e2e['p99_ms']} ms",
        f"p50 {e2e['p50_ms']} ms",
        None,
        "<= 250 ms",
        e2e["p99_ms"] <= 250,
    )
    mem = doc["memory"] = perf.memory()
    row(
        "worker RSS 10k -> 100k",
        f"{mem['rss_mb'][100000]} MB",
        f"{mem['rss_mb'][10000]} MB",
        1 + mem["growth_10k_to_100k"],
        "within ±10%",
        abs(mem["growth_10k_to_100k"]) <= 0.10,
    )
    print(_table(rows))
    return doc


def run_replication(args: argparse.Namespace) -> dict[str, Any]:
    doc = replication.run()
    rows = [
        ("figure", "min_replicas_ack = 0", "min_replicas_ack = 1", "ratio 1 : 0"),
        (
            "enqueue p50 (us)",
            str(doc["enqueue_p50_us"]["0"]),
            str(doc["enqueue_p50_us"]["1"]),
            str(doc["enqueue_p50_ratio_ack1_to_ack0"]),
        ),
        (
            "bulk enqueue_reports (reports/s)",
            str(doc["bulk_reports_per_s"]["0"]),
            str(doc["bulk_reports_per_s"]["1"]),
            str(doc["bulk_ratio_ack1_to_ack0"]),
        ),
    ]
    print(_table(rows))
    print(f"enqueue p50 through the Sentinels, ack 1: {doc['enqueue_p50_via_sentinel_ack1_us']} us")
    return doc


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "scenario",
        choices=[
            "perf",
            "ratelimit",
            "ratelimit-compare",
            "intake",
            "intake-servers",
            "http",
            "replication",
        ],
    )
    parser.add_argument("--processes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--other-limit", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--connections", type=int, default=128)
    parser.add_argument("--requests", type=int, default=4800, help="http: POSTs per round")
    parser.add_argument("--rounds", type=int, default=3, help="http: alternating rounds")
    args = parser.parse_args()
    runner = {
        "ratelimit": run_ratelimit,
        "ratelimit-compare": run_compare,
        "intake": run_intake,
        "intake-servers": run_servers,
        "http": run_http,
        "perf": run_perf,
        "replication": run_replication,
    }[args.scenario]
    doc = runner(args)
    print(f"\nwritten to {_save(args.scenario, doc)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m bench SCENARIO [--option value ...]``; prints a table and writes JSON.

Scenarios: ratelimit (real workers against a limit), ratelimit-compare (our limiter vs the
``limits`` library, no Celery), intake (the HTTP intake vs its constant-answer ceiling),
intake-servers (candidate ASGI servers). Results go to bench/results/<scenario>-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from . import intake, ratelimit

RESULTS = Path(__file__).resolve().parent / "results"


def _save(name: str, doc: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(doc, indent=2))
    return path


def _table(rows: list[tuple[str, ...]]) -> str:
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
    rows = [("workers", "account", "limit/s", "requests", "max in 1 s", "achieved", "wait p50 ms",
             "wait p99 ms")]  # fmt: skip
    for doc in runs:
        for account, a in doc["accounts"].items():
            rows.append((f"{doc['processes']}x{doc['threads']}", account, str(a["limit_per_s"]),
                         str(a["requests"]), str(a["max_in_any_1s_window"]),
                         f"{a['achieved_fraction']:.1%}", str(a["limiter_wait_p50_ms"]),
                         str(a["limiter_wait_p99_ms"])))  # fmt: skip
    print(_table(rows))
    return {"scenario": "ratelimit", "runs": runs}


def run_compare(args: argparse.Namespace) -> dict[str, Any]:
    doc = ratelimit.compare(args.processes[0], args.threads, args.limit, args.seconds)
    rows = [("limiter", "requests", "max in 1 s", "limit", "achieved")]
    for name, r in doc["limiters"].items():
        rows.append((name, str(r["requests"]), str(r["max_in_any_1s_window"]), str(args.limit),
                     f"{r['achieved_fraction']:.1%}"))  # fmt: skip
    print(_table(rows))
    return doc


def run_intake(args: argparse.Namespace) -> dict[str, Any]:
    doc = intake.intake(int(args.seconds), args.connections)
    rows = [("server", "requests/s", "p50 ms", "p90 ms", "p99 ms", "non-2xx")]
    for name in ("ceiling", "intake"):
        r = doc[name]
        rows.append((name, f"{r['requests_per_s']:,.0f}", str(r.get("p50_ms")), str(r.get("p90_ms")),
                     str(r.get("p99_ms")), str(r["non_2xx"])))  # fmt: skip
    print(_table(rows))
    print(f"intake / ceiling: {doc['ratio']:.1%} (target >= 70%); "
          f"reports queued: {doc['intake']['reports_queued']:,}")  # fmt: skip
    return doc


def run_servers(args: argparse.Namespace) -> dict[str, Any]:
    doc = intake.servers(int(args.seconds), args.connections)
    rows = [("server", "requests/s", "p99 ms")]
    for name in ("uvicorn", "granian", "hypercorn"):
        rows.append((name, f"{doc[name]['requests_per_s']:,.0f}", str(doc[name].get("p99_ms"))))
    print(_table(rows))
    return doc


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "scenario", choices=["ratelimit", "ratelimit-compare", "intake", "intake-servers"]
    )
    parser.add_argument("--processes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--other-limit", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--connections", type=int, default=128)
    args = parser.parse_args()
    runner = {
        "ratelimit": run_ratelimit,
        "ratelimit-compare": run_compare,
        "intake": run_intake,
        "intake-servers": run_servers,
    }[args.scenario]
    doc = runner(args)
    print(f"\nwritten to {_save(args.scenario, doc)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

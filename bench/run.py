"""flowd benchmark harness: ``python bench/run.py [--smoke] [--out bench/out] [--scenarios …]``.

Starts its own servers (embedded PostgreSQL with fsync on, embedded nats-server) unless
FLOWD_BENCH_DATABASE_URL and FLOWD_BENCH_NATS_URL are set, runs the chosen scenarios against
``flowd run`` subprocesses, and writes ``<out>/results.json``, ``<out>/latency.png`` and
RESULTS.md. It measures and reports; it asserts nothing about speed. The exit code is 1 only
when a scenario could not run to the end.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import json
import shlex
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from flowbench import (
    e2e,
    env,
    ingest,
    jetstream,
    pgbench,
    procstat,
    replicas,
    report,
    scale,
    waits,
)
from flowbench.config import ALL_SCENARIOS, FULL, SMOKE
from flowbench.context import Context

BENCH = Path(__file__).resolve().parent


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python bench/run.py",
        description="Benchmark flowd end to end and against its limits; writes results.json, "
        "latency.png and RESULTS.md.",
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CI: the harness works)")
    p.add_argument("--out", type=Path, default=BENCH / "out", help="output directory")
    p.add_argument(
        "--scenarios",
        default=",".join(ALL_SCENARIOS),
        help=f"comma-separated subset of {','.join(ALL_SCENARIOS)} (default: all); pgbench "
        "includes jetstream (the two limits), resources alone runs e2e's saturation part",
    )
    p.add_argument(
        "--results-md",
        type=Path,
        help="where to write RESULTS.md (default: bench/RESULTS.md for a full run, "
        "<out>/RESULTS.md for --smoke)",
    )
    p.add_argument(
        "--profile", action="store_true", help="add a py-spy profiled saturation pass (e2e)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a size, e.g. --set e2e_flows=20000 (see flowbench/config.py)",
    )
    p.add_argument("--keep", action="store_true", help="keep databases and embedded data")
    p.add_argument(
        "--idle-poll",
        action="store_true",
        help="idle CPUs poll instead of halting for the run (holds /dev/cpu_dma_latency at "
        "0, as tuned's latency-performance profile does; root). On a VM this removes most "
        "steal; it burns host CPU while idle",
    )
    p.add_argument(
        "--render-only",
        action="store_true",
        help="only re-render RESULTS.md and latency.png from <out>/results.json",
    )
    return p


def _scenarios(text: str) -> list[str]:
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = set(chosen) - set(ALL_SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenarios {sorted(unknown)}; choose from {ALL_SCENARIOS}")
    return [s for s in ALL_SCENARIOS if s in chosen]  # canonical order


async def _run(args: argparse.Namespace, results: dict[str, Any]) -> bool:
    sizes = (SMOKE if args.smoke else FULL).override(args.set)
    chosen = _scenarios(args.scenarios)
    results["sizes"] = sizes.as_dict()
    servers = await asyncio.to_thread(env.start_servers, args.keep)
    ctx = Context(servers, sizes, args.out, args.smoke, args.profile, args.keep)
    ok = True
    try:
        results["servers"] = servers.describe()
        results["versions"] = await env.versions(servers)
        if servers.data_dir is not None:
            results["disk"] = env.fsync_probe(servers.data_dir)
        results["wal"] = await env.precondition_wal(servers)
        # e2e carries resources (measured during its saturation run); resources alone runs
        # the saturation part only.
        steps: list[tuple[str, Callable[[], Awaitable[dict[str, Any]]]]] = []
        if "e2e" in chosen or "resources" in chosen:
            steps.append(("e2e", lambda: e2e.run(ctx, latency="e2e" in chosen)))
        if "pgbench" in chosen:
            steps.append(("pgbench", lambda: pgbench.run(ctx)))
            steps.append(("jetstream", lambda: jetstream.run(ctx)))
        elif "jetstream" in chosen:
            steps.append(("jetstream", lambda: jetstream.run(ctx)))
        for name, runner in (
            ("ingest", ingest.run),
            ("scale", scale.run),
            ("waits", waits.run),
            ("replicas", replicas.run),
        ):
            if name in chosen:
                steps.append((name, functools.partial(runner, ctx)))
        results["cpu_probe"] = {"start": env.cpu_probe()}
        for name, step in steps:
            load = procstat.loadavg()
            print(f"== {name} (load average {load})")
            started, steal = time.monotonic(), procstat.steal_seconds()
            try:
                results["scenarios"][name] = await step()
            except Exception as exc:
                ok = False
                print(f"  ! {name} failed: {exc!r}")
                results["scenarios"][name] = {"error": traceback.format_exc()}
            results["scenarios"][name]["elapsed_s"] = round(time.monotonic() - started, 1)
            results["scenarios"][name]["loadavg_before_after"] = [load, procstat.loadavg()]
            results["scenarios"][name]["steal_s"] = round(procstat.steal_seconds() - steal, 2)
            _write_json(args.out, results)  # partial results survive a later crash
        results["cpu_probe"]["end"] = env.cpu_probe()
    finally:
        if not args.keep and servers.databases:
            try:
                await env.drop_databases(servers)
            except Exception as exc:
                print(f"  ! could not drop databases: {exc!r}")
        await asyncio.to_thread(env.stop_servers, servers, args.keep)
    return ok


def _write_json(out: Path, results: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.out = args.out.resolve()
    md = args.results_md or (args.out / "RESULTS.md" if args.smoke else BENCH / "RESULTS.md")
    if args.render_only:
        report.render(json.loads((args.out / "results.json").read_text()), args.out, md)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)  # scenarios write into it before results.json
    started = time.monotonic()
    results: dict[str, Any] = {
        "mode": "smoke" if args.smoke else "full",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": env.git(),
        "machine": env.machine(),
        "scenarios": {},
    }
    with env.cpu_idle(args.idle_poll) as idle:
        results["cpu_idle"] = idle
        ok = asyncio.run(_run(args, results))
    results["total_seconds"] = round(time.monotonic() - started, 1)
    _write_json(args.out, results)
    report.render(results, args.out, md)
    print(f"results: {args.out / 'results.json'}, {md} ({results['total_seconds']} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

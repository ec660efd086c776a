"""results.json -> RESULTS.md (a table per scenario) and latency.png.

Everything from the heading ``## What each change bought`` to the end of an existing
RESULTS.md is hand-written and kept as it is.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

KEPT_HEADING = "## What each change bought"
KEPT_PLACEHOLDER = f"""{KEPT_HEADING}

_Hand-written: for each performance change, the commit, what it changed and the numbers
before/after (from the tables above). `bench/run.py` keeps this section when it rewrites the
file._
"""
MATPLOTLIB_REQUIREMENT = "matplotlib>=3.8"


def replicas(sc: dict[str, Any], chart: Path | None, md: Path) -> str:
    r = sc.get("replicas")
    if not r:
        return ""
    if err := _error(r):
        return err
    return "\n".join(
        [
            f"{r['cluster_nodes']} nats-server processes clustered on loopback, streams at "
            f"{r['stream_replicas']} replicas, `FLOWD_PARTITIONS={r['partitions']}`, one "
            "PostgreSQL; every command published at once (create on `P.cmd.<id>.create`, then "
            "start, update, finish). Everything shares this machine's 2 cores, so more replicas "
            "add coordination, not hardware: this shows the cost of partitioned scale-out, not "
            "its gain on separate machines." + _separately(r.get("measured_at")),
            "",
            table(
                ["replicas", "flows", "commands", "seconds", "commands/s"],
                [
                    [x["replicas"], x["flows"], x["commands"], x["seconds"], x["commands_per_s"]]
                    for x in r["runs"]
                ],
            ),
        ]
    )


def _separately(at: dict[str, Any] | None) -> str:
    """A note for a section measured in another run than the header's and merged in."""
    if not at:
        return ""
    git = at.get("git") or {}
    dirty = " + uncommitted changes" if git.get("uncommitted_code_files") else ""
    return (
        f" Measured in a separate run: `{at.get('command')}` at {at.get('date')}, git "
        f"`{git.get('describe', '?')}`{dirty}."
    )


def render(results: dict[str, Any], out: Path, md: Path) -> None:
    chart = latency_chart(results, out / "latency.png")
    if chart is not None and md.parent != out:
        # out/ is git-ignored: keep the chart the committed RESULTS.md shows beside it
        chart = Path(shutil.copyfile(chart, md.parent / "latency.png"))
    text = markdown(results, chart, md)
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text + "\n" + kept_section(md))


def kept_section(md: Path) -> str:
    try:
        old = md.read_text()
    except OSError:
        return KEPT_PLACEHOLDER
    at = old.find(KEPT_HEADING)
    return old[at:] if at >= 0 else KEPT_PLACEHOLDER


# -- the chart ------------------------------------------------------------------------------


def latency_chart(results: dict[str, Any], path: Path) -> Path | None:
    runs = results.get("scenarios", {}).get("e2e", {}).get("latency") or []
    points = [r for r in runs if r.get("latency", {}).get("count")]
    if not points:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"  ! no chart: pip install '{MATPLOTLIB_REQUIREMENT}'")
        return None
    x = [r["offered_per_s"] for r in points]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for key, style in (("p50_ms", "o-"), ("p95_ms", "s--"), ("p99_ms", "^-")):
        ax.plot(x, [r["latency"][key] for r in points], style, label=key.removesuffix("_ms"))
    sat = results["scenarios"]["e2e"].get("saturation", {}).get("commands_per_s")
    if sat:
        ax.axvline(sat, color="grey", linestyle=":", label=f"saturation {sat:.0f}/s")
    ax.set_yscale("log")
    ax.set_xlabel("offered load (commands/s, open loop)")
    ax.set_ylabel("command -> event latency (ms)")
    ax.set_title(f"flowd e2e latency ({results.get('mode')}, {results.get('date', '')[:10]})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# -- markdown helpers -----------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".") if abs(value) < 100 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _lat(summary: dict[str, Any]) -> list[Any]:
    return [summary.get(k) for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")]


def _uncommitted(git: dict[str, Any]) -> str:
    files = git.get("uncommitted_code_files") or []
    if not files:
        return " (no uncommitted changes to service/, migrations/, pyproject.toml)"
    return (
        f" plus uncommitted changes to {', '.join(f'`{f}`' for f in files)} "
        f"(diff sha256 {git.get('uncommitted_code_diff_sha256')}): the daemon runs the work tree"
    )


def _pg_version(versions: dict[str, Any]) -> str:
    return str(versions.get("postgresql", "")).split(" on ")[0]


def _rel(repo_path: str, md: Path) -> str:
    """A link from RESULTS.md (wherever it is written) to a file of the repository."""
    return os.path.relpath(Path(__file__).resolve().parents[2] / repo_path, md.parent)


def _error(section: dict[str, Any]) -> str | None:
    if "error" in section:
        tail = section["error"].strip().splitlines()[-1]
        return f"**Failed:** `{tail}` (traceback in results.json)"
    return None


# -- sections -------------------------------------------------------------------------------


def markdown(results: dict[str, Any], chart: Path | None, md: Path) -> str:
    sc = results.get("scenarios", {})
    parts = [
        "# flowd benchmark results",
        "",
        f"<!-- Written by bench/run.py from results.json. Edit only the section "
        f'"{KEPT_HEADING[3:]}": it is kept when the harness rewrites this file. -->',
        "",
        how_run(results),
    ]
    if goals := targets(sc):
        parts += ["## Targets (issue 5) against this run", "", goals, ""]
    for title, fn in (
        ("1. End to end: JetStream command -> flowd -> PostgreSQL -> event", e2e),
        ("2. Limits: the same work in pgbench, and raw JetStream", limits),
        ("3. Ingest: out-of-order step observations", ingest),
        ("4. Scale: reads with many flows", scale),
        ("5. Resources of the daemon (during the saturation run)", resources),
        ("6. Waits: timers and signals with many waiting flows", waits),
        ("7. Scale-out: 1, 2 and 3 replicas on a 3-node JetStream cluster", replicas),
        ("Profile: where the daemon spends its time under saturation", profile),
        ("Profile: where the daemon spends its time at the lowest paced rate", profile_paced),
    ):
        body = fn(sc, chart, md)
        if body:
            parts += [f"## {title}", "", body, ""]
    return "\n".join(parts)


def targets(sc: dict[str, Any]) -> str:
    """The issue's targets, each against what this run measured (rows for scenarios run)."""
    rows: list[list[Any]] = []

    def met(ok: bool) -> str:
        return "**yes**" if ok else "**no**"

    scripts = sc.get("pgbench", {}).get("scripts", {})
    for name, label in (
        ("grouped", f"the statement flowd sends, {_group(scripts)} per transaction"),
        ("one_statement", "the statement flowd sends, one per transaction"),
        ("multi_statement", "the same rows as separate statements"),
    ):
        ratio = scripts.get(name, {}).get("flowd_e2e_over_pgbench")
        if ratio is not None:
            rows.append(
                [f"end to end ≥ 50 % of pgbench ({label})", f"{ratio:.3f}", met(ratio >= 0.5)]
            )
    for lat in sc.get("e2e", {}).get("latency", []):
        if lat.get("fraction") == 0.5 and lat.get("latency", {}).get("p99_ms") is not None:
            p99 = lat["latency"]["p99_ms"]
            rows.append(["p99 command → event ≤ 25 ms at 50 %", f"{p99} ms", met(p99 <= 25)])
    scale = sc.get("scale", {})
    for call, limit in (("get", 2), ("list_by_owner", 5), ("list_by_status", 5)):
        if (p99 := scale.get("latency", {}).get(call, {}).get("p99_ms")) is not None:
            flows = scale.get("table", {}).get("rows", 0)
            target = f"`{call}` p99 ≤ {limit} ms at {flows:,} flows"
            rows.append([target, f"{p99} ms", met(p99 <= limit)])
    res = sc.get("e2e", {}).get("saturation", {}).get("resources", {})
    if rss := res.get("flowd_peak_rss_kb"):
        mib = rss / 1024
        rows.append(["daemon peak RSS ≤ 150 MB", f"{mib:.1f} MiB", met(mib * 1.048576 <= 150)])
    return table(["target", "measured", "met"], rows) if rows else ""


def how_run(r: dict[str, Any]) -> str:
    m, v, srv = r.get("machine", {}), r.get("versions", {}), r.get("servers", {})
    pg = v.get("postgresql_settings", {})
    git = r.get("git", {})
    disk = r.get("disk")
    sat = r.get("scenarios", {}).get("e2e", {}).get("saturation", {})
    cpu = sat.get("resources", {}).get("cpu_seconds", {})
    other = cpu.get("other")
    lines = [
        "## How this was run",
        "",
        f"- **Command:** `{r.get('command')}` ({r.get('mode')} sizes; "
        f"{r.get('total_seconds', '?')} s in all)",
        f"- **When / what:** {r.get('date')}, git `{git.get('describe')}`" + _uncommitted(git),
        f"- **Machine:** {m.get('cpu_model')}, nproc {m.get('nproc')}, {m.get('mem_total')} "
        f"RAM, Linux {m.get('kernel')}; load average at start {m.get('loadavg_at_start')}",
        f"- **Software:** Python {v.get('python')}, {_pg_version(v)}, "
        f"{v.get('nats_server')}; "
        + ", ".join(f"{k} {x}" for k, x in (v.get("packages") or {}).items()),
        f"- **Servers:** {srv.get('kind')}: {srv.get('postgres')}; {srv.get('nats')}",
        "- **PostgreSQL settings:** "
        + ", ".join(f"{k}={x}" for k, x in pg.items() if k != "server_version"),
    ]
    if disk:
        lines.append(
            f"- **Disk:** {disk['fdatasync_per_s']:,.0f} fdatasync/s of 8 kB "
            f"({disk['us_per_op']} µs each) in the PostgreSQL data directory's file system"
        )
    wal = r.get("wal") or {}
    if wal.get("preconditioned"):
        lines.append(
            f"- **WAL warmed up:** before any scenario the harness switched WAL segments "
            f"{wal.get('segments')} times and checkpointed ({wal.get('seconds')} s), with "
            "min_wal_size 1GB, so the runs reuse segments as a server in service does. A fresh "
            "cluster zero-fills and fsyncs each new 16 MB segment while every commit waits "
            "(16-70 ms at each switch, seen with `pgbench -l`)."
        )
    lines += [
        "- **Daemon:** `python -m flowd run` subprocess per scenario, own database and subject "
        "prefix, FLOWD_LOG_LEVEL=warning, FLOWD_LOG_FORMAT=json, other settings default "
        "(FLOWD_BATCH 128, FLOWD_CONCURRENCY 128, FLOWD_POOL_SIZE 10) unless listed below.",
        "- **Load:** open loop. Producers are 2 separate processes (multiprocessing, spawn) "
        "that speak the NATS protocol over a plain socket (bench/flowbench/producers.py); "
        "every party (producers, harness, flowd, PostgreSQL, nats-server) shares the "
        "machine's cores, so producers compete with the daemon. Producers and harness keep "
        "their garbage collector off while measuring (bench/flowbench/quiet.py). Nothing here "
        "is asserted: the harness only measures.",
    ]
    lines += _host_speed(r)
    if other is not None:
        lines.append(
            f"- **Noise:** processes outside the benchmark used {other} CPU-seconds during the "
            f"{sat.get('wall_seconds')} s saturation run (/proc/stat minus every measured party)."
        )
    return "\n".join(lines) + "\n"


def _host_speed(r: dict[str, Any]) -> list[str]:
    """The machine's speed during the run: a CPU probe and the hypervisor's steal."""
    lines = []
    probe = r.get("cpu_probe") or {}
    if start := probe.get("start"):
        end = probe.get("end") or {}
        lines.append(
            f"- **CPU speed:** a fixed pure-Python loop took {start['ns_per_iteration']} ns per "
            f"iteration before the first scenario and {end.get('ns_per_iteration', '?')} after "
            "the last (bench/flowbench/env.py `cpu_probe`, best of 5). The same code's numbers "
            "move with it: compare runs only at similar values."
        )
    if idle := r.get("cpu_idle"):
        how = (
            "poll: the harness held /dev/cpu_dma_latency at 0 (`--idle-poll`), so idle vCPUs "
            "spin instead of going back to the host"
            if idle.get("poll")
            else "halt (the machine's default): an idle vCPU goes back to the host"
        )
        lines.append(f"- **CPU idle:** {how}; cpuidle driver {idle.get('driver')}")
    cores = int(r.get("machine", {}).get("nproc") or 1)
    steal = [
        f"{name} {sc['steal_s']} s ({100 * sc['steal_s'] / (sc['elapsed_s'] * cores):.1f} %)"
        for name, sc in r.get("scenarios", {}).items()
        if "steal_s" in sc and sc.get("elapsed_s")
    ]
    if steal:
        lines.append(
            "- **Steal:** CPU time the hypervisor gave these vCPUs to others during each "
            "scenario (/proc/stat; share of its wall time times cores): " + ", ".join(steal)
        )
    return lines


def e2e(sc: dict[str, Any], chart: Path | None, md: Path) -> str:
    e = sc.get("e2e")
    if not e:
        return ""
    if err := _error(e):
        return err
    s = e["saturation"]
    p, d = s["producers"], s["daemon_counters"]
    out = [
        "**(a) Saturation**: every command published at once by 2 producers; rate = commands / "
        "(last event stored in the events stream - first publish).",
        "",
        table(
            [
                "flows",
                "commands",
                "wall s",
                "**commands/s**",
                "sustained 10-90 %/s",
                "producers' publish rate/s",
                "rejected",
                "dead letters",
                "mean in-daemon ms/command",
            ],
            [
                [
                    s["flows"],
                    s["commands"],
                    s["wall_seconds"],
                    s["commands_per_s"],
                    s["sustained_10_90_per_s"],
                    p["publish_rate"],
                    d["rejected"],
                    d["dead_letters"],
                    d["mean_command_ms"],
                ]
            ],
        ),
        "",
        f"Message sizes: mean body {s['message_sizes']['mean_body_bytes']} B, "
        f"{s['message_sizes']['mean_message_bytes']} B with subject and id. "
        f"End measured by: {s['end_measured_by']}.",
        "",
    ]
    runs = e.get("latency") or []
    if runs:
        out += [
            "**(b) Latency at fixed offered rates** (open loop: each command's latency counts "
            "from its *scheduled* send time to its event's arrival at the harness's `P.evt.>` "
            "subscription).",
            "",
            table(
                [
                    "% of saturation",
                    "offered/s",
                    "achieved/s",
                    "commands",
                    "p50 ms",
                    "p95 ms",
                    "p99 ms",
                    "max ms",
                    "missing",
                    "producers max behind ms",
                ],
                [
                    [
                        f"{r['fraction']:.0%}",
                        r["offered_per_s"],
                        r["achieved_per_s"],
                        r["commands"],
                        *_lat(r["latency"]),
                        r["missing"],
                        r["producers"]["max_behind_schedule_ms"],
                    ]
                    for r in runs
                ],
            ),
            "",
        ]
        if chart is not None:
            out += [
                f"![p50/p95/p99 latency against offered load]({os.path.relpath(chart, md.parent)})",
                "",
            ]
        out += _cpu_per_command(s, runs)
    settings = e.get("daemon_settings", {})
    out.append("Daemon settings: " + ", ".join(f"`{k}={v}`" for k, v in settings.items()))
    return "\n".join(out)


def _cpu_per_command(sat: dict[str, Any], runs: list[dict[str, Any]]) -> list[str]:
    """CPU per command by party at saturation and at each paced rate: what a command costs
    when it arrives alone against when it shares every round trip with many others."""
    parties = ("flowd", "postgres", "nats_server", "machine_total")
    # (run, commands/s, wall s, CPU seconds by party, commands)
    rows: list[tuple[str, Any, float, dict[str, float], int]] = []
    if (cpu := sat.get("resources", {}).get("cpu_seconds")) and sat.get("commands"):
        rows.append(
            ("saturation", sat["commands_per_s"], sat["wall_seconds"], cpu, sat["commands"])
        )
    rows += [
        (
            f"{r['fraction']:.0%}",
            r["achieved_per_s"],
            r["wall_seconds"],
            r["cpu_seconds"],
            r["outcomes"],
        )
        for r in runs
        if r.get("cpu_seconds") and r.get("outcomes")
    ]
    if not rows:
        return []
    return [
        "CPU per command (ms of CPU-time per command, /proc; `machine_total` includes the "
        "producers and the harness; busy cores = machine CPU-seconds / wall seconds):",
        "",
        table(
            ["run", "commands/s", *parties, "busy cores"],
            [
                [
                    name,
                    rate,
                    *(round(1000 * cpu.get(k, 0) / commands, 3) for k in parties),
                    round(cpu.get("machine_total", 0) / wall, 2) if wall else None,
                ]
                for name, rate, wall, cpu, commands in rows
            ],
        ),
        "",
    ]


def limits(sc: dict[str, Any], chart: Path | None, md: Path) -> str:
    out: list[str] = []
    pg = sc.get("pgbench")
    if pg:
        if err := _error(pg):
            out += [err, ""]
        else:
            out += [_pgbench(pg, md), ""]
    js = sc.get("jetstream")
    if js:
        if err := _error(js):
            out.append(err)
        else:
            out += [
                f"**Raw JetStream** (no flowd; {js['method']}; sizes from {js['sizes_from']}):",
                "",
                table(
                    [
                        "message",
                        "bytes",
                        "messages",
                        "publish/s",
                        "publish MB/s",
                        "consume+ack/s",
                        "publish then consume/s",
                    ],
                    [
                        [
                            name,
                            js[name]["message_bytes"],
                            js[name]["messages"],
                            js[name]["publish_per_s"],
                            js[name]["publish_mb_per_s"],
                            js[name]["consume_ack_per_s"],
                            js[name]["publish_then_consume_per_s"],
                        ]
                        for name in ("command", "event")
                        if name in js
                    ],
                ),
            ]
    return "\n".join(out)


def _pgbench(pg: dict[str, Any], md: Path) -> str:
    scripts = pg["scripts"]
    out = [
        f"**pgbench** ({pg['pgbench']}): the database work of one flowd `update` command "
        f"on a flow in its cache (no read: idempotency record, compare-and-set update, event, "
        f"outbox row; the relay's amortised delete) at {pg['clients']} clients = flowd's pool, "
        f"{pg['seeded_flows']:,} seeded flows, {pg['seconds']} s per script, each on a fresh "
        "database. flowd's store commits concurrent changes together (group commit: one "
        "pipelined transaction for all changes waiting while the previous one was in flight); "
        f"`command_grouped.sql` does that with {_group(scripts)} commands per transaction (it is "
        "generated from `command_one_statement.sql` into the output directory).",
        "",
        table(
            [
                "script",
                "commands / transaction",
                "tps",
                "**commands/s**",
                "latency avg ms",
                "transactions",
                "failed",
                "flowd e2e/s",
                "**flowd e2e / pgbench**",
                "CPU s: postgres / pgbench / other",
            ],
            [
                [
                    f"[{Path(r['script']).name}]({_rel(r['script'], md)})",
                    r.get("commands_per_transaction", 1),
                    r["tps"],
                    r.get("commands_per_s", r["tps"]),
                    r["latency_avg_ms"],
                    r["transactions"],
                    r["failed"],
                    pg["flowd_e2e_per_s"],
                    r["flowd_e2e_over_pgbench"],
                    _cpu_split(r.get("cpu_seconds")),
                ]
                for r in scripts.values()
            ],
        ),
        "",
        "Commands: " + "; ".join(f"`{r['command']}`" for r in scripts.values()),
        "",
    ]
    for name, r in scripts.items():
        out += [
            f"<details><summary>{name}: per-statement latency (pgbench -r)</summary>",
            "",
            table(
                ["ms", "statement"],
                [[st["ms"], f"`{st['sql']}`"] for st in r["statement_latency_ms"]],
            ),
            "</details>",
            "",
        ]
    return "\n".join(out)


def _group(scripts: dict[str, Any]) -> int:
    return int(scripts.get("grouped", {}).get("commands_per_transaction", 1))


def _cpu_split(cpu: dict[str, float] | None) -> str:
    if not cpu:
        return "-"
    return f"{cpu['postgres']} / {cpu['pgbench']} / {cpu['other']}"


def ingest(sc: dict[str, Any], chart: Path | None, md: Path) -> str:
    g = sc.get("ingest")
    if not g:
        return ""
    if err := _error(g):
        return err
    return table(
        [
            "flows",
            "runs/flow",
            "observations",
            "runs with succeeded first",
            "wall s",
            "**observations/s**",
            "sustained 10-90 %/s",
            "unchanged outcomes",
            "all runs end succeeded",
        ],
        [
            [
                g["flows"],
                g["runs_per_flow"],
                g["observations"],
                g["runs_with_succeeded_first"],
                g["wall_seconds"],
                g["observations_per_s"],
                g["sustained_10_90_per_s"],
                g["outcomes"]["unchanged"],
                g["check_all_runs_succeeded"],
            ]
        ],
    )


def scale(sc: dict[str, Any], chart: Path | None, md: Path) -> str:
    s = sc.get("scale")
    if not s:
        return ""
    if err := _error(s):
        return err
    t = s["table"]
    out = [
        f"{t['rows']:,} flows ({t['owners']:,} owners; heap {t['table_size']}, indexes "
        f"{t['indexes_size']}; filled in {t['insert_seconds']} s, VACUUM ANALYZE "
        f"{t['vacuum_analyze_seconds']} s). By status: "
        + ", ".join(f"{k} {v:,}" for k, v in t["by_status"].items())
        + f". {s['how']}; {s['calls_each']:,} calls each after {s['warmup_calls_discarded']} "
        "warm-up calls.",
        "",
        table(
            ["call", "p50 ms", "p95 ms", "p99 ms", "max ms", "mean ms"],
            [[name, *_lat(v), v.get("mean_ms")] for name, v in s["latency"].items()],
        ),
        "",
        f"EXPLAIN (ANALYZE, BUFFERS) of the store's SQL, with {s['explain_params']}:",
        "",
    ]
    for name, plans in s["explain"].items():
        for kind, lines in plans.items():
            out += [
                f"<details><summary>{name}: {kind} plan</summary>",
                "",
                "```",
                *lines,
                "```",
                "</details>",
                "",
            ]
    return "\n".join(out)


def resources(sc: dict[str, Any], chart: Path | None, md: Path) -> str:
    s = sc.get("e2e", {}).get("saturation")
    if not s:
        return ""
    r = s["resources"]
    cpu, per = r["cpu_seconds"], r["cpu_seconds_per_10k_commands"]
    parties = [k for k in cpu if k != "machine_total"] + ["machine_total"]
    return "\n".join(
        [
            f"Over the saturation run ({s['commands']:,} commands, {s['wall_seconds']} s, "
            f"{r['machine_cpu_capacity_s']} CPU-seconds available):",
            "",
            table(
                [
                    "",
                    "flowd peak RSS (VmHWM)",
                    "flowd RSS at end",
                    "flowd CPU utilisation (1.0 = one core)",
                ],
                [
                    [
                        "daemon",
                        f"{r['flowd_peak_rss_kb'] / 1024:.1f} MiB"
                        if r["flowd_peak_rss_kb"]
                        else None,
                        f"{r['flowd_rss_kb_end'] / 1024:.1f} MiB"
                        if r["flowd_rss_kb_end"]
                        else None,
                        r["flowd_cpu_utilisation"],
                    ]
                ],
            ),
            "",
            table(
                ["CPU seconds", *parties],
                [
                    ["total", *(cpu.get(k) for k in parties)],
                    ["per 10,000 commands", *(per.get(k) for k in parties)],
                ],
            ),
            "",
            r["note"],
        ]
    )


def waits(sc: dict[str, Any], chart: Path | None, md: Path) -> str:
    w = sc.get("waits")
    if not w:
        return ""
    if err := _error(w):
        return err
    b, rel, t, s = w["bulk"], w["startup_relay"], w["timers"], w["signals"]
    return "\n".join(
        [
            f"Bulk: {b['flows']:,} flows made waiting (timers 1-30 days out) through FlowManager "
            f"in {b['seconds']} s ({b['flows_per_s']} flows/s, {b['commits_per_s']} commits/s; "
            f"setup connections with synchronous_commit=off); the daemon then published their "
            f"{rel['events']:,} events in {rel['seconds_to_publish_backlog']} s "
            f"({rel['events_per_s']}/s). {w['wait_conditions_during_measurement']:,} wait "
            "conditions during the measurements.",
            "",
            table(
                ["measurement", "n", "p50 ms", "p95 ms", "p99 ms", "max ms"],
                [
                    [
                        f"timer firing delay (cause.at - due), {t['spread_seconds']} s spread",
                        t["fired"],
                        *_lat(t["firing_delay"]),
                    ],
                    [
                        "timer: due -> resumed event at harness",
                        t["fired"],
                        *_lat(t["event_delivery_delay"]),
                    ],
                    [
                        f"signal command ({s['rate_per_s']}/s) -> resumed event",
                        s["resumed"],
                        *_lat(s["latency"]),
                    ],
                ],
            ),
        ]
    )


def profile_paced(sc: dict[str, Any], chart: Path | None, md: Path) -> str:
    return _profile(sc.get("e2e", {}).get("profile_paced"), "paced run at the lowest fraction")


def profile(sc: dict[str, Any], chart: Path | None, md: Path) -> str:
    return _profile(sc.get("e2e", {}).get("profile"), "saturation pass")


def _profile(p: dict[str, Any] | None, what: str) -> str:
    if not p:
        return ""
    if "error" in p:
        return f"Profile not taken: {p['error']}"
    s = p["summary"]
    top = 12
    return "\n".join(
        [
            f"py-spy ({s['rate_hz']} Hz, blocking) on the daemon during an extra {what} "
            f"({p['commands_per_s_while_profiled']} commands/s while sampled, "
            f"{p.get('flowd_cpu_ms_per_command_while_profiled')} ms of daemon CPU per command; "
            f"not a measured run). {s['samples']:,} non-idle samples in {s['seconds']} s: the "
            f"event loop was busy {s['busy_fraction']:.0%} of the time. "
            f"Collapsed stacks: `{p['raw_stacks']}`. "
            "Self time in `Runner.run` is the event loop's own C code (uvloop/selectors: "
            "socket I/O, scheduling); asyncpg's Cython protocol (encoding, decoding, I/O) "
            "shows up as asyncpg's Python frames that call it.",
            "",
            table(
                ["package (self)", "%", "package (inclusive)", "%"],
                [
                    [a["name"], a["pct"], b["name"], b["pct"]]
                    for a, b in zip(
                        s["self_by_package"][:top], s["inclusive_by_package"][:top], strict=False
                    )
                ],
            ),
            "",
            table(
                ["function (self)", "%", "nearest flowd caller (% of all samples)"],
                [
                    [
                        f"`{a['name']}`",
                        a["pct"],
                        ", ".join(f"`{c['name']}` {c['pct']}" for c in a.get("flowd_callers", [])),
                    ]
                    for a in s["self_by_function"][:top]
                ],
            ),
            "",
            table(
                ["function (inclusive)", "%"],
                [[f"`{a['name']}`", a["pct"]] for a in s["inclusive_by_function"][:top]],
            ),
        ]
    )

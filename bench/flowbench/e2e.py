"""Scenario 1 (end to end) and 5 (resources).

Flows go create -> start -> update -> finish, every step a JetStream command published by one
of two producer processes; the harness reads the outcome from the events stream.

(a) saturation: all commands published as fast as possible; throughput = commands / (last
    event stored in the events stream - first publish). The daemon's CPU and peak RSS are
    read from /proc over the same interval (scenario 5).
(b) latency at fractions of that rate: producers publish on a fixed schedule (open loop) and
    the harness, subscribed to ``P.evt.>``, matches each event's command id to the command's
    scheduled send time.

All parties share the machine's cores: producers, harness, flowd, PostgreSQL, nats-server.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from nats.aio.client import Client

from flowbench import natsutil, procstat
from flowbench import profile as pyspy
from flowbench.context import Context, CpuMeter
from flowbench.flowd import Flowd, metric_sum
from flowbench.producers import Job, Message, ProducerGroup, summarize
from flowbench.quiet import no_gc_pauses
from flowbench.stats import rate, summary_ms
from flowd.bus.subjects import Subjects

VERBS = ("create", "start", "update", "finish")


def _body(verb: str, flow_id: uuid.UUID, n: int) -> dict[str, Any]:
    if verb == "create":
        return {
            "id": str(flow_id),
            "controller_id": "bench-controller",
            "goal": f"benchmark flow {n}: build, test and ship release 2.0",
            "owner_session_key": f"owner-{n % 100}",
            "current_step": "queued",
            "state_json": {"progress": 0, "attempt": 1, "labels": ["bench", "e2e"]},
        }
    if verb == "update":
        return {
            "patch": {
                "progress": 0.5,
                "stage": "build",
                "artifacts": ["app-2.0.tar.gz", "sbom.json"],
                "note": "compiled 128 modules, 0 warnings",
            },
            "next_step": "test",
        }
    if verb == "finish":
        return {"final_state": {"progress": 1.0, "result": "shipped", "version": "2.0.0"}}
    return {}


def build_messages(
    s: Subjects, tag: str, flows: int, producers: int, block: int
) -> list[list[Message]]:
    """Per producer: its flows (every ``producers``-th), ``block`` flows at a time, all creates
    of the block, then all starts, updates, finishes. A flow's commands keep their order
    because one producer (one connection) publishes them all."""
    ids = [uuid.uuid4() for _ in range(flows)]
    out: list[list[Message]] = [[] for _ in range(producers)]
    for p in range(producers):
        mine = list(enumerate(ids))[p::producers]
        for b in range(0, len(mine), block):
            chunk = mine[b : b + block]
            for verb in VERBS:
                for n, fid in chunk:
                    subject = s.create() if verb == "create" else s.command(fid, verb)
                    body = json.dumps(_body(verb, fid, n), separators=(",", ":")).encode()
                    out[p].append((subject, body, f"{tag}-{n}-{verb}"))
    return out


def write_latencies(path: Path, got: list[natsutil.Received], latencies: list[float]) -> None:
    """One line per command, for finding where slow commands spent their time: when it was
    scheduled, its latency, when flowd applied it (its event's ``at``, flowd's clock; before
    the commit), its command id, its event's subject."""
    lines = ["scheduled_unix\tlatency_ms\tapplied_unix\tcommand_id\tsubject\n"]
    for m, latency in zip(got, latencies, strict=True):
        try:
            applied = f"{datetime.fromisoformat(json.loads(m.data)['at']).timestamp():.6f}"
        except (ValueError, KeyError, TypeError):  # an out.<token> message has no "at"
            applied = ""
        scheduled = m.at - latency
        lines.append(
            f"{scheduled:.6f}\t{latency * 1000:.3f}\t{applied}\t{m.command_id}\t{m.subject}\n"
        )
    path.write_text("".join(lines))


def message_sizes(batches: list[list[Message]]) -> dict[str, float]:
    msgs = [m for batch in batches for m in batch]
    body = sum(len(b) for _, b, _ in msgs) / len(msgs)
    # what goes over the wire besides the body: subject and the Nats-Msg-Id header
    wire = sum(len(s) + len(b) + len(c) + 30 for s, b, c in msgs) / len(msgs)
    return {"mean_body_bytes": round(body, 1), "mean_message_bytes": round(wire, 1)}


async def saturation(ctx: Context, daemon: Flowd, nc: Client, tag: str) -> dict[str, Any]:
    """Publish every command as fast as possible; measure throughput and daemon resources."""
    sz, s = ctx.sizes, Subjects(daemon.prefix)
    batches = build_messages(s, tag, sz.e2e_flows, sz.producers, sz.e2e_block)
    expected = sum(len(b) for b in batches)
    base = (await natsutil.stream_state(nc, s.evt_stream)).messages
    metrics_before = daemon.metrics()
    group = ProducerGroup([Job(ctx.servers.nats_url, batch) for batch in batches])
    await group.start()
    cpu = CpuMeter(daemon.pid, ctx.servers)
    peak_rss = [0]

    def sample_rss() -> None:
        peak_rss[0] = max(peak_rss[0], procstat.memory_kb(daemon.pid).get("VmRSS", 0))

    cpu.start()
    progress = natsutil.Progress()
    group.go()
    try:
        state = await natsutil.wait_for_count(
            nc,
            s.evt_stream,
            base + expected,
            timeout=60 + expected / 50,
            every=0.1,
            on_sample=progress,
            tick=sample_rss,
            stall=30,
        )
    except TimeoutError as exc:
        group.kill()
        raise await ctx.stalled(daemon, nc, str(exc)) from exc
    reports = await group.results(timeout=180)
    cpu.stop()
    done_local = time.time()
    memory = procstat.memory_kb(daemon.pid)
    producers = summarize(reports)
    cpu_used = cpu.used({"producers": producers["cpu_s"]})
    end, end_source = done_local, "harness poll (local clock)"
    if state.last_ts is not None and producers["first_send"] < state.last_ts < done_local + 1:
        end, end_source = state.last_ts, "events stream last_ts (server clock)"
    wall = end - producers["first_send"]
    metrics = daemon.metrics()
    applied = _delta(metrics, metrics_before, "flowd_commands_applied_total")
    per_10k = 10_000 / expected
    return {
        "flows": sz.e2e_flows,
        "commands": expected,
        "outcomes": state.messages - base,
        "wall_seconds": round(wall, 3),
        "end_measured_by": end_source,
        "commands_per_s": rate(expected, wall),
        "sustained_10_90_per_s": progress.window_rate(base, expected),
        "producers": producers,
        "daemon_counters": {
            "applied": applied,
            "rejected": _delta(metrics, metrics_before, "flowd_commands_rejected_total"),
            "duplicates": _delta(metrics, metrics_before, "flowd_commands_duplicate_total"),
            "dead_letters": _delta(metrics, metrics_before, "flowd_dead_letters_total"),
            "mean_command_ms": _mean_ms(metrics, metrics_before, "flowd_command_seconds"),
        },
        "message_sizes": message_sizes(batches),
        "resources": {
            "cpu_seconds": cpu_used,
            "cpu_seconds_per_10k_commands": {k: round(v * per_10k, 2) for k, v in cpu_used.items()},
            "flowd_cpu_utilisation": round(cpu_used["flowd"] / wall, 3) if wall > 0 else None,
            "machine_cpu_capacity_s": round(wall * (os.cpu_count() or 1), 2),
            "flowd_peak_rss_kb": memory.get("VmHWM"),
            "flowd_rss_kb_sampled_peak": peak_rss[0],
            "flowd_rss_kb_end": memory.get("VmRSS"),
            "note": "VmHWM is the daemon's lifetime peak RSS (start-up included); CPU is "
            "utime+stime from /proc over first publish -> last event. postgres = postmaster "
            "+ backends (+ reaped children).",
        },
        "timeline": [
            (round(t - producers["first_send"], 2), n - base) for t, n in progress.samples
        ],
    }


def _delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return metric_sum(after, name) - metric_sum(before, name)


def _mean_ms(after: dict[str, float], before: dict[str, float], name: str) -> float | None:
    count = _delta(after, before, f"{name}_count")
    total = _delta(after, before, f"{name}_sum")
    return round(total / count * 1000, 3) if count else None


async def paced(
    ctx: Context, daemon: Flowd, recorder: natsutil.Recorder, offered: float, tag: str
) -> dict[str, Any]:
    """Publish at ``offered`` commands/s for the configured time; latency per command."""
    sz, s = ctx.sizes, Subjects(daemon.prefix)
    flows = max(sz.producers, math.ceil(offered * sz.latency_seconds / len(VERBS)))
    batches = build_messages(s, tag, flows, sz.producers, sz.e2e_block)
    expected = sum(len(b) for b in batches)
    per_producer = offered / sz.producers
    jobs = [
        Job(ctx.servers.nats_url, batch, rate=per_producer, offset=p / offered, stamp_ids=True)
        for p, batch in enumerate(batches)
    ]
    group = ProducerGroup(jobs)
    await group.start()
    first = len(recorder.messages)
    cpu = CpuMeter(daemon.pid, ctx.servers)
    cpu.start()
    with no_gc_pauses():
        t0 = group.go(delay=0.3)
        complete = await recorder.wait(expected, timeout=sz.latency_seconds + 60, start=first)
    cpu.stop()
    reports = await group.results(timeout=120)
    producers = summarize(reports)
    mine = f"{tag}-"  # ("l5" must not take "l50-..." ids)
    got = [m for m in recorder.messages[first:] if m.command_id and m.command_id.startswith(mine)]
    latencies = [m.at - int(m.command_id.rsplit("@", 1)[1]) / 1e9 for m in got if m.command_id]
    write_latencies(ctx.out / f"latency-{tag}.tsv", got, latencies)
    last = max((m.at for m in got), default=t0)
    return {
        "offered_per_s": round(offered, 1),
        "seconds": sz.latency_seconds,
        "commands": expected,
        "outcomes": len(got),
        "missing": expected - len(got),
        "complete": complete,
        "achieved_per_s": rate(len(got), last - t0),
        "latency": summary_ms(latencies),
        "producers": producers,
        # t0 -> last event; the harness's share includes its P.evt.> subscription
        "cpu_seconds": cpu.used({"producers": producers["cpu_s"]}),
        "wall_seconds": round(last - t0, 2),
        "mean_event_bytes": round(sum(len(m.data) for m in got) / len(got), 1) if got else None,
    }


async def run(ctx: Context, *, latency: bool = True) -> dict[str, Any]:
    """Saturation (with resources), then, with ``latency``, the paced runs; ``--profile``
    adds an unmeasured py-spy pass of each kind."""
    sz = ctx.sizes
    async with ctx.daemon("e2e") as (daemon, _dsn), ctx.nats() as nc:
        result: dict[str, Any] = {"daemon_settings": daemon.settings()}
        print(f"  saturation: {sz.e2e_flows} flows x 4 commands")
        sat = await saturation(ctx, daemon, nc, "sat")
        result["saturation"] = sat
        ctx.shared["saturation_per_s"] = sat["commands_per_s"]
        ctx.shared["command_bytes"] = sat["message_sizes"]["mean_message_bytes"]
        print(f"    {sat['commands_per_s']} commands/s ({sat['wall_seconds']} s)")
        if ctx.profile:
            result["profile"] = await _profiled(
                ctx, daemon, "saturation", lambda: saturation(ctx, daemon, nc, "prof")
            )
        if latency:
            recorder = await natsutil.Recorder().start(
                nc, f"{daemon.prefix}.evt.>", f"{daemon.prefix}.out.>"
            )
            try:
                result["latency"] = await _latency_runs(ctx, daemon, recorder, sat)
                if ctx.profile:
                    low = sz.latency_fractions[0] * sat["commands_per_s"]
                    result["profile_paced"] = await _profiled(
                        ctx, daemon, "paced", lambda: paced(ctx, daemon, recorder, low, "pl")
                    )
            finally:
                await recorder.stop()
        result["daemon_warnings"] = daemon.warnings()
    return result


async def _latency_runs(
    ctx: Context, daemon: Flowd, recorder: natsutil.Recorder, sat: dict[str, Any]
) -> list[dict[str, Any]]:
    runs = []
    saturated = sat["commands_per_s"]
    rates = ctx.sizes.latency_rates or [f * saturated for f in ctx.sizes.latency_fractions]
    for offered in rates:
        fraction = round(offered / saturated, 3)
        print(f"  latency at {fraction:.0%}: {offered:.0f} commands/s")
        await asyncio.sleep(0.5)  # let the previous run's tail settle
        run = await paced(ctx, daemon, recorder, offered, f"l{int(fraction * 100)}")
        run["fraction"] = fraction
        lat = run["latency"]
        print(f"    p50 {lat.get('p50_ms')} ms, p99 {lat.get('p99_ms')} ms")
        runs.append(run)
    sizes = [r["mean_event_bytes"] for r in runs if r["mean_event_bytes"]]
    if sizes:
        ctx.shared["event_bytes"] = round(sum(sizes) / len(sizes), 1)
    return runs


async def _profiled(
    ctx: Context, daemon: Flowd, label: str, work: Callable[[], Awaitable[dict[str, Any]]]
) -> dict[str, Any]:
    """Run ``work`` once more with py-spy attached (its numbers are not the measured ones)."""
    raw = ctx.out / f"profile-{label}.txt"
    proc = pyspy.start(daemon.pid, raw)
    if proc is None:
        return {"error": "py-spy not found: pip install py-spy"}
    print(f"  profiled pass: {label} (py-spy)")
    await asyncio.sleep(1)
    started = time.time()
    try:
        res = await work()
    finally:
        elapsed = time.time() - started
        err = await asyncio.to_thread(pyspy.stop, proc)
    if not raw.exists():
        return {"error": f"py-spy wrote nothing: {err}"}
    achieved = res.get("commands_per_s") or res.get("achieved_per_s")
    cpu = res.get("cpu_seconds") or res.get("resources", {}).get("cpu_seconds", {})
    return {
        "raw_stacks": str(raw),
        "commands_per_s_while_profiled": achieved,
        "flowd_cpu_ms_per_command_while_profiled": round(
            1000 * cpu.get("flowd", 0) / max(1, res.get("outcomes", 0)), 2
        ),
        "summary": pyspy.summarize(raw, elapsed),
    }

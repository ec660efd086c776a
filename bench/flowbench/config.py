"""Scenario sizes: the full run and the smoke run (CI: must finish well under a minute)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ALL_SCENARIOS = (
    "e2e",
    "pgbench",
    "jetstream",
    "ingest",
    "scale",
    "resources",
    "waits",
    "replicas",
)


@dataclass(frozen=True)
class Sizes:
    """How big each scenario is. ``--set name=value`` overrides one field."""

    # 1. e2e: flows x 4 commands (create, start, update, finish), 2 producer processes
    e2e_flows: int = 10_000
    e2e_block: int = 64  # a producer sends creates, starts, updates, finishes per block
    latency_fractions: tuple[float, ...] = (0.25, 0.5, 0.9)
    # instead of fractions of this run's saturation: these offered rates (commands/s), so
    # two builds are compared at the same load (empty: use latency_fractions)
    latency_rates: tuple[float, ...] = ()
    latency_seconds: float = 20.0
    producers: int = 2
    # 2. limits
    pgbench_seconds: int = 30
    pgbench_flows: int = 10_000
    pgbench_clients: int = 10
    jetstream_messages: int = 100_000
    # 3. ingest: mirrored flows x runs x 2 observations (running, succeeded)
    ingest_flows: int = 1_000
    ingest_runs: int = 100
    # 4. scale
    scale_flows: int = 1_000_000
    scale_owners: int = 10_000
    scale_calls: int = 2_000
    scale_warmup: int = 100
    # 6. waits
    waits_bulk: int = 100_000
    waits_bulk_chunk: int = 500
    waits_timers: int = 200
    waits_timer_spread: float = 5.0
    waits_signals: int = 200
    waits_signal_rate: float = 50.0

    def override(self, assignments: list[str]) -> Sizes:
        """A copy with ``name=value`` assignments applied (types follow the field's)."""
        changes: dict[str, Any] = {}
        fields = {f.name: f for f in dataclasses.fields(self)}
        for item in assignments:
            name, _, raw = item.partition("=")
            if name not in fields or not raw:
                raise SystemExit(f"--set {item!r}: expected one of {', '.join(fields)} = value")
            current = getattr(self, name)
            if isinstance(current, tuple):
                changes[name] = tuple(float(v) for v in raw.split(","))
            else:
                changes[name] = type(current)(raw)
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FULL = Sizes()
SMOKE = Sizes(
    e2e_flows=300,
    latency_seconds=3.0,
    pgbench_seconds=2,
    pgbench_flows=2_000,
    jetstream_messages=5_000,
    ingest_flows=30,
    ingest_runs=10,
    scale_flows=10_000,
    scale_owners=100,
    scale_calls=300,
    scale_warmup=30,
    waits_bulk=2_000,
    waits_timers=50,
    waits_timer_spread=1.5,
    waits_signals=50,
    waits_signal_rate=100.0,
)

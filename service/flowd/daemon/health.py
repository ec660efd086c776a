"""Counters for what the daemon did, and the HTTP endpoints that show them.

``/healthz`` answers 200 while the event loop runs; ``/readyz`` 200 only while PostgreSQL and
NATS answer (503 otherwise, with the reason), with details such as parked outbox rows (which
do not make it unready); ``/metrics`` is Prometheus text format. A tiny
asyncio HTTP/1.0 server: three read-only endpoints do not justify a web framework.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Final

BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
Labels = tuple[tuple[str, str], ...]


class Metrics:
    """Counters and one latency histogram, in memory; tests read them directly."""

    def __init__(self) -> None:
        self.counters: dict[str, dict[Labels, float]] = defaultdict(lambda: defaultdict(float))
        self._hist: dict[str, list[int]] = {}
        self._hist_sum: dict[str, float] = defaultdict(float)
        self.gauges: dict[str, Callable[[], Awaitable[float]]] = {}

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        self.counters[name][tuple(sorted(labels.items()))] += amount

    def value(self, name: str, **labels: str) -> float:
        """A counter's value (summed over label sets not named)."""
        wanted = set(labels.items())
        return sum(v for k, v in self.counters[name].items() if wanted <= set(k))

    def observe(self, name: str, seconds: float) -> None:
        counts = self._hist.setdefault(name, [0] * (len(BUCKETS) + 1))
        counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self._hist_sum[name] += seconds

    async def render(self) -> str:
        lines: list[str] = []
        for name, series in sorted(self.counters.items()):
            lines.append(f"# TYPE flowd_{name} counter")
            for labels, value in sorted(series.items()):
                lines.append(f"flowd_{name}{_labels(labels)} {value:g}")
        for name, counts in sorted(self._hist.items()):
            lines.append(f"# TYPE flowd_{name} histogram")
            total = 0
            for bound, count in zip((*BUCKETS, float("inf")), counts, strict=True):
                total += count
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                lines.append(f'flowd_{name}_bucket{{le="{le}"}} {total}')
            lines.append(f"flowd_{name}_sum {self._hist_sum[name]:.6f}")
            lines.append(f"flowd_{name}_count {total}")
        for name, read in sorted(self.gauges.items()):
            with contextlib.suppress(Exception):
                value = await read()
                lines.append(f"# TYPE flowd_{name} gauge")
                lines.append(f"flowd_{name} {value:g}")
        return "\n".join(lines) + "\n"


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}"


#: (None when ready, else the reason; detail lines shown either way)
Readiness = Callable[[], Awaitable[tuple[str | None, str]]]


async def serve_http(host: str, port: int, metrics: Metrics, ready: Readiness) -> asyncio.Server:
    """Start the endpoints; the caller closes the returned server."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), timeout=5)
            parts = request.decode("latin-1").split()
            path = parts[1] if len(parts) >= 2 else ""
            while (await asyncio.wait_for(reader.readline(), timeout=5)) not in (b"\r\n", b""):
                pass
            status, body, ctype = 200, "ok\n", "text/plain"
            if path == "/readyz":
                reason, detail = await ready()
                if reason is not None:
                    status, body = 503, f"not ready: {reason}\n"
                body += f"{detail}\n" if detail else ""
            elif path == "/metrics":
                body, ctype = await metrics.render(), "text/plain; version=0.0.4"
            elif path != "/healthz":
                status, body = 404, "not found\n"
            data = body.encode()
            reason_phrase = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(
                f"HTTP/1.0 {status} {reason_phrase}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    return await asyncio.start_server(handle, host, port)

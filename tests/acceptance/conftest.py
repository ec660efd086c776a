"""Fixtures that start the real daemon against real NATS and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import DaemonProcess, Wire, wire


@pytest.fixture
def make_daemon(
    nats_url: str, database_url: str, prefix: str, tmp_path: Path
) -> Iterator[Callable[..., DaemonProcess]]:
    """Start ``flowd run`` processes (all on this test's database and prefix)."""
    made: list[DaemonProcess] = []

    def make(*args: str, database: str | None = None, **env: Any) -> DaemonProcess:
        d = DaemonProcess(
            nats_url,
            database or database_url,
            prefix,
            tmp_path,
            **{k: str(v) for k, v in env.items()},
        )
        made.append(d)
        d.start(*args)
        d.wait_ready()
        return d

    yield make
    for d in made:
        d.kill()


@pytest.fixture
def daemon(make_daemon: Callable[..., DaemonProcess]) -> DaemonProcess:
    return make_daemon()


@pytest.fixture
async def nats_wire(nats_url: str, prefix: str) -> AsyncIterator[Wire]:
    async with wire(nats_url, prefix) as w:
        yield w

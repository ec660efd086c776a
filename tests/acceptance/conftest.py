"""Fixtures that start the real daemon against real NATS and PostgreSQL."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flowd.embedded import EmbeddedNats
from tests.support.daemon import DaemonProcess, Wire, free_port, wire


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


@pytest.fixture
def nats_with(tmp_path: Path) -> Iterator[Callable[[str], int]]:
    """Start a real nats-server with the given configuration text (on a free loopback port,
    which overrides any ``listen`` in it); returns its port."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(config: str) -> int:
        port = free_port()
        conf = tmp_path / f"nats-{port}.conf"
        conf.write_text(config + "\n")
        cmd = [EmbeddedNats.binary(), "-c", str(conf), "-a", "127.0.0.1", "-p", str(port)]
        log_path = tmp_path / f"nats-{port}.log"
        with log_path.open("wb") as log:
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=log))
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return port
            except OSError:
                if time.monotonic() > deadline or procs[-1].poll() is not None:
                    raise AssertionError(log_path.read_text()) from None
                time.sleep(0.05)

    yield start
    for p in procs:
        p.kill()
        p.wait()

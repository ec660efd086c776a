"""Run the real ``flowd run`` as a subprocess and talk to it over raw NATS, as a user would."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

from flowd.bus.subjects import Subjects


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DaemonProcess:
    """One ``flowd run`` child process; restartable, killable."""

    def __init__(
        self, nats_url: str, database_url: str, prefix: str, log_dir: Path, **env: str
    ) -> None:
        self.nats_url = nats_url
        self.database_url = database_url
        self.prefix = prefix
        self.subjects = Subjects(prefix)
        self.http_port = free_port()
        self.log_path = log_dir / f"flowd-{prefix}-{uuid.uuid4().hex[:6]}.log"
        self.extra_env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *args: str) -> DaemonProcess:
        env = {
            **os.environ,
            "NATS_URL": self.nats_url,
            "DATABASE_URL": self.database_url,
            "FLOWD_PREFIX": self.prefix,
            "FLOWD_HTTP_PORT": str(self.http_port),
            "FLOWD_LOG_FORMAT": "json",
            **self.extra_env,
        }
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flowd", "run", *args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"flowd exited {self.proc.returncode}:\n{self.logs()}")
            with suppress(OSError), urllib.request.urlopen(self.url("/readyz"), timeout=1) as r:
                if r.status == 200:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"flowd not ready in {timeout}s:\n{self.logs()}")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url("/metrics"), timeout=5) as r:
            return str(r.read().decode())

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-8000:]

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with suppress(ValueError):
                out.append(json.loads(line))
        return out


class Wire:
    """Raw NATS access for a test, per subjects.md (no flowd client code involved)."""

    def __init__(self, nc: Client, prefix: str) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.s = Subjects(prefix)

    async def publish(
        self, subject: str, body: Any = None, *, cid: str | None = None, raw: bytes | None = None
    ) -> str:
        cid = cid or uuid.uuid4().hex
        data = raw if raw is not None else json.dumps(body or {}).encode()
        await self.js.publish(subject, data, headers={"Nats-Msg-Id": cid})
        return cid

    async def publish_bytes(self, subject: bytes, headers: bytes, body: bytes) -> None:
        """Publish what nats-py would refuse to send or mangle (a subject or header that is
        not UTF-8), over a raw connection, and wait until the server has it (PING/PONG)."""
        assert self.nc.connected_url is not None
        url = self.nc.connected_url
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        try:
            await reader.readline()  # INFO
            hdr = b"NATS/1.0\r\n" + headers + b"\r\n"
            writer.write(
                b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"protocol":1}\r\n'
                + b"HPUB %s %d %d\r\n" % (subject, len(hdr), len(hdr) + len(body))
                + hdr
                + body
                + b"\r\nPING\r\n"
            )
            await writer.drain()
            line = await reader.readline()
            assert line == b"PONG\r\n", line
        finally:
            writer.close()

    async def request(
        self, op: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> Any:
        reply = await self.nc.request(
            self.s.api(op), json.dumps(body or {}).encode(), timeout=10, headers=headers
        )
        return json.loads(reply.data)

    async def stream_msgs(self, stream: str, subject: str = ">") -> list[Msg]:
        """Every message currently in ``stream`` on ``subject`` (an ephemeral consumer).
        A cluster that just lost a node may answer 503 for a moment: read again."""
        for attempt in range(10):
            try:
                return await self._read_stream(stream, subject)
            except nats.js.errors.Error:
                if attempt == 9:
                    raise
                await asyncio.sleep(0.5)
        raise AssertionError("unreachable")

    async def _read_stream(self, stream: str, subject: str) -> list[Msg]:
        # Read the whole stream (its message count is exact; per-subject counts of a stream
        # with thousands of subjects are not) and keep the subjects asked for.
        info = await self.js.stream_info(stream)
        expected = info.state.messages
        if expected == 0:
            return []
        sub = await self.js.pull_subscribe(
            f"{self.s.prefix}.>",
            stream=stream,
            config=ConsumerConfig(ack_policy=AckPolicy.NONE),  # no max_ack_pending cap
        )
        out: list[Msg] = []
        deadline = time.monotonic() + 60
        try:
            while len(out) < expected and time.monotonic() < deadline:
                with suppress(TimeoutError, nats.errors.TimeoutError):
                    out.extend(await sub.fetch(min(256, expected - len(out)), timeout=1))
        finally:
            await sub.unsubscribe()
        head = subject.removesuffix(">")
        return [m for m in out if subject == ">" or m.subject.startswith(head)]

    async def events(self) -> list[dict[str, Any]]:
        msgs = await self.stream_msgs(self.s.evt_stream, self.s.evt_all)
        return [json.loads(m.data) for m in msgs]

    async def outcomes(self) -> list[dict[str, Any]]:
        msgs = await self.stream_msgs(self.s.evt_stream, self.s.out_all)
        return [json.loads(m.data) for m in msgs]

    async def wait_for(self, predicate: Any, seconds: float = 20, every: float = 0.1) -> Any:
        """Poll ``predicate()`` (async) until it returns something truthy."""
        deadline = time.monotonic() + seconds
        while True:
            value = await predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met in {seconds}s; last value {value!r}")
            await asyncio.sleep(every)

    async def delete_streams(self) -> None:
        s = self.s
        for name in (s.cmd_stream, s.obs_stream, s.evt_stream, s.wake_stream, s.dlq_stream):
            with suppress(Exception):
                await self.js.delete_stream(name)


@asynccontextmanager
async def wire(nats_url: str, prefix: str) -> AsyncIterator[Wire]:
    nc = await nats.connect(nats_url)
    w = Wire(nc, prefix)
    try:
        yield w
    finally:
        await w.delete_streams()
        await nc.close()

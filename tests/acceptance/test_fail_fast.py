"""Fail fast, stop always (issue 17, Seen 5): the real ``flowd run`` against bad servers.

Credentials or TLS refused: one error line, exit 1, at once. Unreachable (NATS, PostgreSQL)
or waiting for the migration lock: SIGTERM/SIGINT end the process within its bound (15 s,
README), and the log stays small. Real nats-servers with real configurations; certificates
made here with ``openssl``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from tests.support.daemon import DaemonProcess, free_port

pytestmark = [pytest.mark.acceptance, pytest.mark.postgres, pytest.mark.nats]

#: The documented bound from signal to exit (README: 15 s), with slack for a loaded machine.
STOP_BOUND = 25

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, signed by it."""
    d = tmp_path_factory.mktemp("certs")
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=flowd test CA", cwd=d,
    )  # fmt: skip
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1", cwd=d,
    )  # fmt: skip
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf", cwd=d,
    )  # fmt: skip
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "client.key", "-out", "client.csr",
        "-subj", "/CN=flowd", cwd=d,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "client.pem", "-days", "2", cwd=d,
    )  # fmt: skip
    return d


def _daemon(nats_url: str, database_url: str, tmp_path: Path, **env: str) -> DaemonProcess:
    return DaemonProcess(nats_url, database_url, f"t{uuid.uuid4().hex[:12]}", tmp_path, **env)


def refused_at_once(d: DaemonProcess, *words: str) -> str:
    """Exit 1 by itself (well before anyone would give up), one error line, no traceback."""
    assert d.proc is not None
    assert d.proc.wait(30) == 1, d.logs()
    errors = [e for e in d.log_events() if e.get("level") == "error"]
    assert [e["event"] for e in errors] == ["refused_to_start"], d.logs()
    assert "Traceback" not in d.logs()
    message = str(errors[0]["error"])
    for word in words:
        assert word in message, message
    return message


def stops_within_bound(d: DaemonProcess, sig: signal.Signals = signal.SIGTERM) -> int:
    """The signal ends the process (no hang); returns its exit code."""
    assert d.proc is not None
    assert d.proc.poll() is None, d.logs()  # still waiting, as it should
    d.proc.send_signal(sig)
    try:
        return d.proc.wait(STOP_BOUND)
    except subprocess.TimeoutExpired:
        pytest.fail(f"flowd did not stop within {STOP_BOUND}s of {sig.name}:\n{d.logs()}")


def wait_for_log(d: DaemonProcess, event: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not any(e.get("event") == event for e in d.log_events()):
        assert time.monotonic() < deadline, f"no {event} in the log:\n{d.logs()}"
        assert d.proc is not None
        assert d.proc.poll() is None, d.logs()
        time.sleep(0.05)


def test_wrong_nats_password_is_one_line_and_exit_1(
    nats_with: Callable[[str], int], database_url: str, tmp_path: Path
) -> None:
    port = nats_with('authorization { user: flowd, password: "s3cret-right" }')
    d = _daemon(f"nats://flowd:s3cret-wrong@127.0.0.1:{port}", database_url, tmp_path).start()
    refused_at_once(d, "authorization violation", f"127.0.0.1:{port}")
    assert "s3cret" not in d.log_path.read_text()  # no password in the log


@needs_openssl
def test_untrusted_tls_certificate_is_one_line_and_exit_1(
    nats_with: Callable[[str], int], certs: Path, database_url: str, tmp_path: Path
) -> None:
    port = nats_with(f'tls {{ cert_file: "{certs}/server.pem", key_file: "{certs}/server.key" }}')
    d = _daemon(f"tls://127.0.0.1:{port}", database_url, tmp_path).start()
    refused_at_once(d, "TLS", "CERTIFICATE_VERIFY_FAILED")


@needs_openssl
def test_mtls_without_a_client_certificate_is_one_line_and_exit_1(
    nats_with: Callable[[str], int], certs: Path, database_url: str, tmp_path: Path
) -> None:
    port = nats_with(
        f'tls {{ cert_file: "{certs}/server.pem", key_file: "{certs}/server.key", '
        f'ca_file: "{certs}/ca.pem", verify: true }}'
    )
    # the server is trusted; only the client certificate is missing
    d = _daemon(
        f"tls://127.0.0.1:{port}", database_url, tmp_path, NATS_TLS_CA=str(certs / "ca.pem")
    ).start()
    refused_at_once(d, "TLS")


@needs_openssl
def test_mtls_with_a_client_certificate_serves_flowd_and_flowctl(
    nats_with: Callable[[str], int], certs: Path, database_url: str, tmp_path: Path
) -> None:
    """The other side of the refusals above: with the right files, both work."""
    port = nats_with(
        f'jetstream {{ store_dir: "{tmp_path / "js"}" }}\n'
        f'tls {{ cert_file: "{certs}/server.pem", key_file: "{certs}/server.key", '
        f'ca_file: "{certs}/ca.pem", verify: true }}'
    )
    files = {"CA": "ca.pem", "CERT": "client.pem", "KEY": "client.key"}
    env = {f"NATS_TLS_{k}": str(certs / v) for k, v in files.items()}
    d = _daemon(f"tls://127.0.0.1:{port}", database_url, tmp_path, **env).start()
    try:
        d.wait_ready()
        made = subprocess.run(
            [sys.executable, "-m", "flowd.cli.flowctl", "--json", "create",
             "--controller", "c", "--goal", "g", "--owner", "o"],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, **env, "NATS_URL": f"tls://127.0.0.1:{port}",
                 "FLOWD_PREFIX": d.prefix},
        )  # fmt: skip
        assert made.returncode == 0, made.stdout + made.stderr
    finally:
        d.kill()


def test_unreachable_nats_is_retried_quietly_and_sigterm_ends_it(
    database_url: str, tmp_path: Path
) -> None:
    d = _daemon(f"nats://127.0.0.1:{free_port()}", database_url, tmp_path).start()
    wait_for_log(d, "schema_migrated")  # PostgreSQL done: now it is connecting to NATS
    time.sleep(8)  # (it used to write ~37 lines a second here)
    assert stops_within_bound(d) == 0
    lines = d.log_path.read_text().splitlines()
    assert len(lines) < 20, d.logs()
    waiting = [e for e in d.log_events() if e.get("event") == "waiting_for"]
    assert waiting, d.logs()
    assert waiting[0]["dependency"] == "nats"


def test_unreachable_postgres_sigint_ends_it(nats_url: str, tmp_path: Path) -> None:
    d = _daemon(nats_url, f"postgresql://postgres@127.0.0.1:{free_port()}/x", tmp_path).start()
    wait_for_log(d, "waiting_for")
    assert stops_within_bound(d, signal.SIGINT) == 0


def test_sigterm_while_a_postgres_connect_hangs(nats_url: str, tmp_path: Path) -> None:
    """A server that accepts the connection and never answers (a black hole, a stuck
    proxy): the connect itself is abandoned on the signal."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # never accepted: the TCP handshake completes, nothing answers
        port = silent.getsockname()[1]
        d = _daemon(nats_url, f"postgresql://postgres@127.0.0.1:{port}/x", tmp_path).start()
        time.sleep(3)  # inside asyncpg's connect (its own timeout is 60 s)
        assert stops_within_bound(d) == 0


def test_postgres_refusing_the_role_is_one_line_and_exit_1(
    nats_url: str, database_url: str, tmp_path: Path
) -> None:
    head, _, tail = database_url.partition("://")
    dsn = f"{head}://no_such_role_{uuid.uuid4().hex[:6]}@{tail.split('@', 1)[-1]}"
    d = _daemon(nats_url, dsn, tmp_path).start()
    refused_at_once(d, "PostgreSQL refused flowd")


async def test_sigterm_while_waiting_for_the_migration_lock(
    nats_url: str, database_url: str, tmp_path: Path
) -> None:
    from flowd.store.postgres import MIGRATION_LOCK_KEY

    holder = await asyncpg.connect(database_url)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        d = _daemon(nats_url, database_url, tmp_path).start()
        waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        deadline = time.monotonic() + 30
        while not await holder.fetchval(waiting):
            assert time.monotonic() < deadline, d.logs()
            await asyncio.sleep(0.05)
        assert await asyncio.to_thread(stops_within_bound, d) == 0
    finally:
        await holder.close()

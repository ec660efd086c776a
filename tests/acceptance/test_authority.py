"""Authority: owner claims (``FLOWD_ENFORCE_OWNER``) and every NATS authentication method
flowd, flowctl and the client speak, on the real daemon and real servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nkeys
import pytest

from flowd.client import FlowClient
from flowd.core import owner
from tests.support.daemon import DaemonProcess, Wire

pytestmark = [pytest.mark.acceptance, pytest.mark.postgres, pytest.mark.nats]

MASTER = "a" * 64
CREATE = {"controller_id": "ctl", "goal": "g"}


def key(who: str) -> bytes:
    return owner.owner_key(MASTER.encode(), who)


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "owner-keys"
    path.write_text(f"# current first\n{MASTER}\n{'b' * 64}\n")
    return path


@pytest.fixture
def enforcing(make_daemon: Callable[..., DaemonProcess], keys_file: Path) -> DaemonProcess:
    return make_daemon(FLOWD_ENFORCE_OWNER="1", FLOWD_OWNER_KEYS_FILE=str(keys_file))


async def test_only_the_owner_may_act_on_its_flows(
    enforcing: DaemonProcess, nats_wire: Wire, nats_url: str, prefix: str
) -> None:
    alice = FlowClient(nats_wire.nc, prefix=prefix, owner="alice", owner_key=key("alice"))
    bob = FlowClient(nats_wire.nc, prefix=prefix, owner="bob", owner_key=key("bob"))
    fid = str(uuid.uuid4())
    made = await alice.create("ctl", "g", "alice", flow_id=fid, wait=True)
    assert not isinstance(made, str)
    assert made.status == "applied"
    started = await alice.command("start", fid, {}, wait=True)
    assert not isinstance(started, str)
    assert started.status == "applied"

    stolen = await bob.command("update", fid, {"patch": {"x": 1}}, wait=True)
    assert not isinstance(stolen, str)
    assert (stolen.status, stolen.code) == ("rejected", "forbidden")
    assert stolen.details == {"reason": "not_owner"}
    squatted = await bob.create("ctl", "g", "alice", wait=True)  # bob may not create for alice
    assert not isinstance(squatted, str)
    assert (squatted.code, squatted.details) == ("forbidden", {"reason": "not_owner"})

    # the same over P.api.*: signed over the command's subject (P.cmd.<id>.<verb>)
    body = {"patch": {"x": 2}}
    data = json.dumps(body).encode()
    subject = nats_wire.s.command(fid, "update")
    for who, cid, code in (("bob", "api-1", "forbidden"), ("alice", "api-2", None)):
        headers = {
            "Nats-Msg-Id": cid,
            "Flowd-Owner": who,
            "Flowd-Owner-Signature": owner.sign(key(who), who, cid, subject, data),
        }
        reply = await nats_wire.request(f"cmd.{fid}.update", body, headers=headers)
        assert (reply.get("error") or {}).get("code") == code, reply
    unsigned = await nats_wire.request(f"cmd.{fid}.update", body)
    assert unsigned["error"]["details"] == {"reason": "missing_claim"}
    flow = await alice.get(fid)
    assert (flow["revision"], flow["state_json"]) == (2, {"x": 2})


async def test_commands_without_a_valid_claim_are_forbidden(
    enforcing: DaemonProcess, nats_wire: Wire, prefix: str
) -> None:
    s, w = nats_wire.s, nats_wire
    fid = str(uuid.uuid4())
    body = json.dumps({**CREATE, "owner_session_key": "alice"}).encode()
    subject = s.command(fid, "create")
    signature = owner.sign(key("alice"), "alice", "c-ok", subject, body)
    cases: dict[str, tuple[dict[str, str], bytes]] = {
        "c-none": ({}, body),
        "c-forged": ({"Flowd-Owner": "alice", "Flowd-Owner-Signature": "v1=" + "0" * 64}, body),
        # alice's signature of another command id (a replay under a new id)
        "c-replay": ({"Flowd-Owner": "alice", "Flowd-Owner-Signature": signature}, body),
        # not ASCII (once a TypeError in compare_digest that took the daemon down)
        "c-accent": ({"Flowd-Owner": "alice", "Flowd-Owner-Signature": "v1=\u00e9"}, body),
    }
    for cid, (headers, data) in cases.items():
        await w.js.publish(subject, data, headers={"Nats-Msg-Id": cid, **headers})
    outcomes = await w.wait_for(lambda: _outcomes(w, 4))
    reasons = {o["command_id"]: (o["code"], o["details"]["reason"]) for o in outcomes}
    assert reasons == {
        "c-none": ("forbidden", "missing_claim"),
        "c-forged": ("forbidden", "bad_signature"),
        "c-replay": ("forbidden", "bad_signature"),
        "c-accent": ("forbidden", "bad_signature"),
    }
    # a forbidden command does not take its id: whoever cannot sign as alice cannot block
    # alice's ids. "c-none" was refused above; signed by alice (over P.api: JetStream would
    # drop the re-published id as a duplicate) it applies.
    signature = owner.sign(key("alice"), "alice", "c-none", subject, body)
    claim = {"Nats-Msg-Id": "c-none", "Flowd-Owner": "alice", "Flowd-Owner-Signature": signature}
    reply = await w.request(f"cmd.{fid}.create", json.loads(body), headers=claim)
    assert reply["ok"], reply
    events = await w.wait_for(lambda: _events(w, 1))
    assert (events[0]["kind"], events[0]["command_id"]) == ("created", "c-none")


async def test_the_engine_still_wakes_owned_flows(
    enforcing: DaemonProcess, nats_wire: Wire
) -> None:
    """Commands flowd makes itself (timers) carry no claim and need none."""
    alice = FlowClient(
        nats_wire.nc, prefix=nats_wire.s.prefix, owner="alice", owner_key=key("alice")
    )
    fid = str(uuid.uuid4())
    await alice.create("ctl", "g", "alice", flow_id=fid, wait=True)
    await alice.command("start", fid, {}, wait=True)
    at = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    await alice.command("wait", fid, {"wait_json": {"kind": "timer", "at": at}}, wait=True)
    events = await nats_wire.wait_for(lambda: _events(nats_wire, 4))
    assert events[-1]["kind"] == "resumed"
    assert events[-1]["command_id"].startswith("flowd:wake:")


def test_flowctl_signs_with_an_owner_key(
    enforcing: DaemonProcess, keys_file: Path, nats_url: str, prefix: str, tmp_path: Path
) -> None:
    derived = flowctl("owner-key", "alice", "--master-key-file", str(keys_file))
    assert derived.returncode == 0, derived.stderr
    assert bytes.fromhex(derived.stdout.strip()) == key("alice")
    key_file = tmp_path / "alice.key"
    key_file.write_text(derived.stdout)
    env = {"NATS_URL": nats_url, "FLOWD_PREFIX": prefix}
    as_alice = ["--as-owner", "alice", "--owner-key-file", str(key_file), "--json"]
    made = flowctl("create", "--controller", "ctl", "--goal", "g", "--owner", "alice", env=env)
    assert made.returncode == 1, made.stdout + made.stderr  # no claim: forbidden
    assert "forbidden" in made.stdout + made.stderr
    made = flowctl(
        *as_alice, "create", "--controller", "ctl", "--goal", "g", "--owner", "alice", env=env
    )
    assert made.returncode == 0, made.stdout + made.stderr


def flowctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flowd.cli.flowctl", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


async def _outcomes(w: Wire, n: int) -> list[dict[str, Any]] | None:
    got = await w.outcomes()
    return got if len(got) >= n else None


async def _events(w: Wire, n: int) -> list[dict[str, Any]] | None:
    got = await w.events()
    return got if len(got) >= n else None


# -- every NATS authentication method: flowd (env), flowctl (flags) ----------------------------


def _nkey_user(tmp_path: Path) -> tuple[str, Path]:
    """(public key, seed file) of a new nkey user."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    path = tmp_path / "user.nk"
    path.write_bytes(seed)
    return nkeys.from_seed(seed).public_key.decode(), path


@pytest.mark.parametrize("method", ["nkey", "token", "password"])
def test_flowd_and_flowctl_speak_each_nats_auth_method(
    method: str,
    nats_with: Callable[[str], int],
    database_url: str,
    prefix: str,
    tmp_path: Path,
) -> None:
    public, seed_file = _nkey_user(tmp_path)
    config = {
        "nkey": f'authorization {{ users: [ {{ nkey: "{public}" }} ] }}',
        "token": 'authorization { token: "s3cret-token" }',
        "password": 'authorization { users: [ { user: "flowd", password: "pw" } ] }',
    }[method]
    port = nats_with(f'jetstream {{ store_dir: "{tmp_path / "js"}" }}\n{config}')
    url, env, flags = {
        "nkey": (
            f"nats://127.0.0.1:{port}",
            {"NATS_NKEY": str(seed_file)},
            ["--nkey", str(seed_file)],
        ),
        "token": (f"nats://s3cret-token@127.0.0.1:{port}", {}, []),
        "password": (f"nats://flowd:pw@127.0.0.1:{port}", {}, []),
    }[method]
    d = DaemonProcess(url, database_url, prefix, tmp_path, **env)
    d.start()
    try:
        d.wait_ready()
        cli = {"NATS_URL": url, "FLOWD_PREFIX": prefix}
        made = flowctl(
            *flags, "--json", "create", "--controller", "c", "--goal", "g", "--owner", "o", env=cli
        )
        assert made.returncode == 0, made.stdout + made.stderr
        fid = json.loads(made.stdout)["flow_id"]
        got = flowctl(*flags, "--json", "get", fid, env=cli)
        assert got.returncode == 0, got.stderr
        assert json.loads(got.stdout)["status"] == "created"
        bare = flowctl("get", fid, env={**cli, "NATS_URL": f"nats://127.0.0.1:{port}"})
        assert bare.returncode == 3, bare.stdout + bare.stderr  # no credentials: refused
        assert "s3cret" not in d.logs()
        assert ":pw@" not in d.logs()
    finally:
        d.kill()

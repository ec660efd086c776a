"""The wait engine keeps going whatever a wake message or a stored wait holds: one bad message
or row is dead-lettered or skipped, never a crash, never a stall for the other flows."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import asyncpg
import pytest

from tests.acceptance.test_waits import at, kinds_of, running, until_kinds
from tests.support.daemon import DaemonProcess, Wire

pytestmark = [pytest.mark.acceptance, pytest.mark.postgres, pytest.mark.nats]

WAITING = ["created", "started", "waiting"]
RESUMED = [*WAITING, "resumed"]


async def _wait_on(w: Wire, fid: str, wait: dict[str, Any]) -> None:
    await w.publish(w.s.command(fid, "wait"), {"wait_json": wait})
    await until_kinds(w, fid, WAITING)


async def _letters(w: Wire, n: int) -> list[Any]:
    async def check() -> list[Any] | None:
        msgs = await w.stream_msgs(w.s.dlq_stream, f"{w.s.prefix}.dlq.wake")
        return msgs if len(msgs) >= n else None

    return await w.wait_for(check)  # type: ignore[no-any-return]


def _alive(d: DaemonProcess) -> None:
    assert d.proc is not None
    assert d.proc.poll() is None, d.logs()


async def test_wake_message_with_nul_is_dead_lettered_and_the_flow_keeps_waiting(
    daemon: DaemonProcess, nats_wire: Wire
) -> None:
    """Defect 3: a NUL in a durable wake message crash-looped the daemon."""
    w = nats_wire
    durable, core = await running(w, 2)
    subject = f"{w.s.prefix}.wake.t-x"
    core_subject = f"orders{uuid.uuid4().hex[:6]}.paid"
    await _wait_on(w, durable, {"kind": "subject", "subject": subject, "correlation_id": "c1"})
    await _wait_on(w, core, {"kind": "subject", "subject": core_subject, "correlation_id": "c2"})
    bad = json.dumps({"correlation_id": "c1", "v": "a\u0000b"}).encode()
    await w.js.publish(subject, bad, headers={"Nats-Msg-Id": "wake-nul"})

    async def core_lettered() -> bool:  # core NATS: repeat until the engine has subscribed
        await w.nc.publish(core_subject, b'{"v": 1}', headers={"Flowd-Correlation-Id": "c\x002"})
        await asyncio.sleep(0.3)
        msgs = await w.stream_msgs(w.s.dlq_stream, f"{w.s.prefix}.dlq.wake")
        return any(m.headers["Flowd-Dlq-Subject"] == core_subject for m in msgs)

    await w.wait_for(core_lettered)
    letters = await _letters(w, 2)
    by_subject = {m.headers["Flowd-Dlq-Subject"]: m for m in letters}
    durable_letter = by_subject[subject]
    assert durable_letter.data == bad
    assert durable_letter.headers["Nats-Msg-Id"] == "dlq-wake-nul"
    assert durable_letter.headers["Flowd-Dlq-Reason"] == (
        "payload refused: v: string contains NUL (\\u0000)"
    )
    assert by_subject[core_subject].headers["Flowd-Dlq-Reason"] == (
        "Flowd-Correlation-Id header contains NUL (\\u0000)"
    )
    await asyncio.sleep(1)
    _alive(daemon)
    assert await kinds_of(w, durable) == WAITING
    assert await kinds_of(w, core) == WAITING
    # The flow still wakes on a good message, and the bad one was acked (no redelivery).
    await w.js.publish(subject, json.dumps({"correlation_id": "c1", "v": "ok"}).encode())
    evs = await until_kinds(w, durable, RESUMED)
    assert evs[-1]["payload"]["cause"]["payload"] == {"correlation_id": "c1", "v": "ok"}
    info = await w.js.consumer_info(w.s.wake_stream, w.s.wake_consumer)
    assert info.num_ack_pending == 0
    _alive(daemon)


async def _sql(database_url: str, query: str, *args: Any) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(query, *args)
    finally:
        await conn.close()


async def test_a_stored_timer_that_cannot_fire_stops_no_other_timer(
    daemon: DaemonProcess, nats_wire: Wire, database_url: str
) -> None:
    """Defect 4 (defence in depth): a timer at year 1, written before the door refused it,
    is stored as -infinity (asyncpg's encoding of datetime.min) and read back naive; it
    stopped every timer and every cancel. Now it fires like any past due time."""
    w = nats_wire
    bad, good, cancelled = await running(w, 3)
    await _wait_on(w, bad, {"kind": "timer", "at": at(3600)})
    await _sql(
        database_url,
        "UPDATE wait_conditions SET due_at = '-infinity' WHERE flow_id = $1",
        uuid.UUID(bad),
    )
    await _wait_on(w, cancelled, {"kind": "manual"})
    await w.publish(w.s.command(good, "wait"), {"wait_json": {"kind": "timer", "at": at(1)}})
    await w.publish(w.s.command(cancelled, "request_cancel"))
    await until_kinds(w, good, RESUMED)
    await until_kinds(w, cancelled, [*WAITING, "cancel_requested", "cancelled"])
    evs = await until_kinds(w, bad, RESUMED)
    assert evs[-1]["payload"]["cause"]["due_at"] == "0001-01-01T00:00:00+00:00"
    _alive(daemon)


async def test_a_stored_bad_subject_breaks_no_other_subject_wait(
    daemon: DaemonProcess, nats_wire: Wire, database_url: str
) -> None:
    """Defect 7 (defence in depth): one stored subject NATS refuses (`..`) aborted the
    subscription refresh for every flow."""
    w = nats_wire
    ids = await running(w, 6)
    bad, others = ids[0], ids[1:]
    await _wait_on(w, bad, {"kind": "subject", "subject": "a.b", "correlation_id": "x"})
    await _sql(
        database_url, "UPDATE wait_conditions SET subject = '..' WHERE flow_id = $1", uuid.UUID(bad)
    )
    base = f"s{uuid.uuid4().hex[:6]}"
    for i, fid in enumerate(others):
        await _wait_on(w, fid, {"kind": "subject", "subject": f"{base}.{i}", "correlation_id": "c"})

    async def all_woken() -> bool:
        for i, fid in enumerate(others):
            if await kinds_of(w, fid) == WAITING:
                await w.nc.publish(f"{base}.{i}", b"{}", headers={"Flowd-Correlation-Id": "c"})
        await asyncio.sleep(0.3)
        return all([await kinds_of(w, fid) == RESUMED for fid in others])

    await w.wait_for(all_woken)
    assert await kinds_of(w, bad) == WAITING
    _alive(daemon)
    skipped = [e for e in daemon.log_events() if e.get("event") == "wait_subject_skipped"]
    assert skipped
    assert skipped[0]["subject"] == ".."


async def test_year_one_and_naive_timers_are_refused_at_the_door(
    daemon: DaemonProcess, nats_wire: Wire
) -> None:
    """Defect 4: a timer at year 1 was accepted and then stopped all timers."""
    w = nats_wire
    [fid, good] = await running(w, 2)
    await until_kinds(w, fid, ["created", "started"])
    cases = {
        "y1": {"kind": "timer", "at": "0001-01-01T00:00:00+00:00"},
        "naive": {"kind": "timer", "at": "2030-01-01T00:00:00"},
        "far": {"kind": "timer", "at": "9999-06-01T00:00:00+00:00"},
    }
    for cid, wait in cases.items():
        await w.publish(w.s.command(fid, "wait"), {"wait_json": wait}, cid=cid)
    await w.publish(w.s.command(good, "wait"), {"wait_json": {"kind": "timer", "at": at(1)}})

    async def outcomes() -> list[dict[str, Any]] | None:
        got = await w.outcomes()
        return got if len(got) >= len(cases) else None

    got = {o["command_id"]: o for o in await w.wait_for(outcomes)}
    assert set(got) == set(cases)
    for o in got.values():
        assert o["code"] == "invalid_input"
        assert "wait_json.at" in o["details"]["errors"], o
    await until_kinds(w, good, RESUMED)
    assert await kinds_of(w, fid) == ["created", "started"]
    _alive(daemon)


WAKE_CASES: dict[str, tuple[bytes, dict[str, str], str]] = {
    "nul-value": (b'{"v": "a\\u0000"}', {}, "payload refused: v: string contains NUL (\\u0000)"),
    "nul-key": (b'{"a\\u0000": 1}', {}, "payload refused: a\\u0000: key contains NUL (\\u0000)"),
    "surrogate": (b'{"v": ["\\ud800"]}', {}, "payload refused: v.0: string contains a lone"),
    "1e400": (b'{"v": 1e400}', {}, "payload refused: v: number beyond the range of a double"),
    "2^64": (b'{"v": 18446744073709551616}', {}, "payload refused: v: integer beyond"),
    "utf-16": ('{"v": 1}'.encode("utf-16"), {}, "payload is not UTF-8 JSON: starts with a UTF-16"),
    "utf-32": ('{"v": 1}'.encode("utf-32"), {}, "payload is not UTF-8 JSON: starts with a UTF-32"),
    "bom": (b'\xef\xbb\xbf{"v": 1}', {}, "payload is not UTF-8 JSON: starts with a UTF-8 byte"),
    "invalid-utf-8": (b'{"v": "\xff"}', {}, "payload is not UTF-8 JSON: invalid UTF-8 at byte 7"),
    "nul-byte-text": (b"text\x00", {}, "payload is not UTF-8 JSON: contains a NUL byte"),
    "deep": (b"[" * 40 + b"]" * 40, {}, "JSON nested deeper than 32 levels"),
    "cid-control": (
        b"{}",
        {"Flowd-Correlation-Id": "c\x01"},
        "Flowd-Correlation-Id header contains a control",
    ),
    "cid-long": (
        b"{}",
        {"Flowd-Correlation-Id": "c" * 201},
        "Flowd-Correlation-Id header is longer",
    ),
    "cid-fffd": (
        b"{}",
        {"Flowd-Correlation-Id": "c\ufffd"},
        "Flowd-Correlation-Id header contains \\ufffd",
    ),
}


async def test_every_wake_message_the_door_refuses_is_a_dead_letter(
    daemon: DaemonProcess, nats_wire: Wire
) -> None:
    w = nats_wire
    [fid] = await running(w)
    subject = f"{w.s.prefix}.wake.m"
    await _wait_on(w, fid, {"kind": "subject", "subject": subject, "correlation_id": "c"})
    for name, (raw, headers, _) in WAKE_CASES.items():
        hdrs = {"Flowd-Correlation-Id": "c", **headers, "Nats-Msg-Id": name}
        await w.js.publish(subject, raw, headers=hdrs)
    letters = await _letters(w, len(WAKE_CASES))
    reasons = {m.headers["Nats-Msg-Id"].removeprefix("dlq-"): m for m in letters}
    assert set(reasons) == set(WAKE_CASES)
    for name, (raw, _, reason) in WAKE_CASES.items():
        assert reasons[name].headers["Flowd-Dlq-Reason"].startswith(reason), name
        assert reasons[name].data == raw
        assert reasons[name].headers["Flowd-Dlq-Subject"] == subject
    assert await kinds_of(w, fid) == WAITING
    await w.js.publish(subject, b"plain text", headers={"Flowd-Correlation-Id": "c"})
    evs = await until_kinds(w, fid, RESUMED)
    assert evs[-1]["payload"]["cause"]["payload"] == "plain text"
    _alive(daemon)

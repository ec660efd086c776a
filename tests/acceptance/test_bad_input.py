"""The bad-input matrix: every hostile class (subjects.md, "What the door refuses") by each verb
that takes the field, over JetStream and over ``P.api.*``. Each case has its exact outcome
(rejected ``invalid_input`` with the JSON path, or a dead letter with the reason); afterwards
nothing was written and the daemon is healthy."""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from dataclasses import dataclass
from typing import Any

import pytest

from tests.acceptance.test_daemon import CREATE
from tests.support.daemon import DaemonProcess, Wire

pytestmark = [pytest.mark.acceptance, pytest.mark.postgres, pytest.mark.nats]

NUM = "__number__"  # replaced by a raw JSON number in the body text
#: hostile class -> (value to inject, path suffix, message fragment)
OBJECT_CLASSES: dict[str, tuple[Any, str, str]] = {
    "nul-value": ({"k1": "a\u0000b"}, ".k1", "string contains NUL (\\u0000)"),
    "nul-key": ({"a\u0000b": 1}, ".a\\u0000b", "key contains NUL (\\u0000)"),
    "surrogate-value": ({"k1": "x\ud800"}, ".k1", "string contains a lone surrogate (\\ud800)"),
    "surrogate-key": ({"\udc00k": 1}, ".\\udc00k", "key contains a lone surrogate (\\udc00)"),
}
NUMBERS = {
    "1e400": ("1e400", "beyond the range of a double"),
    "-1e400": ("-1e400", "beyond the range of a double"),
    "1e309": ("1e309", "beyond the range of a double"),
    "2^64": ("18446744073709551616", "beyond the signed 64-bit range"),
}
STRING_CLASSES = {
    "nul": ("a\u0000b", "string contains NUL (\\u0000)"),
    "surrogate": ("\ud800", "string contains a lone surrogate (\\ud800)"),
}
ENCODINGS: dict[str, tuple[Any, str]] = {
    "utf-16": (lambda t: t.encode("utf-16"), "starts with a UTF-16 byte order mark"),
    "utf-16-le": (lambda t: t.encode("utf-16-le"), "looks like UTF-16-LE"),
    "utf-32": (lambda t: t.encode("utf-32"), "starts with a UTF-32 byte order mark"),
    "utf-32-be": (lambda t: t.encode("utf-32-be"), "looks like UTF-32-BE"),
    "utf-8-bom": (lambda t: b"\xef\xbb\xbf" + t.encode(), "starts with a UTF-8 byte order mark"),
    "invalid-utf-8": (lambda t: t.encode()[:-1] + b'"\xff"}', "invalid UTF-8 at byte"),
}


@dataclass(frozen=True)
class Case:
    cid: str
    verb: str
    where: str  # the subject after "<prefix>.": cmd.<id>.<verb> or obs.<id>
    raw: bytes
    path: str | None  # rejected invalid_input with this path in details.errors ...
    fragment: str  # ... and this in its message; else dead-lettered with this in the reason


def _set(body: dict[str, Any], field: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(body)
    *parents, last = field.split(".")
    node = out
    for p in parents:
        node = node[p]
    node[last] = value
    return out


def _text(body: dict[str, Any], number: str | None = None) -> bytes:
    text = json.dumps(body)
    return (text.replace(f'"{NUM}"', number) if number else text).encode()


def cases(flow: str, mirrored: str) -> list[Case]:
    """The matrix for a running managed ``flow`` and a mirrored one."""
    running = ("cmd", flow)
    # verb -> (base body, object fields, string fields, number fields)
    verbs: dict[str, tuple[dict[str, Any], list[str], list[str], list[str]]] = {
        "create": (CREATE, ["state_json"], ["goal", "controller_id"], []),
        "start": ({}, [], [], ["expected_revision"]),
        "wait": ({"wait_json": {"kind": "signal", "name": "s"}}, ["wait_json"], [], []),
        "resume": ({}, ["state_patch"], [], ["expected_revision"]),
        "finish": ({}, ["final_state"], [], []),
        "fail": ({"reason": "r"}, [], ["reason"], []),
        "request_cancel": ({}, [], [], ["expected_revision"]),
        "cancel": ({}, [], [], ["expected_revision"]),
        "update": ({"patch": {}}, ["patch"], ["next_step"], []),
        "signal": ({"name": "s"}, ["payload"], ["name"], []),
        "observe": (
            {"run_id": "r", "task": "t", "status": "running"},
            ["result_json"],
            ["run_id", "task", "child_session_key"],
            [],
        ),
    }
    verbs["wait"][2].extend(["wait_json.name"])
    out: list[Case] = []

    def where(verb: str) -> str:
        if verb == "observe":
            return f"obs.{mirrored}"
        if verb == "create":  # a new flow each time: a wrongly accepted one would show
            return f"cmd.{uuid.uuid4()}.create"
        return f"{running[0]}.{running[1]}.{verb}"

    for verb, (base, objects, strings, numbers) in verbs.items():
        out += _verb_cases(verb, where, base, objects, strings, numbers)
    return out


def _verb_cases(
    verb: str,
    where: Any,
    base: dict[str, Any],
    objects: list[str],
    strings: list[str],
    numbers: list[str],
) -> list[Case]:
    out = []
    for field in objects:
        for name, (value, suffix, fragment) in OBJECT_CLASSES.items():
            raw = _text(_set(base, field, value))
            out.append(
                Case(f"{verb}.{field}.{name}", verb, where(verb), raw, field + suffix, fragment)
            )
        for name, (number, fragment) in NUMBERS.items():
            raw = _text(_set(base, field, {"n": NUM}), number)
            out.append(
                Case(f"{verb}.{field}.{name}", verb, where(verb), raw, f"{field}.n", fragment)
            )
    for field in strings:
        for name, (value, fragment) in STRING_CLASSES.items():
            raw = _text(_set(base, field, value))
            out.append(Case(f"{verb}.{field}.{name}", verb, where(verb), raw, field, fragment))
    for field in numbers:
        for name, (number, fragment) in NUMBERS.items():
            raw = _text(_set(base, field, NUM), number)
            out.append(Case(f"{verb}.{field}.{name}", verb, where(verb), raw, field, fragment))
    for name, (encode, fragment) in ENCODINGS.items():
        raw = encode(json.dumps(base if base else {"expected_revision": 1}))
        out.append(Case(f"{verb}.{name}", verb, where(verb), raw, None, fragment))
    return out


def wait_cases(flow: str, prefix: str) -> list[Case]:
    """Wait fields: times and subjects (the strings are in ``cases``)."""
    timer = {"kind": "timer"}
    bodies: dict[str, tuple[dict[str, Any], str, str]] = {
        "year-1": ({**timer, "at": "0001-01-01T00:00:00+00:00"}, "wait_json.at", "must lie"),
        "naive": ({**timer, "at": "2030-01-01T00:00:00"}, "wait_json.at", "timezone"),
        "year-9999": ({**timer, "at": "9999-06-01T00:00:00Z"}, "wait_json.at", "must lie"),
        "timeout-year-1": (
            {"kind": "any", "of": [{"kind": "manual"}], "timeout_at": "0001-01-01T00:00:00Z"},
            "wait_json.timeout_at",
            "must lie",
        ),
        "any-timer-naive": (
            {"kind": "any", "of": [{"kind": "signal", "name": "x"}, {**timer, "at": "2030-01-01"}]},
            "wait_json.of.1.at",
            "timezone",
        ),
    }
    subjects = {
        "dots": ("..", "empty token"),
        "wildcard-star": ("a.*", "wildcard"),
        "wildcard-gt": ("a.>", "wildcard"),
        "space": ("a b", "only printable ASCII"),
        "reserved-cmd": (f"{prefix}.cmd.x.start", "flowd's own subjects"),
        "reserved-relay": (f"{prefix}.relay", "flowd's own subjects"),
        "reserved-dlq": (f"{prefix}.dlq.wake", "flowd's own subjects"),
        "system": ("$SYS.x", "system or inbox"),
    }
    for name, (subject, fragment) in subjects.items():
        wait = {"kind": "subject", "subject": subject, "correlation_id": "c"}
        bodies[f"subject-{name}"] = (wait, "wait_json.subject", fragment)
    bodies["topic-dots"] = (
        {"kind": "external_event", "topic": "a..b", "correlation_id": "c"},
        "wait_json.topic",
        "empty token",
    )
    bodies["correlation-nul"] = (
        {"kind": "subject", "subject": "a.b", "correlation_id": "c\u0000"},
        "wait_json.correlation_id",
        "NUL",
    )
    return [
        Case(f"wait.{name}", "wait", f"cmd.{flow}.wait", _text({"wait_json": wait}), path, frag)
        for name, (wait, path, frag) in bodies.items()
    ]


BAD_IDS = {
    "nul": ("id\u0000x", "contains NUL (\\u0000)"),
    "control": ("id\u0001x", "contains a control character (\\u0001)"),
    "replacement": ("id\ufffdx", "contains \\ufffd (the mark of bytes that were not UTF-8)"),
    "too-long": ("x" * 201, "is longer than 200 characters"),
}


async def _setup(w: Wire) -> tuple[str, str, dict[str, Any]]:
    flow, mirrored = str(uuid.uuid4()), str(uuid.uuid4())
    await w.publish(w.s.command(flow, "create"), CREATE)
    await w.publish(w.s.command(flow, "start"))
    await w.publish(w.s.command(mirrored, "create"), {**CREATE, "sync_mode": "mirrored"})
    await w.wait_for(lambda: _at_least(w.events, 4))
    before = {f: (await w.request("get", {"flow_id": f}))["result"] for f in (flow, mirrored)}
    return flow, mirrored, before


async def _at_least(fetch: Any, n: int) -> Any:
    items = await fetch()
    return items if len(items) >= n else None


async def _nothing_written(d: DaemonProcess, w: Wire, before: dict[str, Any]) -> None:
    for fid, snapshot in before.items():
        assert (await w.request("get", {"flow_id": fid}))["result"] == snapshot
    assert len(await w.events()) == 4
    assert d.proc is not None
    assert d.proc.poll() is None
    await asyncio.to_thread(d.wait_ready, 5)  # /readyz answers 200
    # still applying: a good command goes through
    flow = next(iter(before))
    await w.publish(w.s.command(flow, "update"), {"patch": {"ok": True}})
    await w.wait_for(lambda: _at_least(w.events, 5))


async def test_bad_input_over_jetstream(daemon: DaemonProcess, nats_wire: Wire) -> None:
    w, s = nats_wire, nats_wire.s
    flow, mirrored, before = await _setup(w)
    matrix = cases(flow, mirrored) + wait_cases(flow, s.prefix)
    for case in matrix:
        await w.publish(f"{s.prefix}.{case.where}", raw=case.raw, cid=case.cid)
    bad_ids: dict[str, tuple[str, int]] = {}  # token -> (problem, stream sequence)
    for msg_id, problem in BAD_IDS.values():
        token = str(uuid.uuid4())
        ack = await w.js.publish(
            s.command(token, "update"), b'{"patch": {}}', headers={"Nats-Msg-Id": msg_id}
        )
        bad_ids[token] = (problem, ack.seq)
    rejected = [c for c in matrix if c.path is not None]
    dead = [c for c in matrix if c.path is None]
    outcomes = await w.wait_for(lambda: _at_least(w.outcomes, len(rejected) + len(bad_ids)), 60)
    letters = await w.wait_for(lambda: _at_least(lambda: w.stream_msgs(s.dlq_stream), len(dead)))

    by_cid = {o["command_id"]: o for o in outcomes}
    for case in rejected:
        o = by_cid.pop(case.cid)
        assert (o["status"], o["code"]) == ("rejected", "invalid_input"), case
        assert case.fragment in o["details"]["errors"][case.path], (case, o)
    for o in by_cid.values():  # the bad ids: under the fallback id, on their flow's subject
        problem, seq = bad_ids.pop(o["flow_id"])
        assert str(seq) in o["command_id"]
        assert o["code"] == "invalid_input"
        assert o["details"]["errors"] == {"Nats-Msg-Id": problem}
    assert not bad_ids
    reasons = {m.headers["Nats-Msg-Id"].removeprefix("dlq-"): m for m in letters}
    assert set(reasons) == {c.cid for c in dead}
    for case in dead:
        letter = reasons[case.cid]
        assert letter.headers["Flowd-Dlq-Reason"].startswith("payload is not UTF-8 JSON: ")
        assert case.fragment in letter.headers["Flowd-Dlq-Reason"], case
        assert letter.data == case.raw
    await _nothing_written(daemon, w, before)


async def test_bad_input_over_the_api(daemon: DaemonProcess, nats_wire: Wire) -> None:
    w, s = nats_wire, nats_wire.s
    flow, mirrored, before = await _setup(w)
    matrix = cases(flow, mirrored) + wait_cases(flow, s.prefix)
    for case in matrix:
        reply = await _raw_request(w, f"{s.prefix}.api.{case.where}", case.raw, case.cid)
        error = reply["error"]
        assert error["code"] == "invalid_input", (case, reply)
        if case.path is None:
            assert error["message"].startswith("payload is not UTF-8 JSON: "), case
            assert case.fragment in error["message"], case
        else:
            assert case.fragment in error["details"]["errors"][case.path], (case, reply)
    for msg_id, problem in BAD_IDS.values():
        reply = await _raw_request(w, f"{s.prefix}.api.cmd.{flow}.update", b'{"patch": {}}', msg_id)
        assert reply["error"]["code"] == "invalid_input"
        assert reply["error"]["details"]["errors"] == {"Nats-Msg-Id": problem}
    queries = {
        "get": (b'{"flow_id": "\\u0000"}', "flow_id"),
        "list": (b'{"owner": "a\\u0000"}', "owner"),
        "events": (b'{"flow_id": "%s", "limit": 1e400}' % flow.encode(), "limit"),
        "outcome": (b'{"command_id": "\\ud800"}', "command_id"),
    }
    for op, (raw, path) in queries.items():
        reply = await _raw_request(w, s.api(op), raw, None)
        assert reply["error"]["code"] == "invalid_input", (op, reply)
        assert path in reply["error"]["details"]["errors"], (op, reply)
    for name, (encode, fragment) in ENCODINGS.items():
        reply = await _raw_request(w, s.api("list"), encode('{"owner": "x"}'), None)
        assert reply["error"]["code"] == "invalid_input", name
        assert fragment in reply["error"]["message"], name
    await _nothing_written(daemon, w, before)


async def _raw_request(w: Wire, subject: str, raw: bytes, msg_id: str | None) -> Any:
    headers = {"Nats-Msg-Id": msg_id} if msg_id is not None else None
    reply = await w.nc.request(subject, raw, timeout=10, headers=headers)
    return json.loads(reply.data)


async def test_subjects_and_header_bytes_that_are_not_utf8_neither_stall_nor_crash(
    daemon: DaemonProcess, nats_wire: Wire
) -> None:
    """A subject that is not UTF-8 stopped nats-py's read loop for good (every flow stalled);
    a NUL in the flow id token crash-looped its lane (PostgreSQL cannot keep the token)."""
    w, s = nats_wire, nats_wire.s
    flow, _, before = await _setup(w)
    p = s.prefix.encode()
    await w.publish_bytes(p + b".cmd.a\xffb.start", b"Nats-Msg-Id: s1\r\n", b"{}")
    await w.publish_bytes(p + b".cmd.a\x00b.start", b"Nats-Msg-Id: s2\r\n", b"{}")
    await w.publish_bytes(p + b".wake.t\xff", b"Nats-Msg-Id: s3\r\n", b'{"correlation_id": "c"}')
    update = b"%s.cmd.%s.update" % (p, flow.encode())
    await w.publish_bytes(update, b"Nats-Msg-Id: id\xff\xfe\r\n", b'{"patch": {"bad": 1}}')
    await w.publish(s.command(flow, "update"), {"patch": {"good": 1}}, cid="good")

    letters = await w.wait_for(lambda: _at_least(lambda: w.stream_msgs(s.dlq_stream), 3))
    reasons = {m.headers["Nats-Msg-Id"]: m.headers["Flowd-Dlq-Reason"] for m in letters}
    assert reasons == {
        "dlq-s1": "subject token 'a\\ufffdb' contains \\ufffd "
        "(the mark of bytes that were not UTF-8)",
        "dlq-s2": "subject token 'a\\u0000b' contains NUL (\\u0000)",
        "dlq-s3": "subject contains '\\ufffd': only printable ASCII without spaces",
    }
    [outcome] = await w.wait_for(w.outcomes)
    assert outcome["details"]["errors"] == {
        "Nats-Msg-Id": "contains \\ufffd (the mark of bytes that were not UTF-8)"
    }
    events = await w.wait_for(lambda: _at_least(w.events, 5))
    assert [(e["kind"], e["command_id"]) for e in events[4:]] == [("state_updated", "good")]
    assert events[-1]["flow"]["state_json"] == {"good": 1}
    assert daemon.proc is not None
    assert daemon.proc.poll() is None
    del before

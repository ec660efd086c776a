"""Decoding sorts every message into Decoded, Rejected (an answerable error) or Undecodable."""

from __future__ import annotations

import json
import uuid

import pytest

from flowd.bus import codec

FID = str(uuid.uuid4())


def decode(
    kind: str, tokens: list[str], body: object = None, raw: bytes | None = None, **kw: object
):  # type: ignore[no-untyped-def]
    data = raw if raw is not None else json.dumps(body if body is not None else {}).encode()
    return codec.decode(
        kind,  # type: ignore[arg-type]
        tokens,
        kw.get("headers", {"Nats-Msg-Id": "cid-1"}),  # type: ignore[arg-type]
        data,
        fallback_id="S:7",
        max_payload=kw.get("max_payload", 1024),  # type: ignore[arg-type]
    )


def test_valid_command() -> None:
    d = decode(
        "cmd", [FID, "update"], {"patch": {"a": 1}, "next_step": "s", "expected_revision": 3}
    )
    assert (d.verb, str(d.flow_id), d.token, d.command_id) == ("update", FID, FID, "cid-1")
    assert isinstance(d.body, codec.UpdateCommand)
    assert d.body.expected_revision == 3


def test_create_uses_payload_id_as_token() -> None:
    d = decode(
        "cmd", ["create"], {"controller_id": "c", "goal": "g", "owner_session_key": "o", "id": FID}
    )
    assert (d.token, str(d.flow_id)) == (FID, FID)
    anonymous = decode(
        "cmd", ["create"], {"controller_id": "c", "goal": "g", "owner_session_key": "o"}
    )
    assert (anonymous.token, anonymous.flow_id) == ("create", None)


def test_missing_msg_id_falls_back_to_stream_sequence() -> None:
    assert decode("cmd", [FID, "start"], headers={}).command_id == "S:7"
    assert decode("cmd", [FID, "start"], headers={"Nats-Msg-Id": "  "}).command_id == "S:7"


@pytest.mark.parametrize(
    ("msg_id", "problem"),
    [
        ("a\x00b", "contains NUL (\\u0000)"),
        ("a\ud800", "contains a lone surrogate (\\ud800)"),
        ("a\x01b", "contains a control character (\\u0001)"),
        ("a\ufffdb", "contains \\ufffd (the mark of bytes that were not UTF-8)"),
        ("x" * 201, "is longer than 200 characters"),
    ],
)
def test_unusable_msg_id_is_rejected_under_the_fallback_id(msg_id: str, problem: str) -> None:
    """Defect 9: such an id crash-looped its message (PostgreSQL cannot keep it)."""
    with pytest.raises(codec.Rejected) as info:
        decode("cmd", [FID, "update"], {"patch": {}}, headers={"Nats-Msg-Id": msg_id})
    assert (info.value.command_id, info.value.token) == ("S:7", FID)
    assert info.value.error.errors == {"Nats-Msg-Id": problem}
    assert codec.command_id({"Nats-Msg-Id": msg_id}, "S:7") == "S:7"


@pytest.mark.parametrize(
    ("tokens", "raw", "path", "message"),
    [
        ([FID, "update"], b'{"patch": {"k1": "a\\u0000b"}}', "patch.k1", "string contains NUL"),
        ([FID, "update"], b'{"patch": {"a\\u0000": 1}}', "patch.a\\u0000", "key contains NUL"),
        ([FID, "update"], b'{"patch": {"k": "\\ud800"}}', "patch.k", "lone surrogate"),
        ([FID, "update"], b'{"patch": {"\\ud800": 1}}', "patch.\\ud800", "lone surrogate"),
        ([FID, "update"], b'{"patch": {"a": 1e400}}', "patch.a", "range of a double"),
        ([FID, "update"], b'{"patch": {"a": -1e400}}', "patch.a", "range of a double"),
        ([FID, "update"], b'{"patch": {"a": 1e309}}', "patch.a", "range of a double"),
        ([FID, "update"], b'{"patch": {"a": 18446744073709551616}}', "patch.a", "64-bit"),
        ([FID, "fail"], b'{"reason": "x\\u0000"}', "reason", "string contains NUL"),
        ([FID, "signal"], b'{"name": "s", "payload": [1e400]}', "payload.0", "range"),
        (["create"], b'{"goal": "\\u0000"}', "goal", "string contains NUL"),
    ],
)
def test_values_postgres_cannot_hold_are_rejected(
    tokens: list[str], raw: bytes, path: str, message: str
) -> None:
    """Defects 9 and 10: NUL and lone surrogates crash-looped; 1e400 was stored as null."""
    with pytest.raises(codec.Rejected) as info:
        decode("cmd", tokens, raw=raw)
    assert info.value.error.code == "invalid_input"
    assert info.value.command_id == "cid-1"
    assert list(info.value.error.errors) == [path]
    assert message in info.value.error.errors[path]


def test_empty_body_is_an_empty_object() -> None:
    assert decode("cmd", [FID, "cancel"], raw=b"").body == codec.CancelCommand()


@pytest.mark.parametrize(
    ("tokens", "body", "field"),
    [
        (["nope", "start"], {}, None),
        ([FID, "explode"], {}, None),
        ([FID, "update"], {"patch": [1]}, "patch"),
        ([FID, "update"], {"patch": {}, "next_step": 5}, "next_step"),
        ([FID, "start"], {"expected_revision": "1"}, "expected_revision"),
        ([FID, "start"], {"expected_revision": True}, "expected_revision"),
        ([FID, "start"], {"expected_revision": -1}, "expected_revision"),
        ([FID, "start"], {"extra": 1}, "extra"),
        ([FID, "fail"], {}, "reason"),
        ([FID, "update"], [1], None),
        (["create"], {"goal": 1}, "goal"),
    ],
)
def test_invalid_commands_are_rejected_with_a_token(
    tokens: list[str], body: object, field: str | None
) -> None:
    with pytest.raises(codec.Rejected) as info:
        decode("cmd", tokens, body)
    assert info.value.error.code == "invalid_input"
    assert info.value.command_id == "cid-1"
    assert info.value.token == tokens[0]
    if field is not None:
        assert field in info.value.error.errors


@pytest.mark.parametrize(
    ("kind", "tokens", "raw", "reason"),
    [
        ("cmd", [FID, "update"], b"{nope", "not UTF-8 JSON"),
        ("cmd", [FID, "update"], b"\xff", "not UTF-8 JSON"),
        ("cmd", [FID, "update"], b'\xef\xbb\xbf{"patch": {}}', "UTF-8 byte order mark"),
        ("cmd", [FID, "update"], '{"patch": {}}'.encode("utf-16"), "UTF-16 byte order mark"),
        ("cmd", [FID, "update"], '{"patch": {}}'.encode("utf-16-le"), "looks like UTF-16-LE"),
        ("cmd", [FID, "update"], '{"patch": {}}'.encode("utf-32"), "UTF-32 byte order mark"),
        ("cmd", [FID, "update"], '{"patch": {}}'.encode("utf-32-be"), "looks like UTF-32-BE"),
        ("cmd", [FID, "update"], b'{"patch": {"a": "\xed\xa0\x80"}}', "invalid UTF-8 at"),
        ("cmd", [FID, "update"], b'{"patch": {"x": NaN}}', "NaN is not JSON"),
        ("cmd", [FID, "update"], b'{"patch": {"x": -Infinity}}', "Infinity is not JSON"),
        ("cmd", [FID, "update"], b"{}" + b" " * 2000, "exceeds"),
        ("cmd", [FID, "update"], b"[" * 40 + b"]" * 40, "deeper"),
        ("cmd", [FID, "update"], b"[" * 100_000 + b"]" * 100_000, "deeper"),
        ("cmd", [FID], b"{}", "no such cmd subject"),
        ("cmd", [FID, "update", "x"], b"{}", "no such cmd subject"),
        ("obs", [FID, "x"], b"{}", "no such obs subject"),
        ("cmd", ["a\x00b", "start"], b"{}", r"subject token 'a\\u0000b' contains NUL"),
        ("obs", ["a\ufffd"], b"{}", r"subject token 'a\\ufffd' contains \\ufffd"),
    ],
)
def test_unreadable_input_is_undecodable(
    kind: str, tokens: list[str], raw: bytes, reason: str
) -> None:
    with pytest.raises(codec.Undecodable, match=reason):
        decode(kind, tokens, raw=raw, max_payload=len(raw) if len(raw) > 100_000 else 1024)


def test_observation_flow_id_must_match_subject() -> None:
    ok = decode("obs", [FID], {"run_id": "r", "task": "t", "status": "running", "flow_id": FID})
    assert ok.verb == "observe"
    with pytest.raises(codec.Rejected, match="differs"):
        decode(
            "obs",
            [FID],
            {"run_id": "r", "task": "t", "status": "running", "flow_id": str(uuid.uuid4())},
        )


def test_create_on_the_flow_subject_takes_the_id_from_it() -> None:
    body = {"controller_id": "c", "goal": "g", "owner_session_key": "o"}
    d = decode("cmd", [FID, "create"], body)
    assert (d.verb, str(d.flow_id), d.token) == ("create", FID, FID)
    assert str(d.body.id) == FID  # type: ignore[attr-defined]
    with pytest.raises(codec.Rejected, match="differs"):
        decode("cmd", [FID, "create"], {**body, "id": str(uuid.uuid4())})


@pytest.mark.parametrize("cid", ["flowd:seq:FLOWS_CMD:8", "flowd:wake:x", "flowd:"])
def test_an_id_in_flowds_namespace_is_rejected_under_the_fallback_id(cid: str) -> None:
    with pytest.raises(codec.Rejected) as info:
        decode("cmd", [FID, "start"], headers={"Nats-Msg-Id": cid})
    assert info.value.command_id == "S:7"
    assert info.value.error.code == "invalid_input"
    assert info.value.error.details() == {"errors": {"Nats-Msg-Id": "must not start with 'flowd:'"}}
    assert codec.command_id({"Nats-Msg-Id": cid}, "fallback") == "fallback"
    assert codec.fallback_id("FLOWS_CMD", 8) == "flowd:seq:FLOWS_CMD:8"


def test_the_request_digest_covers_what_was_asked_and_nothing_else() -> None:
    create = {"controller_id": "c", "goal": "g", "owner_session_key": "o"}
    upd = decode("cmd", [FID, "update"], {"patch": {"a": 1, "b": 2}}).request
    assert upd.verb == "update"
    reordered = decode("cmd", [FID, "update"], raw=b'{"patch":{"b":2,  "a":1}}').request
    assert reordered == upd  # the same request, spelled otherwise
    defaults = decode("cmd", [FID, "update"], {"patch": {"a": 1, "b": 2}, "next_step": None})
    assert defaults.request == upd
    assert decode("cmd", [FID, "update"], {"patch": {"a": 2, "b": 2}}).request != upd
    other_flow = decode("cmd", [str(uuid.uuid4()), "update"], {"patch": {"a": 1, "b": 2}})
    assert other_flow.request != upd
    at = decode("cmd", [FID, "update"], {"patch": {"a": 1, "b": 2}, "expected_revision": 1})
    assert at.request != upd
    # a create names its flow by the subject or the payload: one request
    by_subject = decode("cmd", [FID, "create"], create).request
    assert decode("cmd", ["create"], {**create, "id": FID}).request == by_subject
    # an observation's flow_id is the subject's; cmd and obs never share a digest
    obs = {"run_id": "r", "task": "t", "status": "running"}
    assert (
        decode("obs", [FID], obs).request == decode("obs", [FID], {**obs, "flow_id": FID}).request
    )
    # an invalid body has a digest of its bytes
    with pytest.raises(codec.Rejected) as bad:
        decode("cmd", [FID, "update"], {"patch": [1]})
    assert bad.value.request is not None
    assert bad.value.request.verb == "update"
    assert bad.value.request.digest not in (upd.digest, by_subject.digest)

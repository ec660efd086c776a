"""core.waits: the exact rules a wait's times, subjects and strings must follow."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from flowd.core import apply, errors, waits
from flowd.core.status import FlowStatus, SyncMode
from tests.support.factories import create_input

RESERVED = ("flows.cmd", "flows.obs", "flows.evt", "flows.out", "flows.api", "flows.dlq")
NOW = datetime(2026, 1, 2, tzinfo=UTC)


def refused(wait: dict[str, Any], reserved: tuple[str, ...] = RESERVED) -> dict[str, str]:
    with pytest.raises(errors.InvalidInput) as info:
        waits.parse(wait, reserved=reserved)
    for path, message in info.value.errors.items():
        assert f"{path}: {message}" in info.value.message
    return info.value.errors


def timer(at: str) -> dict[str, Any]:
    return {"kind": "timer", "at": at}


def subject(name: str, **extra: str) -> dict[str, Any]:
    return {"kind": "subject", "subject": name, "correlation_id": "c", **extra}


@pytest.mark.parametrize(
    "at",
    [
        "0001-01-01T00:00:00+00:00",  # defect 4: stopped every timer
        "0001-01-01T00:00:00+01:00",  # before year 1 in UTC
        "1969-12-31T23:59:59.999999+00:00",
        "9999-01-01T00:00:00+00:00",
        "9998-12-31T23:00:00-02:00",  # 9999-01-01T01:00Z
        "9999-12-31T23:59:59-23:59",
    ],
)
def test_times_out_of_range_are_refused(at: str) -> None:
    assert refused(timer(at)) == {
        "wait_json.at": "time must lie from 1970-01-01T00:00:00+00:00 up to "
        "9999-01-01T00:00:00+00:00 (excluded)"
    }


@pytest.mark.parametrize(
    "at", ["1970-01-01T00:00:00Z", "1970-01-01T01:00:00+01:00", "9998-12-31T23:59:59.999999Z"]
)
def test_times_in_range_pass(at: str) -> None:
    assert isinstance(waits.parse(timer(at)), waits.TimerWait)


def test_a_time_needs_an_offset_and_paths_name_the_field_inside_any() -> None:
    assert list(refused(timer("2030-01-01T00:00:00"))) == ["wait_json.at"]
    wait = {
        "kind": "any",
        "of": [{"kind": "signal", "name": "ok"}, timer("0001-01-01T00:00:00Z"), subject("a..b")],
        "timeout_at": "0001-01-01T00:00:00Z",
    }
    assert set(refused(wait)) == {
        "wait_json.of.1.at",
        "wait_json.of.2.subject",
        "wait_json.timeout_at",
    }


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("..", "has an empty token"),  # defect 7: broke every other subject wait
        ("a..b", "has an empty token"),
        (".a", "has an empty token"),
        ("a.", "has an empty token"),
        ("", "is empty"),
        ("a.*", "contains a wildcard"),
        ("a.>", "contains a wildcard"),
        ("a*b", "contains a wildcard"),
        ("a b", "contains ' ': only printable ASCII without spaces"),
        ("a\tb", "contains '\\u0009'"),
        ("a\x00b", "contains '\\u0000'"),
        ("a\ud800", "contains '\\ud800'"),
        ("café", "contains 'é'"),
        ("a" * 256, "is longer than 255 characters"),
        ("$JS.API.INFO", "is a NATS system or inbox subject ($JS.…)"),
        ("$SYS.x", "is a NATS system or inbox subject"),
        ("_INBOX.abc", "is a NATS system or inbox subject"),
        ("flows.cmd.x.start", "is one of flowd's own subjects (flows.cmd, flows.cmd.>)"),
        ("flows.api", "is one of flowd's own subjects (flows.api, flows.api.>)"),
        ("flows.dlq.wake", "is one of flowd's own subjects"),
    ],
)
def test_subjects_must_be_one_literal_subject_of_the_users(name: str, problem: str) -> None:
    for wait, field in ((subject(name), "subject"), (_external(name), "topic")):
        [(path, message)] = refused(wait).items()
        assert path == f"wait_json.{field}"
        assert message.startswith(f"subject {problem}"), message


def _external(name: str) -> dict[str, Any]:
    return {"kind": "external_event", "topic": name, "correlation_id": "c"}


@pytest.mark.parametrize(
    "name", ["a", "orders.paid", "flows.wake.t-x", "flows.cmdx", "flows", "a.b-c_d.~!@#%"]
)
def test_allowed_subjects(name: str) -> None:
    assert waits.parse(subject(name), reserved=RESERVED)


@pytest.mark.parametrize(
    ("wait", "path", "message"),
    [
        (subject("a", correlation_id="c\x00"), "wait_json.correlation_id", "contains NUL"),
        (subject("a", correlation_id="\udc80"), "wait_json.correlation_id", "lone surrogate"),
        (subject("a", correlation_id="c" * 201), "wait_json.correlation_id", "at most 200"),
        ({"kind": "signal", "name": "a\x00"}, "wait_json.name", "contains NUL"),
        ({"kind": "signal", "name": ""}, "wait_json.name", "at least 1"),
        (
            {"kind": "any", "of": [{"kind": "signal", "name": "\ud800"}]},
            "wait_json.of.0.name",
            "lone surrogate",
        ),
    ],
)
def test_strings_are_clean_and_bounded(wait: dict[str, Any], path: str, message: str) -> None:
    [(got, text)] = refused(wait).items()
    assert got == path
    assert message in text


def test_a_wait_stored_before_the_rules_still_takes_its_signal() -> None:
    ids = iter(range(1, 100))

    def new_id() -> uuid.UUID:
        return uuid.UUID(int=next(ids))

    flow = apply.create(create_input(), mode=SyncMode.MIRRORED, now=NOW, new_id=new_id).flow
    legacy = {
        "kind": "any",
        "of": [
            {"kind": "subject", "subject": "..", "correlation_id": "x"},
            {"kind": "signal", "name": "go"},
        ],
    }
    waiting = flow.evolve(status=FlowStatus.WAITING, wait_json=legacy)
    change = apply.signal(waiting, "go", None, now=NOW, new_id=new_id)
    assert change.flow.status is FlowStatus.RUNNING
    assert waits.stored_signal_names(legacy) == {"go"}
    assert waits.stored_signal_names({"kind": "any", "of": "junk"}) == set()

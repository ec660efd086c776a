"""Owner claims (core.owner): a signature binds owner, command id, subject and body."""

from __future__ import annotations

import pytest

from flowd.core import owner
from flowd.core.errors import Forbidden

MASTER, OLD = b"m" * 32, b"o" * 32
SUBJECT, CID, BODY = "flows.cmd.0c4e.update", "c-1", b'{"patch":{"x":1}}'


def claim(master: bytes = MASTER, who: str = "alice", **over: object) -> dict[str, object]:
    fields: dict[str, object] = {"command_id": CID, "subject": SUBJECT, "body": BODY}
    sig = owner.sign(owner.owner_key(master, who), who, CID, SUBJECT, BODY)
    return {"owner": who, "signature": sig, **fields, **over}


def test_a_signed_claim_proves_its_owner() -> None:
    assert owner.verified_owner([MASTER], **claim()) == "alice"  # type: ignore[arg-type]


def test_a_key_signed_under_a_retired_master_still_verifies_while_listed() -> None:
    assert owner.verified_owner([MASTER, OLD], **claim(OLD)) == "alice"  # type: ignore[arg-type]
    with pytest.raises(Forbidden) as info:
        owner.verified_owner([MASTER], **claim(OLD))  # type: ignore[arg-type]
    assert info.value.details() == {"reason": "bad_signature"}


@pytest.mark.parametrize(
    "change",
    [
        {"owner": "mallory"},  # another owner with alice's signature
        {"command_id": "c-2"},
        {"subject": "flows.cmd.0c4e.cancel"},
        {"body": b'{"patch":{"x":2}}'},
        {"signature": "v1=" + "0" * 64},
        {"signature": "v1=\u00e9"},  # not ASCII: compare_digest on str would raise
        {"signature": "v1=\ud800"},  # a lone surrogate
        {"owner": "\ud800"},
        {"command_id": "c-\ud800"},
    ],
)
def test_changing_anything_signed_breaks_the_signature(change: dict[str, object]) -> None:
    with pytest.raises(Forbidden) as info:
        owner.verified_owner([MASTER], **claim(**change))  # type: ignore[arg-type]
    assert info.value.code == "forbidden"
    assert info.value.details() == {"reason": "bad_signature"}


@pytest.mark.parametrize("missing", [{"owner": None}, {"signature": None}, {"signature": ""}])
def test_no_claim_is_forbidden(missing: dict[str, object]) -> None:
    with pytest.raises(Forbidden) as info:
        owner.verified_owner([MASTER], **claim(**missing))  # type: ignore[arg-type]
    assert info.value.details() == {"reason": "missing_claim"}


def test_owner_keys_differ_per_owner_and_master() -> None:
    keys = {owner.owner_key(m, o) for m in (MASTER, OLD) for o in ("alice", "bob")}
    assert len(keys) == 4


def test_only_the_flows_owner_passes() -> None:
    owner.require_owner("alice", "alice")
    with pytest.raises(Forbidden) as info:
        owner.require_owner("alice", "bob")
    assert info.value.details() == {"reason": "not_owner"}
    assert "bob" not in info.value.message  # the other owner's name is not disclosed


def test_a_keys_file_lists_master_keys_current_first() -> None:
    text = f"# rotated 2026-12\n\n  {'n' * 40}  \n{'o' * 32}\n"
    assert owner.parse_keys(text) == (b"n" * 40, b"o" * 32)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "holds no key"),
        ("# only a comment\n\n", "holds no key"),
        ("short-key\n", "shorter than 32"),
        (f"{'k' * 40}\nshort\n", "shorter than 32"),
    ],
)
def test_a_keys_file_without_usable_keys_is_refused(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        owner.parse_keys(text)

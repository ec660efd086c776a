"""Which streams a prefix may rewrite (``check_owner``), and URLs without secrets in logs."""

from __future__ import annotations

import pytest
from nats.js import api

from flowd.bus.nats import check_owner, redact, stream_owner
from flowd.core.errors import Misconfigured


def stream(
    subjects: list[str], description: str | None = None, **metadata: str
) -> api.StreamConfig:
    return api.StreamConfig(
        name="X_T_CMD", subjects=subjects, description=description, metadata=metadata or None
    )


WANTED = stream(["x_t.cmd.>"])


@pytest.mark.parametrize(
    "existing",
    [
        stream(["x_t.cmd.>"], "flowd prefix=x_t"),  # tagged (nats-server 2.9: description)
        stream(["x_t.cmd.>"], flowd_prefix="x_t"),  # tagged (>= 2.10: metadata)
        stream(["x_t.cmd.>"]),  # untagged, its own subjects: a flowd from before tags
    ],
)
def test_own_streams_may_be_updated(existing: api.StreamConfig) -> None:
    check_owner(existing, WANTED, "x_t")


@pytest.mark.parametrize(
    ("existing", "owner"),
    [
        (stream(["x-t.cmd.>"], "flowd prefix=x-t"), "'x-t'"),
        (stream(["x_t.cmd.>"], "flowd prefix=x-t"), "'x-t'"),  # the tag wins over subjects
        (stream(["x_t.cmd.>"], "anything", flowd_prefix="x-t"), "'x-t'"),
        (stream(["x-t.cmd.>"]), "'x-t'"),  # untagged, another prefix's subjects
        (stream(["x_t.cmd.>", "other.>"]), "'other,x_t'"),
    ],
)
def test_another_prefixs_streams_are_refused_naming_both(
    existing: api.StreamConfig, owner: str
) -> None:
    with pytest.raises(Misconfigured) as refused:
        check_owner(existing, WANTED, "x_t")
    assert owner in str(refused.value)
    assert "'x_t'" in str(refused.value)
    assert "\n" not in str(refused.value)


def test_metadata_names_the_owner_before_the_description() -> None:
    assert stream_owner(stream([], "flowd prefix=a", flowd_prefix="b")) == "b"
    assert stream_owner(stream([], "made by hand")) is None


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://flowd:s3cret@n1:4222", "nats://n1:4222"),
        ("tls://tok3n@n1:4222, nats://u:p@n2", "tls://n1:4222,nats://n2"),
        ("u:p@n1:4222", "n1:4222"),
        ("nats://n1:4222", "nats://n1:4222"),
        ("nats://u:p@ss@n1:4222", "nats://n1:4222"),  # a raw "@" in the password
    ],
)
def test_redact_removes_users_passwords_and_tokens(url: str, shown: str) -> None:
    assert redact(url) == shown

"""Every NATS subject, stream and consumer name flowd uses (the code side of subjects.md).

All subjects live under one configurable prefix (default ``flows``), so several deployments
or tenants share one NATS. Stream names are derived from the prefix (``flows`` -> ``FLOWS_CMD``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

VERBS: Final = (
    "start",
    "wait",
    "resume",
    "finish",
    "fail",
    "request_cancel",
    "cancel",
    "update",
    "signal",
)
_TOKEN: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def valid_prefix(prefix: str) -> str:
    """``prefix`` if it is one NATS token usable in stream names, else ValueError."""
    if not _TOKEN.match(prefix):
        raise ValueError(f"subject prefix must match {_TOKEN.pattern}, got {prefix!r}")
    return prefix


@dataclass(frozen=True, slots=True)
class Subjects:
    """The names of one deployment, derived from its prefix."""

    prefix: str = "flows"
    #: >1: commands and observations are split by a hash of the flow id into this many
    #: partitions (a stream subject transform), each with its own consumer, so replicas can
    #: own partitions and still apply each flow's commands in order.
    partitions: int = 1

    def __post_init__(self) -> None:
        valid_prefix(self.prefix)
        if not 1 <= self.partitions <= 1024:
            raise ValueError("partitions must be from 1 to 1024")

    # -- streams and consumers ----------------------------------------------------------------
    @property
    def stream_base(self) -> str:
        return re.sub(r"[^A-Z0-9_]", "_", self.prefix.upper())

    @property
    def cmd_stream(self) -> str:
        return f"{self.stream_base}_CMD"

    @property
    def obs_stream(self) -> str:
        return f"{self.stream_base}_OBS"

    @property
    def evt_stream(self) -> str:
        return f"{self.stream_base}_EVT"

    @property
    def dlq_stream(self) -> str:
        return f"{self.stream_base}_DLQ"

    @property
    def wake_stream(self) -> str:
        return f"{self.stream_base}_WAKE"

    cmd_consumer: str = "flowd-cmd"
    obs_consumer: str = "flowd-obs"
    create_consumer: str = "flowd-create"
    wake_consumer: str = "flowd-wake"
    wake_queue: str = "flowd-wake"
    api_queue: str = "flowd-api"

    # -- subjects -----------------------------------------------------------------------------
    @property
    def cmd_all(self) -> str:
        return f"{self.prefix}.cmd.>"

    @property
    def obs_all(self) -> str:
        return f"{self.prefix}.obs.>"

    @property
    def evt_all(self) -> str:
        return f"{self.prefix}.evt.>"

    @property
    def out_all(self) -> str:
        return f"{self.prefix}.out.>"

    @property
    def dlq_all(self) -> str:
        return f"{self.prefix}.dlq.>"

    @property
    def wake_all(self) -> str:
        """Subjects captured by the wake stream: subject waits on these are durable."""
        return f"{self.prefix}.wake.>"

    @property
    def relay_nudge(self) -> str:
        """Core NATS, flowd to flowd: rows wait in the outbox; the relay lock holder drains."""
        return f"{self.prefix}.relay"

    @property
    def api_all(self) -> str:
        return f"{self.prefix}.api.>"

    @property
    def reserved(self) -> tuple[str, ...]:
        """flowd's own subjects: no subject wait may name one of them or a subject under
        them (``P.wake.>`` is not among them: waits on it are durable)."""
        return tuple(
            f"{self.prefix}.{t}" for t in ("cmd", "obs", "evt", "out", "api", "dlq", "relay")
        )

    @property
    def partitioned(self) -> bool:
        return self.partitions > 1

    def consumer(self, kind: str, partition: int) -> str:
        """The durable consumer of ``kind`` (cmd, obs) for one partition."""
        base = self.cmd_consumer if kind == "cmd" else self.obs_consumer
        return f"{base}-{partition}" if self.partitioned else base

    def partition_filter(self, kind: str, partition: int) -> str:
        """The stored subjects of one partition (after the stream's subject transform)."""
        return f"{self.prefix}.{kind}.{partition}.>"

    def partition_transform(self, kind: str) -> tuple[str, str]:
        """(source, destination) of the stream subject transform that adds the partition:
        the hash of the flow id token, so one flow always lands in one partition."""
        n = self.partitions
        if kind == "cmd":
            return (
                f"{self.prefix}.cmd.*.*",
                f"{self.prefix}.cmd.{{{{partition({n},1)}}}}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}",
            )
        return (
            f"{self.prefix}.obs.*",
            f"{self.prefix}.obs.{{{{partition({n},1)}}}}.{{{{wildcard(1)}}}}",
        )

    def create(self) -> str:
        return f"{self.prefix}.cmd.create"

    def command(self, flow_id: object, verb: str) -> str:
        return f"{self.prefix}.cmd.{flow_id}.{verb}"

    def observation(self, flow_id: object) -> str:
        return f"{self.prefix}.obs.{flow_id}"

    def events(self, flow_id: object = "*", kind: str = "*") -> str:
        return f"{self.prefix}.evt.{flow_id}.{kind}"

    def outcomes(self, token: object = "*") -> str:
        return f"{self.prefix}.out.{token}"

    def dead_letter(self, source: str) -> str:
        """``source``: ``cmd``, ``obs``, or ``wake`` (a wake message that could not be read)."""
        return f"{self.prefix}.dlq.{source}"

    def api(self, op: str) -> str:
        return f"{self.prefix}.api.{op}"

    def topic(self, relative: str) -> str:
        """An outbox topic (``evt.<flow>.<kind>``, ``out.<token>``) as a full subject."""
        return f"{self.prefix}.{relative}"

    def relative(self, subject: str) -> list[str]:
        """The tokens of ``subject`` after the prefix (``[]`` if it is not ours)."""
        head = self.prefix + "."
        return subject[len(head) :].split(".") if subject.startswith(head) else []


# Headers
MSG_ID: Final = "Nats-Msg-Id"
COMMAND_ID: Final = "Flowd-Command-Id"
DLQ_REASON: Final = "Flowd-Dlq-Reason"
DLQ_SUBJECT: Final = "Flowd-Dlq-Subject"
DLQ_STREAM_SEQ: Final = "Flowd-Dlq-Stream-Seq"
DLQ_DELIVERED: Final = "Flowd-Dlq-Delivered"
DLQ_TRUNCATED: Final = "Flowd-Dlq-Truncated"
CORRELATION_ID: Final = "Flowd-Correlation-Id"
OWNER: Final = "Flowd-Owner"
OWNER_SIGNATURE: Final = "Flowd-Owner-Signature"
SERVICE_ERROR: Final = "Nats-Service-Error"
SERVICE_ERROR_CODE: Final = "Nats-Service-Error-Code"

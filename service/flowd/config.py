"""Settings: one frozen model, read from the environment (12-factor) by ``Settings.from_env``.

Precedence is CLI flag, then environment, then default. Nothing here opens a connection.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flowd.bus.subjects import valid_prefix

# field name -> environment variable
ENV: dict[str, str] = {
    "nats_url": "NATS_URL",
    "database_url": "DATABASE_URL",
    "prefix": "FLOWD_PREFIX",
    "partitions": "FLOWD_PARTITIONS",
    "data_dir": "FLOWD_DATA_DIR",
    "http_host": "FLOWD_HTTP_HOST",
    "http_port": "FLOWD_HTTP_PORT",
    "batch": "FLOWD_BATCH",
    "concurrency": "FLOWD_CONCURRENCY",
    "api_concurrency": "FLOWD_API_CONCURRENCY",
    "pool_size": "FLOWD_POOL_SIZE",
    "flow_cache": "FLOWD_FLOW_CACHE",
    "max_payload": "FLOWD_MAX_PAYLOAD",
    "max_state_bytes": "FLOWD_MAX_STATE_BYTES",
    "ack_wait": "FLOWD_ACK_WAIT",
    "max_deliver": "FLOWD_MAX_DELIVER",
    "stream_replicas": "FLOWD_STREAM_REPLICAS",
    "commands_max_age": "FLOWD_COMMANDS_MAX_AGE",
    "events_max_age": "FLOWD_EVENTS_MAX_AGE",
    "events_max_bytes": "FLOWD_EVENTS_MAX_BYTES",
    "duplicate_window": "FLOWD_DUPLICATE_WINDOW",
    "relay_interval": "FLOWD_RELAY_INTERVAL",
    "wait_tick": "FLOWD_WAIT_TICK",
    "wait_batch": "FLOWD_WAIT_BATCH",
    "migrate": "FLOWD_MIGRATE",
    "nice": "FLOWD_NICE",
    "log_format": "FLOWD_LOG_FORMAT",
    "log_level": "FLOWD_LOG_LEVEL",
    "nats_creds": "NATS_CREDS",
    "nats_nkey": "NATS_NKEY",
    "nats_tls_ca": "NATS_TLS_CA",
    "nats_tls_cert": "NATS_TLS_CERT",
    "nats_tls_key": "NATS_TLS_KEY",
    "enforce_owner": "FLOWD_ENFORCE_OWNER",
    "owner_keys_file": "FLOWD_OWNER_KEYS_FILE",
}


class Settings(BaseModel):
    """Everything ``flowd run`` can be told."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    nats_url: str | None = Field(
        None, description="NATS server(s), comma-separated; none: embedded"
    )
    database_url: str | None = Field(None, description="PostgreSQL DSN; none: embedded")
    prefix: str = Field("flows", description="subject prefix, one token")
    partitions: int = Field(
        1, ge=1, le=1024, description="command partitions (>1: replicas share by partition)"
    )
    data_dir: Path = Field(Path(".flowd"), description="where embedded servers keep data")
    http_host: str = Field("127.0.0.1", description="address of /healthz, /readyz, /metrics")
    http_port: int = Field(8321, ge=0, le=65535, description="port of the HTTP endpoints; 0: off")
    batch: int = Field(128, ge=1, le=4096, description="messages in flight per consumer")
    concurrency: int = Field(128, ge=1, le=1024, description="flows processed at once")
    api_concurrency: int = Field(
        64, ge=1, le=10_000, description="P.api requests served at once; beyond: `busy`"
    )
    pool_size: int = Field(10, ge=2, le=200, description="PostgreSQL connections")
    flow_cache: int = Field(
        10_000, ge=0, description="flows kept in memory to skip the read before a write; 0: off"
    )
    max_payload: int = Field(262_144, ge=1024, description="largest accepted body, bytes")
    max_state_bytes: int = Field(
        262_144,  # core.apply.MAX_STATE_BYTES
        ge=1024,
        description="largest state_json of a flow, serialized, bytes",
    )
    ack_wait: float = Field(30.0, gt=0, description="seconds before JetStream redelivers")
    max_deliver: int = Field(
        20, ge=2, description="deliveries before a message is dead-lettered (a last resort)"
    )
    stream_replicas: int = Field(1, ge=1, le=5, description="JetStream stream replicas")
    commands_max_age: float = Field(7 * 86400, gt=0, description="seconds commands are kept")
    events_max_age: float = Field(7 * 86400, gt=0, description="seconds events are kept")
    events_max_bytes: int = Field(-1, description="byte limit of the events stream; -1: none")
    duplicate_window: float = Field(300.0, gt=0, description="JetStream dedup window, seconds")
    relay_interval: float = Field(0.2, gt=0, description="outbox poll interval, seconds")
    wait_tick: float = Field(0.1, gt=0, description="how often due timers are claimed, seconds")
    wait_batch: int = Field(256, ge=1, le=10_000, description="due conditions claimed per tick")
    migrate: bool = Field(True, description="apply migrations at start (else only check)")
    nice: int | None = Field(
        None, ge=-20, le=19, description="the process's nice value; below 0 needs CAP_SYS_NICE"
    )
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    nats_creds: Path | None = None
    nats_nkey: Path | None = None
    nats_tls_ca: Path | None = None
    nats_tls_cert: Path | None = None
    nats_tls_key: Path | None = None
    enforce_owner: bool = Field(
        False, description="every mutation must prove it acts for the flow's owner"
    )
    owner_keys_file: Path | None = Field(
        None, description="master keys owner claims are signed under, one per line"
    )

    @model_validator(mode="after")
    def _owner_keys(self) -> Settings:
        if self.enforce_owner and self.owner_keys_file is None:
            raise ValueError("FLOWD_ENFORCE_OWNER needs FLOWD_OWNER_KEYS_FILE")
        return self

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        return valid_prefix(value)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``env`` (default ``os.environ``), then ``overrides`` (CLI flags)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {
            field: env[var] for field, var in ENV.items() if env.get(var, "") != ""
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)

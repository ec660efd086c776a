from __future__ import annotations

from tests.acceptance.conftest import daemon, make_daemon, nats_wire

__all__ = ["daemon", "make_daemon", "nats_wire"]

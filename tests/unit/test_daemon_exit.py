"""A NATS client closed for good stops the daemon with exit code 1 (to be restarted), unless
the daemon was stopping anyway (its own close)."""

from __future__ import annotations

from flowd.config import Settings
from flowd.daemon.app import Daemon


async def test_a_client_closed_for_good_stops_the_daemon_with_exit_1() -> None:
    d = Daemon(Settings())
    await d._nats_closed()
    assert d.stop.is_set()
    assert d._exit == 1


async def test_its_own_close_while_stopping_is_no_failure() -> None:
    d = Daemon(Settings())
    d.stop.set()
    await d._nats_closed()
    assert d._exit == 0

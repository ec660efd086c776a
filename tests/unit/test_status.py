from __future__ import annotations

import re

from flowd.core import status
from flowd.core.status import MOVES, TERMINAL, FlowStatus


def test_moves_match_the_seed_table() -> None:
    legal = {(a.value, b.value) for a, targets in MOVES.items() for b in targets}
    assert legal == {
        ("created", "running"),
        ("running", "waiting"),
        ("running", "finished"),
        ("running", "failed"),
        ("waiting", "running"),
        ("waiting", "failed"),
        ("created", "cancelled"),
        ("running", "cancelled"),
        ("waiting", "cancelled"),
    }


def test_terminal_statuses_have_no_moves() -> None:
    assert {s for s in FlowStatus if not MOVES[s]} == set(TERMINAL)
    assert all(s.terminal == (s in TERMINAL) for s in FlowStatus)


def test_documented_diagram_is_the_table() -> None:
    edges = re.findall(r"^\s+(\w+) --> (\w+) :", status.__doc__ or "", re.MULTILINE)
    assert {(a, b) for a, b in edges} == {
        (a.value, b.value) for a, targets in MOVES.items() for b in targets
    }

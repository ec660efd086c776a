"""flowd's benchmark harness: one module per scenario, driven by ``bench/run.py``.

Nothing here asserts anything about speed: every scenario measures and reports.
"""

from __future__ import annotations

"""Keep the harness's own garbage collector out of the latencies it measures.

The harness and the producers are Python processes too: a full collection over the
recorder's growing message list paused the harness 20-60 ms, and a producer 20 ms, in the
middle of paced runs, and each pause showed up as a burst of late commands that flowd never
saw late. While measuring, objects alive now are frozen (never scanned again) and automatic
collection is off; it is back on afterwards.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def no_gc_pauses() -> Iterator[None]:
    gc.collect()
    gc.freeze()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()

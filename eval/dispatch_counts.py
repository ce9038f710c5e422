"""Count the aten operations and host synchronisations of a call with torch.profiler.

Counts, unlike timings, are deterministic, so tests may assert them; they are taken on the CPU
and stand for what the same call would dispatch on an accelerator.

* aten operations: every ``aten::`` event the profiler records, nested ones included (an
  operation that calls others counts once for itself and once for each callee).
* host synchronisations: the events that make the host wait for the device on CUDA:
  :data:`SYNC_EVENTS` -- ``aten::_local_scalar_dense`` (``item()``, ``bool()``, ``int()``,
  ``float()`` of a tensor), ``aten::nonzero`` (also behind boolean-mask indexing),
  ``aten::unique*``, ``aten::masked_select`` -- and copies to the host (``.cpu()``,
  ``.tolist()``, ``.numpy()``). A CPU trace cannot tell a copy to the host from a dtype
  conversion, so every ``aten::_to_copy`` is counted as one (conservative).

The profiler's native library writes a line to the process's stderr whenever a profile starts
or stops (``USDT: ... profiler_start``); those writes are discarded, ``fn``'s own output is not.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from torch.profiler import ProfilerActivity, profile

SYNC_EVENTS = frozenset(
    {
        "aten::_local_scalar_dense",
        "aten::nonzero",
        "aten::nonzero_static",
        "aten::unique",
        "aten::_unique",
        "aten::_unique2",
        "aten::unique_dim",
        "aten::unique_consecutive",
        "aten::unique_dim_consecutive",
        "aten::masked_select",
        "aten::_to_copy",
    }
)


def is_host_sync(name: str) -> bool:
    """Whether a profiler event of this name forces a device -> host wait (see the module docstring)."""
    return name in SYNC_EVENTS


@dataclass(frozen=True)
class DispatchCounts:
    """Counts of one call: all of it, and the part inside the ranges named ``within``."""

    aten_ops: int
    host_syncs: int
    ranges: int  # how many ``within`` ranges ran
    aten_ops_within: int
    host_syncs_within: int
    result: Any

    def per_range(self) -> tuple[float, float]:
        """Operations and synchronisations per ``within`` range (0, 0 if none ran)."""
        if self.ranges == 0:
            return 0.0, 0.0
        return self.aten_ops_within / self.ranges, self.host_syncs_within / self.ranges


def count_dispatches(fn: Callable[[], Any], within: str | None = None) -> DispatchCounts:
    """Run ``fn()`` once under torch.profiler (CPU activity) and count its events; ``within``
    names a ``torch.profiler.record_function`` range whose events are also counted apart."""
    prof = profile(activities=[ProfilerActivity.CPU])
    with _native_stderr_discarded():
        prof.start()
    try:
        result = fn()
    finally:
        with _native_stderr_discarded():
            prof.stop()
    events = prof.events()
    aten = [event for event in events if event.name.startswith("aten::")]
    inside = [event for event in aten if within is not None and _inside(event, within)]
    return DispatchCounts(
        aten_ops=len(aten),
        host_syncs=sum(is_host_sync(event.name) for event in aten),
        ranges=sum(event.name == within for event in events),
        aten_ops_within=len(inside),
        host_syncs_within=sum(is_host_sync(event.name) for event in inside),
        result=result,
    )


def _inside(event, range_name: str) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == range_name:
            return True
        parent = parent.cpu_parent
    return False


@contextlib.contextmanager
def _native_stderr_discarded():
    """Within the block, what anything writes to file descriptor 2 (native code included) is discarded."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)

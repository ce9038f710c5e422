"""Free memory of a device, to refuse an allocation that cannot fit before it is attempted."""

from __future__ import annotations

import os

import torch

HOST_MARGIN = 0.1  # share of the host's available memory a memory check keeps free (margin_bytes)


def available_bytes(device: torch.device) -> int | None:
    """Bytes that can be allocated on ``device`` now, or ``None`` where it cannot be told.

    CUDA (and ROCm): ``torch.cuda.mem_get_info`` (free device memory) plus what PyTorch's
    caching allocator holds reserved but unused. CPU: available physical memory, Linux's
    ``MemAvailable`` (free memory plus reclaimable page cache, so that model files read
    recently do not count as used), else ``SC_AVPHYS_PAGES`` (free pages only: errs low).
    Other devices (MPS, XPU, ...) and other systems: ``None``, no check.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached
    if device.type == "cpu":
        return _host_available_bytes()
    return None


def margin_bytes(device: torch.device, available: int) -> int:
    """Bytes of ``available`` (:func:`available_bytes` of ``device``) a memory check keeps free.

    The host: :data:`HOST_MARGIN` of it. Going over host memory gets the process killed by the
    OOM killer, with nothing printed, and ``MemAvailable`` is an estimate: it counts page cache
    that is in use as reclaimable (a pipeline's memory-mapped weights), the kernel reclaims
    only so fast and needs page tables for a new allocation (0.2 % of it), the matrix library
    keeps workspace that the bounds do not count (tens of MB), and other processes and threads
    keep allocating. A share rather than a fixed amount: these grow with the machine. Other
    devices: nothing; their free memory is exact, and going over it raises an error that can be
    caught.
    """
    return int(HOST_MARGIN * available) if device.type == "cpu" else 0


def _host_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None

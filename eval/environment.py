"""What a result was computed with: library versions and the device, recorded with every number."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

import torch

PACKAGES = (
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "torchmetrics",
    "torch-fidelity",
    "numpy",
    "scipy",
    "pillow",
    "sdmerge",
)


def library_versions() -> dict[str, str]:
    """``{package: version}`` of the packages the sweep depends on (``"not installed"`` if absent;
    sdmerge run from a checkout without installing is reported as its ``__version__`` + "(source)")."""
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    if versions["sdmerge"] == "not installed":
        import sdmerge

        versions["sdmerge"] = f"{sdmerge.__version__} (source)"
    return versions


def device_name(device: torch.device) -> str:
    """``"cuda: NVIDIA H100 80GB HBM3"`` or ``"cpu: x86_64, 2 threads"``."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"{device.type}: {platform.machine()}, {torch.get_num_threads()} threads"

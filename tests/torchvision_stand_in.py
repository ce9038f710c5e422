"""Import timm where torchvision is absent (tests only).

timm imports torchvision at import time for its data pipeline and a few layers
(``torchvision.ops.misc.FrozenBatchNorm2d``, ``torchvision.transforms``...), none of which
the ViT model code under test uses. torchvision has no CPU-only wheel on PyPI that loads
against the CPU build of torch, so the tests import timm's real ``VisionTransformer``,
``Block`` and ``Attention`` with every ``torchvision`` module replaced by an empty stand-in
whose attributes are placeholder classes. The stand-in is installed only while timm is
imported and removed from ``sys.modules`` afterwards, so nothing else (transformers' own
"is torchvision available" checks) ever sees it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from contextlib import contextmanager


class _Placeholder(type):
    """A class whose every attribute is another placeholder class (e.g. ``InterpolationMode.BICUBIC``)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})


class _StandInModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _Placeholder(name, (), {})
        setattr(self, name, value)
        return value


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StandInModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []


@contextmanager
def torchvision_stand_in():
    """Within the block, ``import torchvision...`` yields stand-ins (if torchvision is not installed)."""
    if importlib.util.find_spec("torchvision") is not None:
        yield
        return
    finder = _StandInFinder()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]


def import_timm():
    """timm's model modules, or ``None`` if timm is not installed."""
    if importlib.util.find_spec("timm") is None:
        return None
    with torchvision_stand_in():
        import timm.layers.attention
        import timm.models.deit
        import timm.models.vision_transformer

    return timm

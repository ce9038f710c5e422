"""Hooks installed as forward wrappers, so that ``torch.compile`` sees them come and go.

PyTorch's module hooks (``register_forward_pre_hook``) are not guarded by ``torch.compile``
(dynamo's ``skip_nnmodule_hook_guards``): code compiled before a hook was added or removed keeps
running without it, or with it. An instance attribute ``forward`` is guarded: when it appears,
changes or goes, compiled code is traced again. So sdmerge runs its hooks inside a wrapper it sets
as the module's ``forward`` (as diffusers' own hooks and sdmerge's ViT integration do). A hook
is one function around the call:

    around(module, forward, args, kwargs) -> output      # forward(*args, **kwargs): the wrapped forward

Hooks other code registers with PyTorch keep working around the wrapper (they see the module's
call as made). :meth:`ForwardHook.remove` puts back what ``forward`` was; if other code has
wrapped ``forward`` again since (a diffusers cache applied after sdmerge), that wrapper keeps
calling this one, which then only passes the call through.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def passing_through(module: nn.Module, forward: Callable, args: tuple, kwargs: dict):
    """The hook of a removed :class:`ForwardHook` that another wrapper still calls."""
    return forward(*args, **kwargs)


class ForwardHook:
    """``around`` the forward of ``module``, installed as its ``forward`` attribute."""

    def __init__(self, module: nn.Module, around: Callable):
        self.module = module
        self.around = around
        self.wrapped = module.forward  # the class's forward, or whatever instance forward was there
        self._previous = module.__dict__.get("forward")
        self._installed = self.forward  # one bound method, to recognise it in the module later
        module.forward = self._installed

    def forward(self, *args, **kwargs):
        return self.around(self.module, self.wrapped, args, kwargs)

    def remove(self) -> None:
        """Put back the ``forward`` that was there; a pass-through if it was wrapped again since."""
        self.around = passing_through
        if self.module.__dict__.get("forward") is not self._installed:
            return
        if self._previous is None:
            del self.module.forward
        else:
            self.module.forward = self._previous

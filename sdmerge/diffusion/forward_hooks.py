"""Hooks installed as forward wrappers, so that ``torch.compile`` sees them come and go.

PyTorch's module hooks (``register_forward_pre_hook``) are not guarded by ``torch.compile``
(dynamo's ``skip_nnmodule_hook_guards``): code compiled before a hook was added or removed keeps
running without it, or with it. An instance attribute ``forward`` is guarded: when it appears,
changes or goes, compiled code is traced again. So sdmerge runs its hooks inside a wrapper it sets
as the module's ``forward`` (as diffusers' own hooks and sdmerge's ViT integration do), with
PyTorch's hook signatures:

    before(module, args, kwargs) -> None | (args, kwargs)
    after(module, args, kwargs, output) -> None | output

Hooks other code registers with PyTorch keep working around the wrapper (they see the module's
call as made). :meth:`ForwardHook.remove` puts back what ``forward`` was; if other code has
wrapped ``forward`` again since (a diffusers cache applied after sdmerge), that wrapper keeps
calling this one, which then only passes the call through.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


class ForwardHook:
    """``before`` / ``after`` around ``module``'s forward, installed as its ``forward`` attribute."""

    def __init__(self, module: nn.Module, before: Callable | None = None, after: Callable | None = None):
        self.module = module
        self.before = before
        self.after = after
        self.wrapped = module.forward  # the class's forward, or whatever instance forward was there
        self._previous = module.__dict__.get("forward")
        self._installed = self.forward  # one bound method, to recognise it in the module later
        module.forward = self._installed

    def forward(self, *args, **kwargs):
        if self.before is not None:
            changed = self.before(self.module, args, kwargs)
            if changed is not None:
                args, kwargs = changed
        output = self.wrapped(*args, **kwargs)
        if self.after is not None:
            changed = self.after(self.module, args, kwargs, output)
            if changed is not None:
                output = changed
        return output

    def remove(self) -> None:
        """Put back the ``forward`` that was there; a pass-through if it was wrapped again since."""
        self.before = self.after = None
        if self.module.__dict__.get("forward") is not self._installed:
            return
        if self._previous is None:
            del self.module.forward
        else:
            self.module.forward = self._previous

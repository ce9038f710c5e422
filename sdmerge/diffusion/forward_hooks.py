"""Hooks installed as forward wrappers, so that ``torch.compile`` sees them come and go.

PyTorch's module hooks (``register_forward_pre_hook``) are not guarded by ``torch.compile``
(dynamo's ``skip_nnmodule_hook_guards``): code compiled before a hook was added or removed keeps
running without it, or with it. An instance attribute ``forward`` is guarded: when it appears,
changes or goes, compiled code is traced again. So sdmerge runs its hooks inside a wrapper of the
module's ``forward`` (as diffusers' own hooks and sdmerge's ViT integration do). A hook is one
function around the call:

    around(module, forward, args, kwargs) -> output      # forward(*args, **kwargs): the wrapped forward

Hooks other code registers with PyTorch keep working around the wrapper (they see the module's
call as made).

diffusers' hooks (its caches: ``apply_first_block_cache``, ``apply_pyramid_attention_broadcast``,
``enable_cache``, ...) wrap ``forward`` too, through a ``HookRegistry`` on the module, which on
removing its last hook sets ``module.forward`` back to what it wrapped. So that such a removal
never drops sdmerge's wrapper, and sdmerge's removal never drops theirs, sdmerge's wrapper always
sits *inside* diffusers' hooks, right around the module's own forward: on a module that already
has them, it takes the place of the innermost forward their chain calls; a diffusers hook added
later wraps sdmerge's wrapper as that module's forward. :meth:`ForwardHook.remove` puts back what
it replaced where it still can, and otherwise (something else now holds a reference to it)
leaves it in place, passing calls through.

Where sdmerge must act on what a diffusers hook returns (the every-token output a cache replays,
merged again for a single-stream block's merged body), an :class:`OutsideHook` does it: a PyTorch
forward hook, which runs after the module's whole ``forward`` chain whatever its order. It is
added and removed only together with a forward wrapper on the same module, whose change retraces
compiled code.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def passing_through(module: nn.Module, forward: Callable, args: tuple, kwargs: dict):
    """The hook of a removed :class:`ForwardHook` that something else still calls."""
    return forward(*args, **kwargs)


def _innermost_reference(module: nn.Module):
    """``(reference, field)``: where diffusers' hook chain on ``module`` keeps the forward it calls
    innermost (its first hook's ``original_forward``, or ``forward`` for a hook without its own
    ``new_forward``); ``None`` without diffusers hooks on the module."""
    references = getattr(getattr(module, "_diffusers_hook", None), "_fn_refs", None)
    if not references:
        return None
    innermost = references[0]
    return innermost, ("original_forward" if getattr(innermost, "original_forward", None) is not None else "forward")


def has_diffusers_hooks(module: nn.Module) -> bool:
    """Whether diffusers' hooks (a cache) wrap ``module``'s forward: they see, and may keep and
    replay in a later call, what it returns."""
    return _innermost_reference(module) is not None


class ForwardHook:
    """``around`` the forward of ``module``, installed as its ``forward`` (inside diffusers' hooks)."""

    def __init__(self, module: nn.Module, around: Callable):
        self.module = module
        self.around = around
        self._installed = self.forward  # one bound method, to recognise it later
        slot = _innermost_reference(module)
        if slot is not None:  # inside diffusers' hook chain
            self.wrapped = getattr(*slot)
            setattr(*slot, self._installed)
        else:
            self.wrapped = module.forward  # the class's forward, or whatever instance forward was there
            module.forward = self._installed

    def forward(self, *args, **kwargs):
        return self.around(self.module, self.wrapped, args, kwargs)

    def remove(self) -> None:
        """Put back what this wrapper replaced; a pass-through where that is no longer possible."""
        self.around = passing_through
        if self.module.__dict__.get("forward") is self._installed:  # outermost
            if self.wrapped == type(self.module).forward.__get__(self.module):
                del self.module.forward  # the class's own forward again
            else:
                self.module.forward = self.wrapped
            return
        slot = _innermost_reference(self.module)  # inside diffusers' hooks (added before or after this one)
        if slot is not None and getattr(*slot) is self._installed:
            setattr(*slot, self.wrapped)


class OutsideHook:
    """``after(module, output) -> output``, run outside every wrapper of ``module``'s forward
    (diffusers' hooks included): a PyTorch forward hook, removable after ``copy.deepcopy`` of the
    model too (held by its id, not by a handle's weak reference to the original module)."""

    def __init__(self, module: nn.Module, after: Callable):
        self.module, self.after = module, after
        self.id = module.register_forward_hook(self.run).id

    def run(self, module: nn.Module, args: tuple, output):
        return self.after(module, output)

    def remove(self) -> None:
        self.module._forward_hooks.pop(self.id, None)

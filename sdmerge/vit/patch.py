"""Installing and undoing a ViT integration's patch on a model.

A patch replaces a few attributes of a model's modules (their ``forward``, timm's ``pool``) by
instance attributes and starts a new :class:`~sdmerge.vit.reduction.ReductionState` at every
forward call, from a forward hook on the module that outputs the embedded tokens ``[B, N, C]``.
``uninstall`` puts back exactly what was there (the class's method again, or the instance
attribute that was there before), so the model behaves bit for bit as before.
"""

from __future__ import annotations

from torch import nn

from .reduction import ReductionConfig, ReductionState

_PATCH_ATTRIBUTE = "_sdmerge_patch"


class ModelPatch:
    """The patch installed on ``owner``: the latest call's state, and how to undo everything."""

    def __init__(self, owner: nn.Module, config: ReductionConfig, embedding_module: nn.Module):
        self.config = config
        self.state: ReductionState | None = None
        self._replaced: list[tuple[nn.Module, str, object]] = []
        self._hook = embedding_module.register_forward_hook(self._start_call)
        setattr(owner, _PATCH_ATTRIBUTE, self)

    def _start_call(self, module, args, tokens) -> None:
        self.state = ReductionState(self.config, tokens.shape[1])

    def replace(self, module: nn.Module, name: str, value) -> None:
        """Set ``module.<name> = value`` until :meth:`uninstall`."""
        self._replaced.append((module, name, module.__dict__.get(name)))
        setattr(module, name, value)

    def uninstall(self, owner: nn.Module) -> None:
        self._hook.remove()
        for module, name, previous in reversed(self._replaced):
            if previous is None:
                delattr(module, name)
            else:
                setattr(module, name, previous)
        self._replaced.clear()
        delattr(owner, _PATCH_ATTRIBUTE)


def installed_patch(owner: nn.Module) -> ModelPatch | None:
    """The patch installed on ``owner``, or ``None``."""
    return owner.__dict__.get(_PATCH_ATTRIBUTE)


def remove_patch(owner: nn.Module) -> None:
    """Uninstall the patch on ``owner``, if any."""
    patch = installed_patch(owner)
    if patch is not None:
        patch.uninstall(owner)


def latest_state(owner: nn.Module) -> ReductionState | None:
    """The reduction state of the patched model's latest forward call (``None`` before the first)."""
    patch = installed_patch(owner)
    if patch is None:
        raise ValueError(f"{type(owner).__name__} is not patched by sdmerge")
    return patch.state

"""Generation boundaries from pipeline calls: a pipeline knows when a generation starts and ends.

Every diffusers pipeline runs its denoising loop inside ``with self.progress_bar(total=...)``
(or iterates ``self.progress_bar(timesteps)``), after setting the scheduler's timesteps and
before the first model call. While at least one model is patched, sdmerge wraps
``DiffusionPipeline.progress_bar``: when a pipeline holding a patched denoiser among its
components opens its loop, a new generation of that denoiser starts in the calling thread, and
it ends when the loop ends (normally, interrupted or by an exception). Any pipeline holding the
denoiser counts, including one made after ``apply`` (``from_pipe``, ``Pipeline(**components)``),
and the scheduler may be swapped at will. When the last patch is removed, ``progress_bar`` is
diffusers' own again.
"""

from __future__ import annotations

import weakref

from torch import nn
from torch._dynamo.eval_frame import OptimizedModule

from .generation import Generations

_watched: weakref.WeakKeyDictionary[nn.Module, Generations] = weakref.WeakKeyDictionary()
_original_progress_bar = None


def watch(denoiser: nn.Module, generations: Generations) -> None:
    """Mark ``generations`` at every pipeline loop over ``denoiser`` (until :func:`unwatch`)."""
    global _original_progress_bar
    from diffusers import DiffusionPipeline

    _watched[denoiser] = generations
    if _original_progress_bar is None:
        _original_progress_bar = DiffusionPipeline.progress_bar
        DiffusionPipeline.progress_bar = _progress_bar


def unwatch(denoiser: nn.Module) -> None:
    """Stop watching ``denoiser``; the last one puts diffusers' ``progress_bar`` back."""
    global _original_progress_bar
    from diffusers import DiffusionPipeline

    _watched.pop(denoiser, None)
    if not _watched and _original_progress_bar is not None:
        DiffusionPipeline.progress_bar = _original_progress_bar
        _original_progress_bar = None


def _components(pipeline) -> list[nn.Module]:
    """The modules a pipeline holds (its components are attributes), ``torch.compile`` wrappers unwrapped."""
    found = []
    for component in vars(pipeline).values():
        while isinstance(component, OptimizedModule):
            component = component._orig_mod
        if isinstance(component, nn.Module):
            found.append(component)
    return found


def _progress_bar(self, *args, **kwargs):
    """``DiffusionPipeline.progress_bar`` while models are patched (see the module docstring)."""
    bar = _original_progress_bar(self, *args, **kwargs)
    generations = [_watched[module] for module in _components(self) if module in _watched]
    return _DenoisingLoop(bar, generations) if generations else bar


class _DenoisingLoop:
    """A pipeline's progress bar that starts a generation of its patched models now and ends it
    when its ``with`` block (or iteration) ends; everything else goes to the tqdm bar."""

    def __init__(self, bar, generations: list[Generations]):
        self._bar = bar
        self._generations = generations
        for generation in generations:
            generation.mark()

    def _end(self) -> None:
        for generation in self._generations:
            generation.end()

    def __enter__(self):
        return self._bar.__enter__()

    def __exit__(self, *exc_info):
        try:
            return self._bar.__exit__(*exc_info)
        finally:
            self._end()

    def __iter__(self):
        try:
            yield from self._bar
        finally:
            self._end()

    def __getattr__(self, name):
        return getattr(self._bar, name)

"""``apply`` / ``remove``: find a model's denoiser, its layout, and install a :class:`~.state.MergeState`."""

from __future__ import annotations

import logging

from ..options import describe
from .config import APPLY_ARGUMENTS, MergeConfig
from .models import LAYOUTS
from .state import MergeState

_STATE_ATTRIBUTE = "_sdmerge"

SUPPORTED = "; ".join(family.SUPPORTED for family in LAYOUTS)
"""What :func:`apply` accepts."""

logger = logging.getLogger(__name__)


def _find(model):
    """``(layout module, denoiser)`` for ``model`` (a denoiser or a pipeline holding one), else
    ``(None, None)``."""
    for family in LAYOUTS:
        denoiser = family.find(model)
        if denoiser is not None:
            return family, denoiser
    return None, None


def why_unsupported(model) -> str | None:
    """Why a model of a diffusion family cannot be patched, for the dispatcher's error; ``None``
    for models of other families."""
    for family in LAYOUTS:
        reason = family.why_unsupported(model)
        if reason is not None:
            return reason
    return None


def accepts(model) -> bool:
    """Whether ``model`` is a supported denoiser or a pipeline holding one."""
    return _find(model)[1] is not None


def find_denoiser(model):
    """The denoiser of ``model`` (itself, or its pipeline's; the module a ``torch.compile``
    wrapper wraps); ``TypeError`` if it has none."""
    _, denoiser = _find(model)
    if denoiser is not None:
        return denoiser
    reason = why_unsupported(model)
    if reason is not None:
        raise TypeError(reason)
    raise TypeError(
        f"{type(model).__name__} is not supported by sdmerge's diffusion integration: expected "
        + "; ".join(family.SUPPORTED for family in LAYOUTS)
    )


def state_of(model) -> MergeState | None:
    """The state :func:`apply` installed on ``model``'s denoiser, or ``None``."""
    return getattr(find_denoiser(model), _STATE_ATTRIBUTE, None)


def apply(model, method: str = "tome", r: float = 0.5, **options):
    """Merge tokens in the transformer blocks of ``model``'s denoiser; returns ``model``.

    ``model``: a diffusers pipeline or its denoiser, either may be ``torch.compile``d. ``method``
    and ``r`` (the keep rate) and the options are checked before anything changes (``TypeError``
    for an unknown option, ``ValueError`` / ``TypeError`` for a bad value). Applying again
    replaces the previous patch. Options:

{options}
    """
    config = MergeConfig.from_options(method, r, options)
    family, denoiser = _find(model)
    if denoiser is None:
        find_denoiser(model)  # raises the reason
    _check_range_against_scheduler(config.timestep_range, getattr(model, "scheduler", None))
    state = MergeState(family.layout(denoiser, config), config)
    remove(denoiser)
    state.install()
    setattr(denoiser, _STATE_ATTRIBUTE, state)
    logger.info(
        "sdmerge: %s at r=%s merges %s of %s", config.method, config.keep_rate, "/".join(config.branches), state.names
    )
    return model


if apply.__doc__ is not None:  # None under python -OO
    apply.__doc__ = apply.__doc__.format(options=describe(MergeConfig, indent="    ", skip=APPLY_ARGUMENTS))


def _check_range_against_scheduler(timestep_range: tuple[float, float] | None, scheduler) -> None:
    """``ValueError`` if no timestep of ``scheduler`` (``0 .. num_train_timesteps - 1``) lies in the
    range; a warning if the range looks like fractions of the steps (``high <= 1``)."""
    last = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None)
    if timestep_range is None or not isinstance(last, int) or last < 2:
        return
    if timestep_range[0] > last - 1:
        raise ValueError(
            f"timestep_range={timestep_range!r} never merges: the pipeline's scheduler has timesteps "
            f"0 .. {last - 1}; allowed: low <= {last - 1}"
        )
    if timestep_range[1] <= 1:
        logger.warning(
            "sdmerge: timestep_range=%s merges only model calls at timesteps %g <= t <= %g of the scheduler's "
            "0 .. %d: it is in timestep units (999 = pure noise), not fractions of the steps; e.g. (300, %d) "
            "merges the first ~70%% of the steps.", timestep_range, *timestep_range, last - 1, last,
        )


def remove(model) -> None:
    """Undo :func:`apply`: every hook sdmerge installed is removed (no module or processor was
    replaced). Does nothing on a model that is not patched."""
    denoiser = find_denoiser(model)
    state = getattr(denoiser, _STATE_ATTRIBUTE, None)
    if state is not None:
        state.uninstall()
        delattr(denoiser, _STATE_ATTRIBUTE)


def merged_blocks(model) -> tuple[str, ...]:
    """Names of the transformer blocks ``apply`` merges in (``()`` if not patched)."""
    state = state_of(model)
    return () if state is None else state.names


def new_generation(model) -> None:
    """Mark that the next call of ``model``'s denoiser in this thread starts a new generation
    (plans reused by ``plan_every`` and the prompt mass of ``cis`` / ``crucial`` are not carried
    over). Pipeline calls mark their generations themselves; use this for a bare model run in a
    loop of your own. From the mark until the next one, the model's calls in this thread are one
    generation (the timestep rule is off). ``ValueError`` for a model that is not patched."""
    state = state_of(model)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched by sdmerge: call sdmerge.apply(model, ...) first")
    state.generations.mark()

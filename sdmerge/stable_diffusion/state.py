"""What :func:`sdmerge.stable_diffusion.apply` installs on one UNet, and the state it keeps between calls."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from torch import Tensor, nn

from ..core.plan import MergePlan
from ..methods import Method, get_method
from .config import MergeConfig
from .generation import GenerationBoundary
from .merged_block import MergedBlock
from .plan_reuse import PlanReuse
from .processors import TokenMergingProcessor
from .prompt_importance import PromptAttentionMassProcessor
from .randomness import SplitRandomness
from .unet_layout import blocks_to_merge

logger = logging.getLogger(__name__)


def _check_attention(name: str, attn: Attention | None, *, reads_probabilities: bool) -> None:
    """Raise ``ValueError`` if sdmerge cannot wrap the processor of ``attn`` correctly: ``attn1``
    (its input tokens are merged) or, with ``reads_probabilities``, ``attn2`` (its attention
    probabilities are recomputed beside it)."""
    if attn is None:
        raise ValueError(f"{name} is missing; the prompt importance needs the block's cross-attention")
    problems = []
    if isinstance(attn.processor, nn.Module):
        problems.append(
            f"its processor {type(attn.processor).__name__} is an nn.Module with weights of its own, which "
            "would leave the module tree while wrapped"
        )
    if attn.group_norm is not None or attn.spatial_norm is not None:
        problems.append("a group_norm / spatial_norm (statistics over all tokens)")
    if reads_probabilities:
        if not attn.is_cross_attention:
            problems.append("it is not a cross-attention")
        if attn.norm_q is not None or attn.norm_k is not None:
            problems.append("query/key normalisation, which the prompt attention mass does not model")
    elif attn.residual_connection:
        problems.append("residual_connection=True (the residual would be added to merged tokens)")
    if problems:
        raise ValueError(f"cannot merge tokens at {name}: " + "; ".join(problems))


class MergeState:
    """Everything :func:`apply` installs on one UNet, and the state it keeps between calls.

    Per UNet call (forward pre-hook): processors set on merged layers since the last call are
    wrapped (:meth:`wrap_new_processors`); the timestep (for seeding, generation boundaries and
    counting the steps of ``plan_every > 1``) is used as a tensor, and read back to the host
    (which synchronises with the device, and breaks a compiled graph) only to count the steps
    of ``plan_every > 1``. Per merged
    block: see :class:`MergedBlock`. Which plans are computed and which reused:
    :class:`~sdmerge.plan_reuse.PlanReuse` (``plans``).

    Generation boundaries (``cis``, ``crucial``, ``plan_every > 1``): a UNet call starts a new
    generation when its timestep is larger than the previous call's, or the shape of its
    ``sample`` differs; the prompt attention mass of the previous call is then forgotten, and
    new plans are computed.
    """

    def __init__(self, unet: UNet2DConditionModel, config: MergeConfig):
        self.unet = unet
        self.config = config
        self.method: Method = get_method(config.method, "sd")
        self.randomness = SplitRandomness(config.use_rand, config.seed)
        self.plans: PlanReuse[tuple[MergePlan, Tensor | None]] = PlanReuse(config.plan_every, config.share_plans)
        self.blocks = [
            MergedBlock(name, block, self) for name, block, _ in blocks_to_merge(unet, config.max_downsample)
        ]
        for block in self.blocks:
            _check_attention(f"{block.name}.attn1", block.module.attn1, reads_probabilities=False)
            if self.method.needs_importance:
                _check_attention(f"{block.name}.attn2", block.module.attn2, reads_probabilities=True)
        self.generations = GenerationBoundary()
        self.generation_start: bool | Tensor = True  # this call's (sdmerge.stable_diffusion.generation)
        self._layers: list[WrappedLayer] = []
        self._wrappers: list[object] = []  # every processor sdmerge made for this UNet
        self._logged_new_processors = False
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(block.name for block in self.blocks)

    @property
    def reads_timestep(self) -> bool:
        return self.method.needs_importance or self.randomness.reseeds or self.plans.counts_steps

    def install(self) -> None:
        for block in self.blocks:
            self._hooks.append(block.module.register_forward_pre_hook(block.capture_metric, with_kwargs=True))
            if block.grid_source is not None:
                self._hooks.append(block.grid_source[1].register_forward_pre_hook(block.record_grid, with_kwargs=True))
            attn1, attn2 = block.module.attn1, block.module.attn2
            self._layers.append(WrappedLayer(f"{block.name}.attn1", attn1, TokenMergingProcessor, block))
            if self.method.needs_importance:
                self._layers.append(
                    WrappedLayer(f"{block.name}.attn2", attn2, PromptAttentionMassProcessor, block.store_mass)
                )
        for layer in self._layers:
            self._wrap(layer)
        self._hooks.append(self.unet.register_forward_pre_hook(self.on_unet_call, with_kwargs=True))
        self.unet.set_default_attn_processor = self.set_default_attn_processor  # diffusers' own refuses ours

    def _wrap(self, layer: "WrappedLayer") -> None:
        layer.installed = layer.wrapper_type(layer.attn.processor, layer.argument)
        self._wrappers.append(layer.installed)
        layer.attn.set_processor(layer.installed)

    def _is_ours(self, processor) -> bool:
        return any(processor is wrapper for wrapper in self._wrappers)

    def _unwrapped(self, processor):
        """The processor under sdmerge's wrappers (``processor`` itself if it is not one)."""
        while self._is_ours(processor):
            processor = processor.original
        return processor

    def wrap_new_processors(self) -> None:
        """Wrap the processors set on merged layers since the last UNet call (attention slicing,
        fused QKV, ``set_attn_processor``), so that merging stays in effect; logged once.

        ``ValueError`` if a new processor cannot be wrapped correctly (see ``_check_attention``).
        One of sdmerge's own processors put back (``unfuse_qkv_projections``) is kept as it is.
        """
        wrapped = []
        for layer in self._layers:
            processor = layer.attn.processor
            if processor is layer.installed:
                continue
            if self._is_ours(processor):
                layer.installed = processor
                continue
            try:
                _check_attention(layer.name, layer.attn, reads_probabilities=layer.reads_probabilities)
            except ValueError as error:
                raise ValueError(
                    f"{error} (a processor set after sdmerge.apply; call sdmerge.remove before setting it)"
                ) from None
            self._wrap(layer)
            wrapped.append(layer.name)
        if wrapped and not self._logged_new_processors:
            self._logged_new_processors = True
            logger.warning(
                "sdmerge: the attention processors of %d merged layers (%s, ...) were replaced after sdmerge.apply "
                "(e.g. by enable_attention_slicing, fuse_qkv_projections or set_default_attn_processor); sdmerge "
                "wraps the new processors, so these layers keep merging tokens. sdmerge.remove gives the unmerged "
                "model.",
                len(wrapped),
                wrapped[0],
            )

    def set_default_attn_processor(self) -> None:
        """``unet.set_default_attn_processor()`` while patched (diffusers' own refuses sdmerge's processors):
        diffusers' default processor, chosen from the processors sdmerge wraps, under sdmerge's
        wrappers; merging stays in effect (``sdmerge.remove`` gives the unmerged model)."""
        current = [(layer.attn, layer.attn.processor) for layer in self._layers]
        for attn, processor in current:
            attn.set_processor(self._unwrapped(processor))
        try:
            type(self.unet).set_default_attn_processor(self.unet)
        except BaseException:  # e.g. custom processors diffusers has no default for: put ours back
            for attn, processor in current:
                attn.set_processor(processor)
            raise
        self.wrap_new_processors()

    def uninstall(self) -> None:
        for handle in self._hooks:
            handle.remove()
        for layer in self._layers:
            if self._is_ours(layer.attn.processor):
                layer.attn.set_processor(self._unwrapped(layer.attn.processor))
        saved = getattr(self.unet, "original_attn_processors", None)  # what unfuse_qkv_projections puts back
        if isinstance(saved, dict):
            self.unet.original_attn_processors = {name: self._unwrapped(p) for name, p in saved.items()}
        del self.unet.set_default_attn_processor
        self._hooks.clear()
        self._layers.clear()
        self._wrappers.clear()

    def on_unet_call(self, unet, args, kwargs) -> None:
        """UNet forward pre-hook: wrap new processors; read the timestep where it is needed."""
        sample = kwargs["sample"] if "sample" in kwargs else args[0]
        self.wrap_new_processors()
        if self.reads_timestep:
            timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
            if self.plans.counts_steps:  # counting steps reads it on the host (a graph break when compiled)
                timestep = float(torch.as_tensor(timestep).flatten()[0])
            starts_generation = False
            if self.method.needs_importance or self.plans.counts_steps:
                starts_generation = self.generation_start = self.generations.start_call(timestep, sample.shape)
                if starts_generation is True:  # known on the host; else a tensor, used by the blocks
                    for block in self.blocks:
                        block.cross_attention_mass = None
            self.randomness.start_call(timestep)
            self.plans.start_call(timestep, starts_generation is True)
        else:
            self.plans.start_call()


@dataclass(eq=False)
class WrappedLayer:
    """An attention layer whose processor sdmerge wraps: ``wrapper_type(processor, argument)``
    (``TokenMergingProcessor`` on ``attn1``, ``PromptAttentionMassProcessor`` on ``attn2``);
    ``installed``: the wrapper set last."""

    name: str
    attn: Attention
    wrapper_type: type
    argument: object
    installed: object = None

    @property
    def reads_probabilities(self) -> bool:
        """Whether the wrapper reads the layer's attention probabilities (``attn2``'s)."""
        return self.wrapper_type is PromptAttentionMassProcessor

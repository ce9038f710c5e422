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
from .processors import CrossAttentionMergingProcessor, FeedForwardMerging, TokenMergingProcessor
from .prompt_importance import PromptAttentionMassProcessor
from .randomness import SplitRandomness
from .unet_layout import blocks_to_merge

logger = logging.getLogger(__name__)


def _check_attention(name: str, attn: Attention | None, *, merges: bool, reads_probabilities: bool) -> None:
    """Raise ``ValueError`` if sdmerge cannot wrap the processor of ``attn`` correctly: with
    ``merges``, its input tokens are merged (``attn1``; ``attn2`` with ``merge_crossattn``); with
    ``reads_probabilities``, its attention probabilities are recomputed beside it (``attn2``)."""
    if attn is None:
        needs = "the prompt importance" if reads_probabilities else "merge_crossattn"
        raise ValueError(f"{name} is missing; {needs} needs the block's cross-attention")
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
    if merges and attn.residual_connection:
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

    ``merging``: whether the current UNet call merges (``timestep_range``). A call outside the
    range runs every branch unmerged; it counts for the generation boundaries (and ``cis`` /
    ``crucial`` still record ``p``), but not as a step of ``plan_every``: the first merged call
    after it that starts a generation computes new plans.
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
        self.generations = GenerationBoundary()
        self.generation_start: bool | Tensor = True  # this call's (sdmerge.stable_diffusion.generation)
        self._layers: list[WrappedLayer] = []
        for block in self.blocks:
            self._layers.extend(self._layers_of(block))
        for layer in self._layers:
            _check_attention(layer.name, layer.attn, merges=layer.merges, reads_probabilities=layer.reads_probabilities)
        self.merging = True
        self._unmerged_generation_start = False  # a generation started in a call outside timestep_range
        self._wrappers: list[object] = []  # every processor sdmerge made for this UNet
        self._logged_new_processors = False
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(block.name for block in self.blocks)

    @property
    def reads_timestep(self) -> bool:
        return (
            self.method.needs_importance
            or self.randomness.reseeds
            or self.plans.counts_steps
            or self.config.timestep_range is not None
        )

    def _layers_of(self, block: MergedBlock) -> list[WrappedLayer]:
        """The attention layers of ``block`` sdmerge wraps, with their wrappers (innermost first);
        ``ValueError`` for a block the options cannot merge."""
        config, module = self.config, block.module
        if config.kv_only and module.only_cross_attention:
            raise ValueError(
                f"kv_only cannot merge {block.name}.attn1: it is a cross-attention (only_cross_attention=True), "
                "whose keys and values are the prompt"
            )
        if config.merge_mlp and getattr(module, "ff", None) is None:
            raise ValueError(f"merge_mlp: {block.name} has no feed-forward layer (ff)")
        layers = [WrappedLayer(f"{block.name}.attn1", module.attn1, ((TokenMergingProcessor, block),))]
        attn2_wrappers = []
        if self.method.needs_importance:
            attn2_wrappers.append((PromptAttentionMassProcessor, block.store_mass))
        if config.merge_crossattn:  # outside the mass processor, which then sees the merged tokens
            attn2_wrappers.append((CrossAttentionMergingProcessor, block))
        if attn2_wrappers:
            layers.append(WrappedLayer(f"{block.name}.attn2", module.attn2, tuple(attn2_wrappers)))
        return layers

    def install(self) -> None:
        for block in self.blocks:
            self._hooks.append(block.module.register_forward_pre_hook(block.capture_metric, with_kwargs=True))
            if block.grid_source is not None:
                self._hooks.append(block.grid_source[1].register_forward_pre_hook(block.record_grid, with_kwargs=True))
            if self.config.merge_mlp:
                ff, merging = block.module.ff, FeedForwardMerging(block)
                self._hooks.append(ff.register_forward_pre_hook(merging.before, with_kwargs=True))
                self._hooks.append(ff.register_forward_hook(merging.after, with_kwargs=True))
        for layer in self._layers:
            self._wrap(layer)
        self._hooks.append(self.unet.register_forward_pre_hook(self.on_unet_call, with_kwargs=True))
        self.unet.set_default_attn_processor = self.set_default_attn_processor  # diffusers' own refuses ours

    def _wrap(self, layer: "WrappedLayer") -> None:
        processor = layer.attn.processor
        for wrapper_type, argument in layer.wrappers:
            processor = wrapper_type(processor, argument)
            self._wrappers.append(processor)
        layer.installed = processor
        layer.attn.set_processor(processor)

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
                _check_attention(
                    layer.name, layer.attn, merges=layer.merges, reads_probabilities=layer.reads_probabilities
                )
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
            if self.plans.counts_steps or self.config.timestep_range is not None:
                timestep = float(torch.as_tensor(timestep).flatten()[0])  # on the host: a graph break when compiled
            starts_generation = False
            if self.method.needs_importance or self.plans.counts_steps:
                starts_generation = self.generation_start = self.generations.start_call(timestep, sample.shape)
                if starts_generation is True:  # known on the host; else a tensor, used by the blocks
                    for block in self.blocks:
                        block.cross_attention_mass = None
            self.merging = self.config.merges_at(timestep)  # True without a range (no comparison made)
            if not self.merging:
                self._unmerged_generation_start |= starts_generation is True
                return
            self.randomness.start_call(timestep)
            self.plans.start_call(timestep, starts_generation is True or self._unmerged_generation_start)
            self._unmerged_generation_start = False
        else:
            self.plans.start_call()


@dataclass(eq=False)
class WrappedLayer:
    """An attention layer whose processor sdmerge wraps: for each ``(wrapper_type, argument)`` of
    ``wrappers``, innermost first, ``processor = wrapper_type(processor, argument)``
    (``TokenMergingProcessor`` on ``attn1``; on ``attn2`` ``PromptAttentionMassProcessor`` and/or
    ``CrossAttentionMergingProcessor``); ``installed``: the outermost wrapper set last."""

    name: str
    attn: Attention
    wrappers: tuple[tuple[type, object], ...]
    installed: object = None

    @property
    def reads_probabilities(self) -> bool:
        """Whether a wrapper reads the layer's attention probabilities (``attn2``'s)."""
        return any(wrapper_type is PromptAttentionMassProcessor for wrapper_type, _ in self.wrappers)

    @property
    def merges(self) -> bool:
        """Whether a wrapper runs the layer on merged tokens."""
        return any(wrapper_type is not PromptAttentionMassProcessor for wrapper_type, _ in self.wrappers)

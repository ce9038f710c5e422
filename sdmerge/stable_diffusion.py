"""Token merging in a diffusers Stable Diffusion UNet: ``apply`` / ``remove``.

For every transformer block at the chosen resolutions, the self-attention ``attn1`` runs on
merged tokens (ToMe for SD, Bolya & Hoffman 2023, section 3; the other methods only change
the grouping and the merge weights):

    x                         the block input, [B, N, C]: the similarity metric (captured by a pre-hook)
    h = norm1(x)              what attn1's processor receives, [B, N, C]
    plan = grouping(x)        a core MergePlan, N -> M = N - floor(N (1 - r)) groups
    y = attn1(plan.merge(h))  queries, keys and values all see the M merged tokens, [B, M, C]
    out = plan.unmerge(y)     every token gets its group's output back, [B, N, C]

and the block adds its residual as usual. The merging processor wraps the processor that was
there (custom ones included) and calls it on the merged tokens; ``remove`` puts the wrapped
processor objects back and removes every hook. A processor set on a merged layer after
``apply`` (attention slicing, fused QKV, ``set_default_attn_processor``, ``set_attn_processor``)
is wrapped in turn at the next UNet call, so merging stays in effect until ``remove``.

A ``torch.compile``d UNet (``OptimizedModule``) is patched through the module it wraps, so
``apply`` and ``remove`` work before or after compiling.

Which blocks: level ``l`` of the UNet is the resolution after ``l`` downsamplings (SD-1.5:
``down_blocks.l``, ``up_blocks.(3-l)``, the mid block at level 3). A block is merged when
``2 ** (l - l0) <= max_downsample``, where ``l0`` is the highest-resolution level that has
attention: on SD-1.x/2.x ``l0 = 0`` (the same blocks as ``tomesd``); on SDXL, whose top level
has no attention, the default merges level 1 (``down_blocks.1``, ``up_blocks.1``).

State: one :class:`MergeState` per patched UNet, at ``unet._sdmerge``.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, fields

import torch
from diffusers import Transformer2DModel, UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from torch import Tensor, nn
from torch._dynamo.eval_frame import OptimizedModule

from .core import check_keep_rate, random_2d_split, tokens_to_remove
from .core.plan import MergePlan
from .methods import METHODS, Method, get_method
from .plan_reuse import PlanReuse
from .prompt_importance import PromptAttentionMassProcessor, prompt_importance

SUPPORTED = "DiffusionPipeline (with a UNet2DConditionModel), UNet2DConditionModel (torch.compile'd or not)"
"""What :func:`apply` accepts: a UNet2DConditionModel, or a pipeline holding one as ``.unet``."""

_STATE_ATTRIBUTE = "_sdmerge"
_SPLIT_OPTIONS = ("sx", "sy", "use_rand", "seed")
_BIPARTITE_METHODS = tuple(m.name for m in METHODS.values() if "sd" in m.models and m.needs_split)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeConfig:
    """What :func:`apply` installs; checked on construction.

    Attributes:
        method: a Stable Diffusion method of ``sdmerge.methods`` (tome, atc_*, cis, crucial).
        keep_rate: ``r``, the fraction of tokens kept in a merged self-attention, ``0 < r <= 1``.
        max_downsample: merge the blocks whose downsampling factor, relative to the
            highest-resolution level with attention, is at most this.
        sx, sy: window of the random 2D split (one destination per ``sy x sx`` window).
        use_rand: random destination in each window (``False``: the top-left one).
        seed: re-seed the split's generator at every UNet call from ``(seed, timestep)``.
        plan_every: compute new merge plans at every ``plan_every``-th step of a generation
            and reuse them in between (``sdmerge.plan_reuse``); 1: every call (the papers).
        share_plans: one plan per resolution level per UNet call, computed by the level's
            first merged block and used by all of them; False: one per block (the papers).
    ``sx``, ``sy``, ``use_rand`` and ``seed`` belong to the bipartite methods (tome, cis).
    """

    method: str = "tome"
    keep_rate: float = 0.5
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    seed: int | None = None
    plan_every: int = 1
    share_plans: bool = False

    def __post_init__(self):
        method = get_method(self.method, "sd")
        object.__setattr__(self, "keep_rate", check_keep_rate(self.keep_rate))
        _check_int("max_downsample", self.max_downsample, minimum=1)
        if self.max_downsample & (self.max_downsample - 1):
            raise ValueError(
                f"max_downsample={self.max_downsample} is not a power of two; allowed: 1, 2, 4, 8, ... "
                "(the downsampling factor of a UNet level)"
            )
        _check_int("sx", self.sx, minimum=1)
        _check_int("sy", self.sy, minimum=1)
        if not isinstance(self.use_rand, bool):
            raise TypeError(f"use_rand must be True or False, got {self.use_rand!r}")
        if self.seed is not None:
            _check_int("seed", self.seed)
        if self.seed is not None and not self.use_rand:
            raise ValueError(f"seed={self.seed} has no effect with use_rand=False (the split is not random)")
        _check_int("plan_every", self.plan_every, minimum=1)
        if not isinstance(self.share_plans, bool):
            raise TypeError(f"share_plans must be True or False, got {self.share_plans!r}")
        if method.needs_split:
            # One destination per full window: the sources are at least N (1 - 1/(sx sy)), and
            # exactly that on grids the windows tile, so this bound is reachable on every grid.
            minimum = 1.0 / (self.sx * self.sy)
            if self.keep_rate < minimum:
                raise ValueError(
                    f"method {self.method!r} with a {self.sx}x{self.sy} stride keeps at least 1/{self.sx * self.sy} "
                    f"= {minimum:.4g} of the tokens (one destination per window); got r={self.keep_rate!r}"
                )
            return
        changed = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if f.name in _SPLIT_OPTIONS and getattr(self, f.name) != f.default
        ]
        if changed:
            raise ValueError(
                f"option {', '.join(changed)} does not apply to method {self.method!r}: {', '.join(_SPLIT_OPTIONS)} "
                f"set the source/destination split of the bipartite methods ({', '.join(_BIPARTITE_METHODS)})"
            )


OPTIONS = tuple(f.name for f in fields(MergeConfig) if f.name not in ("method", "keep_rate"))
"""The keyword options :func:`apply` accepts."""


def _check_int(name: str, value, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value} is not allowed; {name} must be >= {minimum}")


def _uncompiled(model):
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) wraps; any other object as it is."""
    while isinstance(model, OptimizedModule):
        model = model._orig_mod
    return model


def _unet_of(model) -> UNet2DConditionModel | None:
    """``model`` or ``model.unet`` as a UNet2DConditionModel (compiled or not), else ``None``."""
    for candidate in (model, getattr(model, "unet", None)):
        candidate = _uncompiled(candidate)
        if isinstance(candidate, UNet2DConditionModel):
            return candidate
    return None


def accepts(model) -> bool:
    """Whether ``model`` is a UNet2DConditionModel or holds one as ``.unet`` (SD pipelines);
    either may be wrapped by ``torch.compile``."""
    return _unet_of(model) is not None


def why_unsupported(model) -> str | None:
    """Why a model of the Stable Diffusion family that :func:`accepts` refuses cannot be patched
    (a ControlNet), for the dispatcher's error; ``None`` for other models."""
    if "ControlNet" in type(_uncompiled(model)).__name__:
        return (
            f"{type(model).__name__} is a ControlNet, which sdmerge leaves unmerged: it merges tokens in the "
            "pipeline's UNet only. Pass the pipeline or its UNet instead: sdmerge.apply(pipe) or "
            "sdmerge.apply(pipe.unet)"
        )
    return None


def find_unet(model) -> UNet2DConditionModel:
    """The UNet of ``model`` (itself, or ``model.unet``; the module a ``torch.compile`` wrapper
    wraps); ``TypeError`` if it has none."""
    unet = _unet_of(model)
    if unet is not None:
        return unet
    reason = why_unsupported(model)
    if reason is not None:
        raise TypeError(reason)
    held = getattr(model, "unet", None)
    found = "" if held is None else f" (its .unet is a {type(held).__name__})"
    raise TypeError(
        f"{type(model).__name__} is not supported by sdmerge's Stable Diffusion integration{found}: "
        "expected a diffusers UNet2DConditionModel or a pipeline holding one as .unet"
    )


def apply(
    model,
    method: str = "tome",
    r: float = 0.5,
    *,
    max_downsample: int = 1,
    sx: int = 2,
    sy: int = 2,
    use_rand: bool = True,
    seed: int | None = None,
    plan_every: int = 1,
    share_plans: bool = False,
    **unknown,
):
    """Merge tokens in the self-attention of ``model``'s UNet; returns ``model``.

    Args:
        model: a diffusers pipeline with a ``UNet2DConditionModel`` (SD-1.x, SD-2.x, SDXL and
            their img2img / inpaint / ControlNet variants), or that UNet; either may be
            ``torch.compile``d (the compiled module's ``_orig_mod`` is patched).
        method: ``tome``, ``atc_single``, ``atc_complete``, ``atc_average``, ``cis`` or ``crucial``.
        r: keep rate; a merged self-attention of ``N`` tokens sees ``N - floor(N (1 - r))``.
        max_downsample, sx, sy, use_rand, seed, plan_every, share_plans: see :class:`MergeConfig`
            (the last two: plan reuse, ``sdmerge.plan_reuse``; off by default).

    Applying again replaces the previous patch. Processors set on merged layers later
    (attention slicing, fused QKV, ``set_default_attn_processor``) keep merging: sdmerge wraps
    them at the next UNet call. Raises ``ValueError`` / ``TypeError`` for an unknown method or
    option, a keep rate outside ``(0, 1]`` or below what the method can reach, and a model or
    attention layer that cannot be merged.
    """
    if unknown:
        raise TypeError(
            f"unknown option {', '.join(sorted(unknown))} for Stable Diffusion; accepted: {', '.join(OPTIONS)}"
        )
    config = MergeConfig(method, r, max_downsample, sx, sy, use_rand, seed, plan_every, share_plans)
    unet = find_unet(model)
    remove(unet)
    state = MergeState(unet, config)
    state.install()
    setattr(unet, _STATE_ATTRIBUTE, state)
    logger.info("sdmerge: %s at r=%s merges the self-attention of %s", config.method, config.keep_rate, state.names)
    return model


def remove(model) -> None:
    """Undo :func:`apply`: every processor sdmerge wrapped is back, unwrapped, and no hook is left.

    Without processor changes after ``apply`` that is the original processor objects. A
    processor set after ``apply`` (slicing, fused QKV, ``set_attn_processor``) stays, without
    sdmerge's wrapper. Does nothing on a UNet that is not patched.
    """
    unet = find_unet(model)
    state = getattr(unet, _STATE_ATTRIBUTE, None)
    if state is not None:
        state.uninstall()
        delattr(unet, _STATE_ATTRIBUTE)


def merged_blocks(model) -> tuple[str, ...]:
    """Names of the transformer blocks whose self-attention ``apply`` merges (``()`` if not patched)."""
    state = getattr(find_unet(model), _STATE_ATTRIBUTE, None)
    return () if state is None else state.names


def transformer_blocks_by_level(unet: UNet2DConditionModel) -> list[tuple[str, BasicTransformerBlock, int]]:
    """Every ``BasicTransformerBlock`` of the UNet with its name and resolution level.

    The level of a down block is the number of downsamplers before it; the mid block is at
    the deepest level; each upsampler of an up block raises the resolution of the next one.
    """
    parts, level = [], 0
    for i, down in enumerate(unet.down_blocks):
        parts.append((f"down_blocks.{i}", down, level))
        level += getattr(down, "downsamplers", None) is not None
    if unet.mid_block is not None:
        parts.append(("mid_block", unet.mid_block, level))
    for i, up in enumerate(unet.up_blocks):
        parts.append((f"up_blocks.{i}", up, level))
        level -= getattr(up, "upsamplers", None) is not None
    return [
        (f"{prefix}.{name}", module, part_level)
        for prefix, part, part_level in parts
        for name, module in part.named_modules()
        if isinstance(module, BasicTransformerBlock)
    ]


def blocks_to_merge(unet: UNet2DConditionModel, max_downsample: int) -> list[tuple[str, BasicTransformerBlock, int]]:
    """The ``(name, block, level)`` whose downsampling factor relative to the first level with
    attention, ``2 ** (level - first)``, is at most ``max_downsample``."""
    blocks = transformer_blocks_by_level(unet)
    if not blocks:
        raise ValueError(f"{type(unet).__name__} has no transformer blocks (BasicTransformerBlock): nothing to merge")
    first = min(level for _, _, level in blocks)
    return [(name, block, level) for name, block, level in blocks if 2 ** (level - first) <= max_downsample]


def enclosing_transformer(unet: UNet2DConditionModel, block_name: str) -> tuple[str, Transformer2DModel]:
    """The innermost ``Transformer2DModel`` holding the transformer block ``block_name``, with its
    name: the module whose ``[B, C, H, W]`` input gives the block's token grid."""
    enclosing = [
        (name, module)
        for name, module in unet.named_modules()
        if isinstance(module, Transformer2DModel) and block_name.startswith(name + ".")
    ]
    if not enclosing:
        raise ValueError(
            f"{block_name} is not inside a Transformer2DModel: its token grid, which the split needs, is unknown"
        )
    return max(enclosing, key=lambda item: len(item[0]))


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
    counting the steps of ``plan_every > 1``) is read only when one of them needs it, since
    reading it synchronises with the device. Per merged
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
        self._previous_call: tuple[float, torch.Size] | None = None
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
            timestep = float(torch.as_tensor(kwargs["timestep"] if "timestep" in kwargs else args[1]).flatten()[0])
            starts_generation = self._starts_generation(timestep, sample.shape)
            if starts_generation:
                for block in self.blocks:
                    block.cross_attention_mass = None
            self._previous_call = (timestep, sample.shape)
            self.randomness.start_call(timestep)
            self.plans.start_call(timestep, starts_generation)
        else:
            self.plans.start_call()

    def _starts_generation(self, timestep: float, shape: torch.Size) -> bool:
        """A call starts a generation when its timestep is larger than the previous call's (the
        diffusion goes backwards in time), or its sample's shape changed."""
        previous = self._previous_call
        return previous is None or timestep > previous[0] or shape != previous[1]


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


class SplitRandomness:
    """Where the random destinations of the 2D split come from (bipartite methods).

    - ``use_rand=False``: none; the top-left cell of every window is the destination.
    - ``seed`` given: at every UNet call the generator is re-seeded from ``(seed, timestep)``,
      so identical pipeline calls draw identical patterns; the blocks of one call draw one
      after another. Two UNet calls at the same timestep (e.g. the two halves of
      classifier-free guidance run separately) get the same patterns.
    - ``seed=None``: a generator seeded once from a copy of torch's global CPU RNG taken at
      ``apply`` (the global RNG is not advanced) keeps drawing across calls, as in tomesd;
      runs are reproducible only by calling ``torch.manual_seed`` before ``apply``.
    Generators live on the tokens' device, one per device. The whole batch shares one
    pattern (matches are still per sample).
    """

    def __init__(self, use_rand: bool, seed: int | None):
        self.use_rand = use_rand
        self.seed = seed
        self._fork = torch.Generator().set_state(torch.get_rng_state()) if use_rand and seed is None else None
        self._call_seed: int | None = None
        self._generators: dict[torch.device, torch.Generator] = {}

    @property
    def reseeds(self) -> bool:
        return self.use_rand and self.seed is not None

    def start_call(self, timestep: float) -> None:
        if self.reseeds:
            digest = hashlib.blake2b(f"{self.seed}/{timestep!r}".encode(), digest_size=8).digest()
            self._call_seed = int.from_bytes(digest, "little") >> 1  # 63 bits: any torch seed
            self._generators.clear()

    def generator(self, device: torch.device) -> torch.Generator | None:
        if not self.use_rand:
            return None
        generator = self._generators.get(device)
        if generator is None:
            seed = self._call_seed if self.reseeds else int(torch.randint(2**63 - 1, (), generator=self._fork))
            generator = self._generators[device] = torch.Generator(device).manual_seed(seed)
        return generator


class MergedBlock:
    """One merged transformer block: its metric for the current call, and ``p`` from the last.

    ``metric``: the block input ``x`` ``[B, N, C]``, captured by a forward pre-hook and consumed
    by ``attn1``. ``cross_attention_mass``: ``p`` ``[B, N]`` written by ``attn2``; ``attn1`` runs
    before ``attn2`` in a block, so ``attn1`` reads the value of the previous UNet call.
    ``grid`` (bipartite methods): ``(H, W)`` of the ``[B, C, H, W]`` hidden states the block's
    ``Transformer2DModel`` (``grid_source``, with its name) received last, recorded by a forward
    pre-hook: the block's ``N = H * W`` tokens in raster order.
    ``observer``: ``None``, or a function called with ``(block, plan)`` with the plan of every
    call, computed or reused (set by :func:`sdmerge.plan_recording.record_plans`).
    """

    def __init__(self, name: str, module: BasicTransformerBlock, state: MergeState):
        self.name = name
        self.module = module
        self.state = state
        self.metric: Tensor | None = None
        self.cross_attention_mass: Tensor | None = None
        self.grid_source = enclosing_transformer(state.unet, name) if state.method.needs_split else None
        self.grid: tuple[int, int] | None = None
        self._unsplit_grids: set[tuple[int, int]] = set()  # grids too small for one window (logged)
        self.observer = None

    def capture_metric(self, module, args, kwargs) -> None:
        self.metric = args[0] if args else kwargs["hidden_states"]

    def record_grid(self, module, args, kwargs) -> None:
        hidden_states = args[0] if args else kwargs["hidden_states"]
        self.grid = tuple(hidden_states.shape[-2:]) if hidden_states.dim() == 4 else None

    def store_mass(self, mass: Tensor) -> None:
        self.cross_attention_mass = mass

    def merge_plan(self, attn: Attention, hidden_states: Tensor) -> tuple[MergePlan, Tensor | None] | None:
        """The plan and merge weights for ``hidden_states: [B, N, C]`` (``norm1(x)``), or ``None``
        when nothing is removed or the token grid holds no window of the split."""
        metric, self.metric = self.metric, None
        if metric is None or metric.shape[:2] != hidden_states.shape[:2]:
            raise RuntimeError(
                f"{self.name}.attn1 was called without its block's input, which sdmerge captures in a pre-hook "
                "on the block: call the transformer block (or the UNet), not its attention alone"
            )
        num_tokens = hidden_states.shape[1]
        remove = tokens_to_remove(num_tokens, self.state.config.keep_rate)
        if remove == 0 or (self.state.method.needs_split and not self._grid_holds_a_window(num_tokens)):
            return None
        merge = self.state.plans.plan(
            self.name, hidden_states.shape[:2], lambda: self._new_plan(attn, metric, hidden_states, remove)
        )
        if self.observer is not None and merge is not None:
            self.observer(self, merge[0])
        return merge

    def _new_plan(self, attn: Attention, metric: Tensor, hidden_states: Tensor, remove: int):
        """Group ``metric: [B, N, C]`` so that ``remove`` tokens go; the plan and merge weights."""
        method = self.state.method
        split = self._split(hidden_states.device) if method.needs_split else None
        importance = self._importance(attn, hidden_states) if method.needs_importance else None
        plan = method.plan(metric, remove, importance=importance, split=split)
        return plan, method.weights(None, importance)

    def _grid_holds_a_window(self, num_tokens: int) -> bool:
        """Whether this call's token grid holds one ``sy x sx`` window of the split. If not (a deep
        block at a small latent), the block runs unmerged for this call; logged once per grid."""
        source = self.grid_source[0]
        if self.grid is None:
            raise RuntimeError(
                f"{self.name}: its token grid is unknown, because {source} received no [B, C, H, W] hidden states "
                f"before it: call the UNet or {source}, not the block alone"
            )
        height, width = self.grid
        if height * width != num_tokens:
            raise RuntimeError(f"{self.name} has {num_tokens} tokens, not the {height}x{width} grid {source} received")
        config = self.state.config
        if height >= config.sy and width >= config.sx:
            return True
        if self.grid not in self._unsplit_grids:
            self._unsplit_grids.add(self.grid)
            logger.warning(
                "sdmerge: %s has a %dx%d token grid at this latent size, smaller than one window of %s's split "
                "(sy=%d, sx=%d): it runs unmerged (max_downsample=%d puts it among the merged blocks; a larger "
                "latent, smaller sx/sy or a smaller max_downsample avoid this).",
                self.name, height, width, config.method, config.sy, config.sx, config.max_downsample,
            )
        return False

    def _split(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The random 2D split of this block's token grid (recorded by :meth:`record_grid`)."""
        config = self.state.config
        generator = self.state.randomness.generator(device)
        return random_2d_split(*self.grid, config.sx, config.sy, generator=generator, device=device)

    def _importance(self, attn: Attention, hidden_states: Tensor) -> Tensor | None:
        """``p_i * ||v_i||`` (``sdmerge.prompt_importance``). Without ``p`` (first call of a
        generation): ``None`` for methods that only weight by importance (cis: uniform weights,
        i.e. tome), ``||v_i||`` (uniform ``p``) for the one that selects tokens by it (crucial)."""
        mass = self.cross_attention_mass
        if mass is None and self.state.method.needs_split:
            return None
        with torch.no_grad():
            return prompt_importance(attn, hidden_states, mass)


class TokenMergingProcessor:
    """``attn1`` processor: merge the tokens, run the original processor on them, unmerge.

    ``__call__(attn, hidden_states [B, N, C], **kwargs) -> [B, N, C]``. Everything but
    ``hidden_states`` goes to the original processor unchanged. (diffusers' ``Attention`` passes
    a processor only the ``cross_attention_kwargs`` its ``__call__`` names; this one names none,
    so such extra arguments for a custom ``attn1`` processor are dropped, and diffusers warns.)
    """

    def __init__(self, original, block: MergedBlock):
        self.original = original
        self.block = block

    def __call__(self, attn: Attention, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        merge = self.block.merge_plan(attn, hidden_states)
        if merge is None:
            return self.original(attn, hidden_states, *args, **kwargs)
        if kwargs.get("attention_mask") is not None:
            raise ValueError(f"{self.block.name}.attn1 got a self-attention mask, which merged tokens cannot use")
        plan, weights = merge
        return plan.unmerge(self.original(attn, plan.merge(hidden_states, weights), *args, **kwargs))

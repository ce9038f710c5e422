"""The random source/destination split of the bipartite methods, per model call."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF


class SplitRandomness:
    """Where the random destinations of the 2D split come from (bipartite methods).

    - ``use_rand=False``: none; the top-left cell of every window is the destination.
    - ``seed`` given: no generator; the destination of every window is a counter-based hash of
      ``(seed, timestep, block, window)`` computed with int64 tensor ops on the timestep and
      the tokens' device (no host read, no ``torch.Generator``: it compiles into the graph).
      Identical calls draw identical patterns, on every device and in every thread; the blocks
      of one call, the timesteps and the seeds draw different ones. Two model calls at the same
      timestep (e.g. the two halves of classifier-free guidance run separately) get the same
      patterns. The key of a call (:meth:`call_key`) belongs to the call.
    - ``seed=None``: a generator seeded once from a copy of torch's global CPU RNG taken at
      ``apply`` (the global RNG is not advanced) keeps drawing across calls, as in tomesd;
      runs are reproducible only by calling ``torch.manual_seed`` before ``apply``, and only
      when the calls run one after the other: threads calling one model draw from it in
      whatever order they reach it.
    Generators live on the tokens' device, one per device. The whole batch shares one
    pattern (matches are still per sample).
    """

    def __init__(self, use_rand: bool, seed: int | None):
        self.use_rand = use_rand
        self.seed = seed
        self._fork = torch.Generator().set_state(torch.get_rng_state()) if use_rand and seed is None else None
        self._seed_keys = _key32(f"sdmerge-split/{seed}", 2) if seed is not None else None
        self._generators: dict[torch.device, torch.Generator] = {}

    @property
    def reseeds(self) -> bool:
        return self.use_rand and self.seed is not None

    def call_key(self, timestep) -> Tensor | None:
        """With ``seed``: the key of a model call at ``timestep`` (a tensor, whose first element
        counts, or a number), a ``[]`` int64 tensor; ``None`` otherwise."""
        return _timestep_key(timestep, *self._seed_keys) if self.reseeds else None

    def cells(
        self, call_key: Tensor | None, stream: int, grid: tuple[int, int], sx: int, sy: int, device: torch.device
    ) -> Tensor | None:
        """With ``seed``: the destination cell of every ``sy x sx`` window of ``grid``,
        ``[h // sy, w // sx, 1]`` int64 on ``device`` (``call_key``: :meth:`call_key` of the call;
        ``stream``: the block's :func:`stream_key`); ``None`` otherwise (the split then uses
        :meth:`generator`)."""
        if not self.reseeds:
            return None
        height, width = grid
        windows = torch.arange((height // sy) * (width // sx), device=device, dtype=torch.int64)
        key = _mix32(call_key.to(device) ^ stream)
        return (_mix32(_mix32(windows ^ key) ^ stream) % (sx * sy)).view(height // sy, width // sx, 1)

    def generator(self, device: torch.device) -> torch.Generator | None:
        if not self.use_rand or self.reseeds:
            return None
        generator = self._generators.get(device)
        if generator is None:
            seed = int(torch.randint(2**63 - 1, (), generator=self._fork))
            generator = self._generators[device] = torch.Generator(device).manual_seed(seed)
        return generator


def stream_key(name: str) -> int:
    """A 32-bit key for one merged block (by its name): its own stream of seeded patterns."""
    return _key32(f"sdmerge-block/{name}", 1)[0]


def _key32(text: str, count: int) -> tuple[int, ...]:
    digest = hashlib.blake2b(text.encode(), digest_size=4 * count).digest()
    return tuple(int.from_bytes(digest[4 * i : 4 * i + 4], "little") for i in range(count))


def _mix32(x: Tensor) -> Tensor:
    """A bijective 32-bit integer hash (xorshift-multiply, as Wellons' lowbias32) of int64 values
    in ``[0, 2**32)``; the odd multipliers are below ``2**31``, so no product overflows int64."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _MASK32
    return x ^ (x >> 16)


def _timestep_key(timestep, seed_low: int, seed_high: int) -> Tensor:
    """``[]`` int64 in ``[0, 2**32)``: the hash of ``seed`` and the float32 bits of the timestep
    (its first element), on the timestep's device (float32: every device has it, MPS included);
    a number is hashed as the same float32."""
    if isinstance(timestep, Tensor):
        value = timestep.detach().flatten()[0].to(torch.float32)
    else:
        value = torch.tensor(float(timestep), dtype=torch.float32)
    bits = value.view(torch.int32).to(torch.int64) & _MASK32
    return _mix32(_mix32(bits ^ seed_low) ^ seed_high)

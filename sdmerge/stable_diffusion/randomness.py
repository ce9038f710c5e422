"""The random source/destination split of the bipartite methods, per UNet call."""

from __future__ import annotations

import hashlib

import torch


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

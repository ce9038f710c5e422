"""torch.compile of a patched UNet (issue 12): which methods compile into one graph, recompiles
over a generation, and the seeded split computed with tensor ops.

Backend ``aot_eager`` on the CPU (AOTAutograd's tracing, no code generation), on a one-level
UNet (3 merged blocks, half the tracing time of ``two_level_unet``); timesteps are tensors, as
pipelines pass them.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch._dynamo.testing import CompileCounterWithBackend

import sdmerge
from sdmerge.core import random_2d_split
from sdmerge.diffusion.randomness import SplitRandomness, stream_key
from tests.test_stable_diffusion import forward
from tests.tiny_diffusers import CONTEXT_DIM, sd15_unet, unet_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GENERATION = (999, 900, 800, 700)  # decreasing timesteps: one generation
NEXT = (950, 850)  # the timestep grows: a second generation

CASES = {
    "tome-fixed": ("tome", {"use_rand": False}),
    "tome-seed": ("tome", {"seed": 0}),
    "cis-fixed": ("cis", {"use_rand": False}),
    "cis-seed": ("cis", {"seed": 0}),
    "atc_average": ("atc_average", {}),
    "crucial": ("crucial", {}),
    "grid": ("grid", {}),
    "grid-kv_only": ("grid", {"kv_only": True}),
    "tome-fixed-all-branches-kv_only": (
        "tome", {"use_rand": False, "kv_only": True, "merge_crossattn": True, "merge_mlp": True}
    ),
}
# cis and crucial keep the previous call's prompt mass: the first call has none (Python None),
# so the second call compiles once more; every later call, new generations included, reuses it.
WARM_UP_CALLS = {"cis": 2, "crucial": 2}


def one_level_unet() -> UNet2DConditionModel:
    """One level with attention, no mid block: 3 transformer blocks, all merged."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32,),
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
        mid_block_type=None,
        cross_attention_dim=CONTEXT_DIM,
        attention_head_dim=4,
        layers_per_block=1,
        norm_num_groups=32,
    ).eval()


def calls(unet, sample, context, timesteps):
    with torch.no_grad():
        return [unet(sample, torch.tensor(t), context).sample for t in timesteps]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("case", list(CASES))
def test_fullgraph_compiles_and_equals_the_eager_patched_unet(case):
    """fullgraph=True (no graph break anywhere), outputs equal to eager bit for bit over two
    generations, and no recompilation from one step to the next."""
    method, options = CASES[case]
    unet = one_level_unet()
    sample, context = unet_inputs(size=8)
    timesteps = GENERATION + NEXT
    sdmerge.apply(unet, method, r=0.5, **options)
    eager = calls(unet, sample, context, timesteps)
    sdmerge.apply(unet, method, r=0.5, **options)  # fresh state: the compiled run starts like the eager one

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(unet, backend=counter, fullgraph=True)
    frames = []
    with torch.no_grad():
        for t, expected in zip(timesteps, eager):
            assert torch.equal(compiled(sample, torch.tensor(t), context).sample, expected), t
            frames.append(counter.frame_count)
    warm = WARM_UP_CALLS.get(method, 1)
    assert len(set(frames[warm - 1 :])) == 1, frames  # >= 4 calls without a recompile
    assert frames[0] > 0
    if case == "tome-fixed":  # the counter does see a recompilation: a new batch size is new shapes
        calls(compiled, *unet_inputs(batch=3, size=8), (600,))
        assert counter.frame_count > frames[-1]


def test_plan_every_reads_the_timestep_and_breaks_the_graph_there():
    """plan_every > 1 counts steps on the host: the compiled UNet still equals the eager one."""
    unet = one_level_unet()
    sample, context = unet_inputs(size=8)
    timesteps = (999, 900)  # a plan step, then a step that reuses its plans
    sdmerge.apply(unet, "tome", r=0.5, use_rand=False, plan_every=2)
    eager = calls(unet, sample, context, timesteps)
    sdmerge.apply(unet, "tome", r=0.5, use_rand=False, plan_every=2)
    compiled = torch.compile(unet, backend="aot_eager")
    assert all(torch.equal(a, b) for a, b in zip(calls(compiled, sample, context, timesteps), eager))
    sdmerge.apply(unet, "tome", r=0.5, use_rand=False, plan_every=2)
    torch._dynamo.reset()  # else the frames compiled above (with their graph break) are reused
    with pytest.raises(Exception, match="data-dependent|item|Unsupported"):  # float(timestep), compared
        calls(torch.compile(unet, backend="aot_eager", fullgraph=True), sample, context, timesteps)


def test_timestep_range_reads_the_timestep_and_compiles_one_graph_per_side_of_the_range():
    unet = one_level_unet()
    sample, context = unet_inputs(size=8)
    timesteps = (999, 900, 800, 700, 600, 500)  # merged down to 650, then unmerged
    sdmerge.apply(unet, "tome", r=0.5, use_rand=False, timestep_range=(650, 1000))
    eager = calls(unet, sample, context, timesteps)
    sdmerge.apply(unet, "tome", r=0.5, use_rand=False, timestep_range=(650, 1000))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(unet, backend=counter)
    frames = []
    with torch.no_grad():
        for t, expected in zip(timesteps, eager):
            assert torch.equal(compiled(sample, torch.tensor(t), context).sample, expected), t
            frames.append(counter.frame_count)
    assert frames[0] == frames[3] < frames[4] == frames[5]  # one recompile: the first unmerged call
    torch._dynamo.reset()
    sdmerge.apply(unet, "tome", r=0.5, use_rand=False, timestep_range=(650, 1000))
    with pytest.raises(Exception, match="data-dependent"):  # float(timestep), compared with the range
        calls(torch.compile(unet, backend="aot_eager", fullgraph=True), sample, context, timesteps)


# --- the seeded split: tensor ops, no generator ---------------------------------------------------


def cells(randomness, timestep, name="block", grid=(8, 6), sx=2, sy=2):
    key = randomness.call_key(timestep)
    return randomness.cells(key, stream_key(name), grid, sx, sy, torch.device("cpu"))


def test_seeded_cells_are_a_function_of_seed_timestep_and_block():
    seeded = SplitRandomness(use_rand=True, seed=0)
    first = cells(seeded, torch.tensor(500))
    assert first.shape == (4, 3, 1) and first.dtype == torch.int64
    assert torch.equal(cells(seeded, torch.tensor(400)), cells(seeded, torch.tensor(400)))
    assert torch.equal(cells(seeded, torch.tensor(500)), first)
    assert torch.equal(cells(seeded, 500), first)  # a number is the same timestep as a tensor
    assert torch.equal(cells(seeded, torch.tensor(500.0)), first)  # and its dtype does not matter
    assert torch.equal(cells(seeded, torch.tensor([500, 500])), first)  # a batch of timesteps: the first
    assert not torch.equal(cells(seeded, torch.tensor(499)), first)
    assert not torch.equal(cells(seeded, torch.tensor(500), name="other"), first)
    assert not torch.equal(cells(SplitRandomness(use_rand=True, seed=1), torch.tensor(500)), first)
    assert SplitRandomness(use_rand=True, seed=None).cells(None, 0, (8, 6), 2, 2, torch.device("cpu")) is None
    assert seeded.generator(torch.device("cpu")) is None  # no torch.Generator with seed=


def test_seeded_cells_are_uniform_over_the_window():
    """Over many windows and timesteps every cell of a 2x2 (and 3x2) window is drawn about as often."""
    seeded = SplitRandomness(use_rand=True, seed=7)
    for sx, sy in ((2, 2), (3, 2)):
        drawn = torch.cat([cells(seeded, t, grid=(32, 30), sx=sx, sy=sy).flatten() for t in range(0, 1000, 50)])
        counts = torch.bincount(drawn, minlength=sx * sy).float()
        assert counts.numel() == sx * sy
        assert (counts / counts.mean() - 1).abs().max() < 0.1, counts


def test_seeded_cells_make_a_valid_split():
    seeded = SplitRandomness(use_rand=True, seed=3)
    h, w = 9, 7  # leftover row and column: sources
    src, dst = random_2d_split(h, w, 2, 2, cell=cells(seeded, 321, grid=(h, w)))
    assert dst.numel() == (h // 2) * (w // 2)
    assert torch.equal(torch.sort(torch.cat([src, dst])).values, torch.arange(h * w))
    rows, cols = dst // w, dst % w
    windows = (rows // 2) * (w // 2) + cols // 2
    assert torch.equal(torch.sort(windows).values, torch.arange(dst.numel()))  # one per window
    with pytest.raises(ValueError, match=r"cell must be \[h // sy, w // sx, 1\]"):
        random_2d_split(h, w, 2, 2, cell=torch.zeros(3, 3, 1, dtype=torch.int64))


def test_tensor_timesteps_find_the_same_generation_boundaries():
    """Timesteps as tensors (the rule is then computed on the device, no host read) give what
    numbers give: cis equals tome exactly at the first call of a generation."""
    unet = sd15_unet()
    pair, triple = unet_inputs(batch=2), unet_inputs(batch=3)
    schedule = [(pair, 900), (pair, 800), (pair, 950), (pair, 950), (triple, 700), (triple, 600)]

    def outputs(method, as_tensor):
        sdmerge.apply(unet, method, r=0.5, **({} if method == "crucial" else {"use_rand": False}))
        return [forward(unet, *inputs, torch.tensor(t) if as_tensor else t) for inputs, t in schedule]

    tome, cis = outputs("tome", True), outputs("cis", True)
    assert [torch.equal(a, b) for a, b in zip(tome, cis)] == [True, False, True, False, True, False]
    assert all(torch.equal(a, b) for a, b in zip(cis, outputs("cis", False)))
    crucial = outputs("crucial", True)
    assert all(torch.equal(a, b) for a, b in zip(crucial, outputs("crucial", False)))

"""sdmerge.visualize (painting by groups) and sdmerge.plan_recording (SD plans, ViT provenance)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import ViTForImageClassification

import sdmerge
from sdmerge.core import MergePlan
from sdmerge.plan_recording import record_plans, vit_provenance_after
from sdmerge.diffusion import merged_blocks
from sdmerge.visualize import DROPPED, paint_groups, token_labels
from tests.test_vit import images, tiny
from tests.tiny_diffusers import SD15_MERGED, sd15_unet, tiny_pipeline, unet_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A 3x4 token grid with three groups, one of them not connected, and one dropped token.
LABELS = torch.tensor([
    [0, 0, 1, 1],
    [0, 2, 2, 1],
    [5, 2, 2, DROPPED],
])
GROUP_OF = {0: 0, 1: 1, 2: 2, 5: 0}  # label 5 is painted as its own group


def test_paint_groups_mean_colour_and_borders():
    p = 3
    image = torch.rand(3, 3 * p, 4 * p, generator=torch.Generator().manual_seed(0))
    painted = paint_groups(image, LABELS.flatten(), (3, 4), border_color=None, dropped_color=(0.2, 0.3, 0.4))
    pixel_labels = LABELS.repeat_interleave(p, 0).repeat_interleave(p, 1)
    for label in (0, 1, 2, 5):
        area = pixel_labels == label
        expected = image[:, area].mean(dim=1)
        assert torch.allclose(painted[:, area], expected[:, None].expand(3, int(area.sum())), atol=1e-6)
    assert torch.equal(painted[:, pixel_labels == DROPPED], torch.tensor([[0.2], [0.3], [0.4]]).expand(3, p * p))

    bordered = paint_groups(image, LABELS.flatten(), (3, 4), border_color=(1.0, 0.0, 1.0))
    is_border = (bordered == torch.tensor([1.0, 0.0, 1.0])[:, None, None]).all(dim=0)
    expected_border = torch.zeros_like(is_border)
    for y in range(3 * p):
        for x in range(4 * p):
            neighbours = [(y + dy, x + dx) for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0))]
            expected_border[y, x] = any(
                0 <= ny < 3 * p and 0 <= nx < 4 * p and pixel_labels[ny, nx] != pixel_labels[y, x] for ny, nx in neighbours
            )
    assert torch.equal(is_border, expected_border)
    plain = paint_groups(image, LABELS.flatten(), (3, 4), border_color=None)
    assert torch.equal(bordered[:, ~expected_border], plain[:, ~expected_border])


def test_paint_groups_numpy_uint8_image_gives_float_array():
    image = (np.arange(6 * 8 * 3) % 256).astype(np.uint8).reshape(6, 8, 3)
    painted = paint_groups(image, LABELS[None].flatten(1), (3, 4), border_color=None)
    assert painted.shape == (6, 8, 3) and painted.dtype == np.float32
    area = (LABELS.repeat_interleave(2, 0).repeat_interleave(2, 1) == 1).numpy()
    np.testing.assert_allclose(painted[area], np.broadcast_to(image[area].mean(0) / 255, (int(area.sum()), 3)), atol=1e-6)


def test_paint_groups_rejects_bad_input():
    image = torch.rand(3, 6, 8)
    with pytest.raises(ValueError, match="12 tokens, but labels has 11"):
        paint_groups(image, torch.zeros(11, dtype=torch.long), (3, 4))
    with pytest.raises(ValueError, match="does not tile"):
        paint_groups(torch.rand(3, 7, 8), LABELS.flatten(), (3, 4))
    with pytest.raises(ValueError, match="integer"):
        paint_groups(image, LABELS.flatten().float(), (3, 4))
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        paint_groups(torch.rand(6, 8), LABELS.flatten(), (3, 4))


def test_token_labels_strip_protected_and_mark_dropped():
    plan = MergePlan(torch.tensor([[0, 1, 3, 2, 1]]), 3, drops=True)
    assert token_labels(plan, protected=1).tolist() == [[1, DROPPED, 2, 1]]
    with pytest.raises(ValueError, match="protected=True"):
        token_labels(plan, protected=True)


# --- Stable Diffusion: recording plans during a pipeline call ---------------------------------


def test_record_plans_records_exactly_the_asked_blocks_and_steps():
    pipe = tiny_pipeline()
    sdmerge.apply(pipe, "tome", r=0.5, use_rand=False)
    blocks = [SD15_MERGED[0], SD15_MERGED[3]]
    call = dict(prompt="a cat", num_inference_steps=3, height=32, width=32, output_type="latent")
    modules = [pipe.unet] + [pipe.unet.get_submodule(block.rpartition(".transformer_blocks.")[0]) for block in blocks]
    hooks_before = [len(module._forward_pre_hooks) for module in modules]
    with record_plans(pipe, blocks=blocks, steps=[0, 2]) as plans:
        pipe(**call, generator=torch.Generator().manual_seed(0))
    assert sorted(plans) == sorted((step, block) for step in (0, 2) for block in blocks)
    for (step, block), recorded in plans.items():
        assert (recorded.step, recorded.block) == (step, block)
        # 32x32 image -> 16x16 latent; level 0 blocks: 256 tokens; CFG: batch 2; r = 0.5 keeps 128
        assert recorded.grid == (16, 16) and recorded.labels.shape == (2, 256) and recorded.num_groups == 128
        assert recorded.labels.max() == 127
    # nothing is recorded after the with block, and no hook or observer is left
    pipe(**call, generator=torch.Generator().manual_seed(0))
    assert len(plans) == 4
    state = pipe.unet._sdmerge
    assert all(block.observer is None for block in state.blocks)
    assert [len(module._forward_pre_hooks) for module in modules] == hooks_before


def test_record_plans_all_blocks_every_step_and_labels_are_the_plans_used():
    unet = sd15_unet()
    sample, context = unet_inputs(batch=1)
    sdmerge.apply(unet, "atc_average", r=0.5)
    used = []
    original = MergePlan.merge

    def spy(plan, x, weights=None):
        used.append(plan.labels)
        return original(plan, x, weights)

    with record_plans(unet) as plans:
        MergePlan.merge = spy
        try:
            with torch.no_grad():
                unet(sample, 10, context)
        finally:
            MergePlan.merge = original
    assert sorted(plans) == [(0, name) for name in sorted(merged_blocks(unet))]
    assert [plans[0, name].labels for name in merged_blocks(unet)] == used  # the same tensors, in block order


def test_record_plans_rejects_bad_requests():
    unet = sd15_unet()
    with pytest.raises(ValueError, match="not patched"):
        with record_plans(unet):
            pass
    sdmerge.apply(unet, "tome", r=0.5)
    with pytest.raises(ValueError, match="not merged"):
        with record_plans(unet, blocks=["mid_block.attentions.0.transformer_blocks.0"]):
            pass
    with pytest.raises(ValueError, match="steps"):
        with record_plans(unet, steps=[True]):
            pass


# --- ViT: provenance after a chosen block -------------------------------------------------------


def test_vit_provenance_after_block_paints_the_groups_of_that_block():
    model = tiny(ViTForImageClassification, num_hidden_layers=4)
    sdmerge.apply(model, "atc_average", r=0.5, stages=(1, 3))
    x = images(batch=2)
    assert vit_provenance_after(model, x, 0) is None
    after_1 = vit_provenance_after(model, x, 1)
    after_3 = vit_provenance_after(model, x, 3)
    assert after_1.labels.shape == (2, 17) and after_1.num_groups == 9  # 16 patches + class -> 1 + 8
    assert after_3.num_groups == 5
    assert torch.equal(after_3.labels, sdmerge.vit.reduction_state(model).provenance.labels)
    labels = token_labels(after_1, protected=1)  # the class token (group 0) is left out
    assert labels.shape == (2, 16) and labels.min() >= 1
    image = x[0] - x[0].min()
    painted = paint_groups(image, labels[0], (4, 4), border_color=None)  # 8x8 patches
    for group in labels[0].unique():
        area = (labels[0] == group).view(4, 4).repeat_interleave(8, 0).repeat_interleave(8, 1)
        assert torch.allclose(painted[:, area], image[:, area].mean(1, keepdim=True).expand(3, int(area.sum())), atol=1e-5)
    with pytest.raises(ValueError, match="block=4"):
        vit_provenance_after(model, x, 4)


def test_record_plans_records_reused_plans_too():
    pipe = tiny_pipeline()
    sdmerge.apply(pipe, "tome", r=0.5, use_rand=False, plan_every=2)
    with record_plans(pipe, blocks=SD15_MERGED[0], steps=None) as plans:
        pipe("a cat", num_inference_steps=3, height=32, width=32, output_type="latent")
    assert sorted(plans) == [(step, SD15_MERGED[0]) for step in range(3)]
    assert plans[1, SD15_MERGED[0]].labels is plans[0, SD15_MERGED[0]].labels  # step 1 reuses step 0's plan
    assert plans[2, SD15_MERGED[0]].labels is not plans[0, SD15_MERGED[0]].labels


def test_vit_provenance_after_block_on_timm():
    from tests import test_timm_vit

    if test_timm_vit.timm is None:
        pytest.skip("timm is not installed (pip install --no-deps timm)")
    model = test_timm_vit.tiny()
    sdmerge.apply(model, "tome", r=0.5, stages=(1, 2))
    x = images(batch=2)
    after_1 = vit_provenance_after(model, x, 1)
    assert after_1.num_groups == 9 and after_1.labels.shape == (2, 17)
    assert torch.equal(vit_provenance_after(model, x, 3).labels, sdmerge.vit.reduction_state(model).provenance.labels)

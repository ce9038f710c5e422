"""The sweep's work: arms, seeds and prompts per image, and the split over processes."""

import pytest

from eval.errors import UserError
from eval.seeds import image_seed
from eval.worklist import Arm, make_arms, make_work_list, process_share

METHODS = ["tome", "atc_single", "atc_average", "atc_complete", "cis"]
RATES = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]


def test_arms_are_the_baseline_then_methods_by_keep_rate():
    arms = make_arms(METHODS, RATES)
    assert len(arms) == 31
    assert arms[0] == Arm(None) and arms[0].name == "baseline"
    assert [a.name for a in arms[1:3]] == ["tome_r0.9", "tome_r0.8"]
    assert arms[-1].name == "cis_r0.4"
    assert len({a.name for a in arms}) == 31


def test_plan_reuse_axes_make_arms_of_their_own_and_no_reuse_keeps_the_old_names():
    arms = make_arms(["tome", "atc_average"], [0.5, 0.4], plan_every=[1, 5], share_plans=[False, True])
    assert len(arms) == 1 + 2 * 4 * 2
    assert [a.name for a in arms[1:9]] == [
        "tome_r0.5",  # no reuse: the name of sweeps from before the reuse options, whose images are reused
        "tome_r0.4",
        "tome_r0.5_shared",
        "tome_r0.4_shared",
        "tome_r0.5_every5",
        "tome_r0.4_every5",
        "tome_r0.5_shared_every5",
        "tome_r0.4_shared_every5",
    ]
    assert arms[-1] == Arm("atc_average", 0.4, plan_every=5, share_plans=True)
    assert [a.row for a in arms[:4]] == ["baseline", "tome", "tome", "tome_shared"]
    assert arms[-1].row == "atc_average_shared_every5"
    assert len({a.name for a in arms}) == len(arms)
    assert make_arms(["tome"], [0.5]) == make_arms(["tome"], [0.5], [1], [False]) == [Arm(None), Arm("tome", 0.5)]


@pytest.mark.parametrize(
    "plan_every, share_plans, message",
    [
        ([0], [False], "--plan-every: 0 is not allowed"),
        ([True], [False], "--plan-every: True is not allowed"),
        ([2.0], [False], "--plan-every: 2.0"),
        ([1, 1], [False], "--plan-every: 1, 1 repeats a value"),
        ([1], ["yes"], "--share-plans: 'yes' is not allowed"),
        ([1], [True, True], "--share-plans: True, True repeats"),
    ],
)
def test_bad_reuse_axes_are_named(plan_every, share_plans, message):
    with pytest.raises(UserError, match=message):
        make_arms(["tome"], [0.5], plan_every, share_plans)


@pytest.mark.parametrize(
    "methods, rates, message",
    [
        (["tomee"], [0.5], "unknown method 'tomee'"),
        (["topk"], [0.5], "topk"),
        (["tome"], [0.0], "r=0.0"),
        (["tome"], [1.5], "r=1.5"),
        (["tome", "tome"], [0.5], "--methods"),
        (["tome"], [0.5, 0.5], "--keep-rates"),
    ],
)
def test_bad_arms_are_named(methods, rates, message):
    with pytest.raises(UserError, match=message):
        make_arms(methods, rates)


def test_seeds_and_prompts_are_identical_across_arms():
    arms = make_arms(METHODS, RATES)
    classes = [0, 7, 18, 517, 999]
    items = make_work_list(arms, classes, images_per_class=2)
    assert len(items) == len(arms) * len(classes) * 2
    per_arm = {}
    for item in items:
        per_arm.setdefault(item.arm, []).append((item.class_index, item.image_index, item.seed, item.prompt))
    first = per_arm[arms[0]]
    assert all(images == first for images in per_arm.values())
    assert [seed for _, _, seed, _ in first] == [0, 1, 70, 71, 180, 181, 5170, 5171, 9990, 9991]
    assert first[4][3] == "A high quality photograph of a magpie."


def test_seeds_are_distinct_over_the_whole_protocol_and_follow_the_atc_formula():
    seeds = {image_seed(c, i) for c in range(1000) for i in range(10)}
    assert len(seeds) == 10000
    for c, i in [(0, 0), (3, 1), (42, 9), (999, 1)]:
        assert image_seed(c, i, base_seed=5) == 5 + int(f"{c}{i}")  # the ATC authors' sd_generate.py
    with pytest.raises(UserError, match="at most 10"):
        image_seed(1, 10)


@pytest.mark.parametrize("count", [0, 11])
def test_images_per_class_outside_the_seed_formula_is_refused(count):
    with pytest.raises(UserError, match="--images-per-class"):
        make_work_list([Arm(None)], [0], count)


@pytest.mark.parametrize("processes", [1, 2, 3, 4, 7])
def test_each_image_is_made_by_exactly_one_process(processes):
    items = make_work_list(make_arms(["tome", "atc_average"], [0.9, 0.5]), list(range(11)), 2)
    shares = [process_share(items, p, processes) for p in range(processes)]
    made = [item for share in shares for item in share]
    assert sorted(made, key=items.index) == items  # every item once: no duplicates, none lost
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    for share in shares:  # every process keeps the arm-major order (one warm-up per arm)
        assert share == sorted(share, key=items.index)
    with pytest.raises(ValueError):
        process_share(items, processes, processes)

"""The shipped ImageNet-1k class list and the prompts built from it."""

import pytest

from eval.errors import UserError
from eval.imagenet_classes import WNID_PATTERN, imagenet_classes, parse_class_selection


def test_one_thousand_distinct_classes_in_sorted_wnid_order():
    classes = imagenet_classes()
    assert len(classes) == 1000
    assert [c.index for c in classes] == list(range(1000))
    wnids = [c.wnid for c in classes]
    assert all(WNID_PATTERN.fullmatch(w) for w in wnids)
    assert wnids == sorted(set(wnids))
    names = [c.name for c in classes]
    assert len(set(names)) == 1000, "every prompt must be distinct"
    assert all(name and name == name.strip() and "\t" not in name for name in names)


def test_the_three_edits_and_well_known_entries():
    classes = imagenet_classes()
    assert (classes[7].wnid, classes[7].name) == ("n01514668", "male chicken, cock")
    assert (classes[134].wnid, classes[134].name) == ("n02012849", "crane, a type of bird")
    assert (classes[517].wnid, classes[517].name) == ("n03126707", "crane, construction equipment")
    assert (classes[0].wnid, classes[0].name) == ("n01440764", "tench, Tinca tinca")
    assert classes[18].name == "magpie"
    assert classes[207].name == "golden retriever"
    assert (classes[999].wnid, classes[999].name) == ("n15075141", "toilet tissue, toilet paper, bathroom tissue")


def test_prompt_uses_the_whole_lemma_list():
    assert imagenet_classes()[1].prompt == "A high quality photograph of a goldfish, Carassius auratus."


def test_class_selection_parses_ranges_and_indices():
    assert parse_class_selection("0-3,18, 2,999") == [0, 1, 2, 3, 18, 999]
    assert parse_class_selection("0-999") == list(range(1000))


@pytest.mark.parametrize("text", ["1000", "5-2", "a", "", "1,,2", "-1"])
def test_bad_class_selection_is_named(text):
    with pytest.raises(UserError, match="--classes"):
        parse_class_selection(text)

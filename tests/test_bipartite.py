"""ToMe bipartite soft matching: the 2D split against tomesd, the alternating split, protection."""

import pytest
import torch
from tomesd.merge import bipartite_soft_matching_random2d

from sdmerge.core import alternating_split, bipartite_soft_matching, random_2d_split


def groups_of(merge_fn, tokens):
    """The partition a merge function applies, read off by merging one-hot token vectors."""
    onehot = torch.eye(tokens, dtype=torch.float64).expand(1, tokens, tokens)
    merged = merge_fn(onehot)[0]  # every merged row is non-zero exactly on its members
    return sorted(tuple(row.nonzero().squeeze(1).tolist()) for row in merged)


@pytest.mark.parametrize("h, w, sx, sy", [(8, 8, 2, 2), (7, 9, 2, 2), (6, 9, 3, 3), (10, 6, 2, 3)])
@pytest.mark.parametrize("use_rand", [False, True])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.7])
def test_2d_split_matches_tomesd(h, w, sx, sy, use_rand, fraction):
    tokens = h * w
    metric = torch.randn(3, tokens, 12, generator=torch.Generator().manual_seed(tokens + sx))
    hsy, wsx = h // sy, w // sx
    remove = min(int(tokens * fraction), tokens - hsy * wsx)
    theirs_gen = torch.Generator().manual_seed(11) if use_rand else None
    ours_gen = torch.Generator().manual_seed(11) if use_rand else None
    merge, unmerge = bipartite_soft_matching_random2d(
        metric, w, h, sx, sy, remove, no_rand=not use_rand, generator=theirs_gen
    )
    plan = bipartite_soft_matching(metric, remove, *random_2d_split(h, w, sx, sy, generator=ours_gen))
    assert plan.num_groups == tokens - remove
    x = torch.randn(3, tokens, 5)
    # identical merged values (as a set of rows; the order of groups differs) ...
    theirs = merge(x)
    ours = plan.merge(x)
    torch.testing.assert_close(ours.sort(dim=1).values, theirs.sort(dim=1).values)
    # ... and identical copy-back unmerge
    torch.testing.assert_close(plan.unmerge(ours), unmerge(theirs))
    for b in range(3):
        single = bipartite_soft_matching(metric[b : b + 1], remove, *random_2d_split(
            h, w, sx, sy, generator=torch.Generator().manual_seed(11) if use_rand else None))
        their_single, _ = bipartite_soft_matching_random2d(
            metric[b : b + 1], w, h, sx, sy, remove, no_rand=not use_rand,
            generator=torch.Generator().manual_seed(11) if use_rand else None)
        assert groups_of(lambda t: single.merge(t), tokens) == groups_of(their_single, tokens)


def test_2d_split_layout():
    src, dst = random_2d_split(5, 4, 2, 2)  # top-left of each 2x2 window; row 4 is leftover
    assert dst.tolist() == [0, 2, 8, 10]
    assert sorted(src.tolist() + dst.tolist()) == list(range(20))
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(random_2d_split(8, 8, generator=gen_a)[1], random_2d_split(8, 8, generator=gen_b)[1])
    with pytest.raises(ValueError, match="no full 2x2 window"):
        random_2d_split(1, 8)


def test_alternating_split_protects_the_prefix():
    src, dst = alternating_split(11, protected=2)
    assert src.tolist() == [2, 4, 6, 8, 10] and dst.tolist() == [3, 5, 7, 9]
    metric = torch.randn(4, 11, 8)
    metric[:, 0] = metric[:, 3]  # the class token is identical to a destination: still never merged
    plan = bipartite_soft_matching(metric, 5, src, dst)
    assert plan.num_groups == 6
    assert torch.equal(plan.labels[:, :2], torch.tensor([[0, 1]] * 4))
    assert (plan.labels[:, 2:] >= 2).all()


def test_matching_merges_the_most_similar_sources():
    # sources 0, 2 are near-copies of destinations 1, 3; source 4 is orthogonal to both
    metric = torch.tensor([[[1.0, 0, 0], [1.0, 0.01, 0], [0, 1.0, 0], [0.01, 1.0, 0], [0, 0, 1.0]]])
    plan = bipartite_soft_matching(metric, 2, torch.tensor([0, 2, 4]), torch.tensor([1, 3]))
    assert plan.labels.tolist() == [[0, 0, 1, 1, 2]]


def test_removing_more_than_the_sources_raises():
    src, dst = random_2d_split(4, 4, 2, 2)
    with pytest.raises(ValueError, match="can remove at most 12 of 16 tokens"):
        bipartite_soft_matching(torch.randn(1, 16, 4), 13, src, dst)


def test_similarity_in_chunks_equals_the_whole_score_matrix(monkeypatch):
    from sdmerge.core import similarity

    metric = torch.randn(2, 300, 16, generator=torch.Generator().manual_seed(3))
    src, dst = random_2d_split(15, 20, 2, 2, generator=torch.Generator().manual_seed(4))
    whole_score, whole_choice = similarity.most_similar(metric, src, dst)
    monkeypatch.setattr(similarity, "SCORE_CHUNK_ELEMENTS", 2 * dst.numel() * 7)  # 7 source rows per chunk
    score, choice = similarity.most_similar(metric, src, dst)
    assert torch.equal(choice, whole_choice) and torch.equal(score, whole_score)
    plan = bipartite_soft_matching(metric, 120, src, dst)
    monkeypatch.setattr(similarity, "SCORE_CHUNK_ELEMENTS", 1 << 22)
    assert torch.equal(plan.labels, bipartite_soft_matching(metric, 120, src, dst).labels)

"""The few-shot subset rules (data/subset.py): per-class, random and coreset draws are deterministic per seed and
recorded; a coreset of planted clusters picks from every cluster; the manifest gives a resumed run its images."""
import json

import numpy as np
import pytest
import torch

from wecolora.data.datasets import ArrayDataset
from wecolora.data.subset import (
    SubsetChoice,
    kcenter_greedy,
    kmeanspp,
    per_class_counts,
    random_indices,
    subset_size,
)
from wecolora.errors import UserError


def array_set(n_per_class=20, classes=3, labelled=True):
    """n_per_class x classes grey 4x4 images; image i holds the value i (so keys and pixels are traceable)."""
    n = n_per_class * classes
    images = (np.arange(n, dtype=np.uint8)[:, None, None] * np.ones((1, 4, 4), dtype=np.uint8))
    labels = np.repeat(np.arange(classes), n_per_class)
    dataset = ArrayDataset(images, labels, [str(c) for c in range(classes)], split="train")
    if not labelled:
        dataset.classes, dataset.targets = [], [-1] * n
    return dataset


def planted(clusters=5, per_cluster=40, dim=8, spread=0.01, seed=0):
    """Features in well-separated clusters (random centres, tiny spread), shuffled; returns (features, cluster)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=g)
    which = torch.arange(clusters).repeat_interleave(per_cluster)
    order = torch.randperm(len(which), generator=g)
    which = which[order]
    return centres[which] + spread * torch.randn(len(which), dim, generator=g), which


def test_sizes_and_uniform_draws():
    assert subset_size(60000, ratio=0.002) == 120 and subset_size(7, ratio=0.01) == 1 and subset_size(7, images=3) == 3
    a, b = random_indices(1000, 30, seed=0), random_indices(1000, 30, seed=1)
    assert a == random_indices(1000, 30, seed=0) and a != b and len(set(a)) == 30 and a == sorted(a)
    assert per_class_counts(np.array([6000] * 10), 120).tolist() == [12] * 10
    assert per_class_counts(np.array([5, 10, 15]), 7).tolist() == [1, 2, 4]  # 7/6 x (1.17, 2.33, 3.5): remainders


RULES = [
    # (rule, settings, images expected)
    ("per-class", dict(ratio=0.1), 6),
    ("per-class", dict(images=9), 9),
    ("per-class", dict(per_class=2), 6),
    ("random", dict(ratio=0.1), 6),
    ("random", dict(images=11), 11),
]


@pytest.mark.parametrize("rule,settings,count", RULES, ids=[f"{r}-{s}" for r, s, _ in RULES])
def test_each_rule_is_deterministic_per_seed_and_recorded(rule, settings, count, tmp_path):
    dataset = array_set()
    first = SubsetChoice(dataset, rule=rule, seed=0, **settings).prepare()
    indices, unreadable = first.choose()
    assert len(indices) == count and unreadable == [] and indices == sorted(indices)
    assert SubsetChoice(dataset, rule=rule, seed=0, **settings).choose()[0] == indices
    assert SubsetChoice(dataset, rule=rule, seed=1, **settings).choose()[0] != indices
    if rule == "per-class":  # each class gets its share
        assert np.bincount(np.asarray(dataset.targets)[indices]).tolist() == [count // 3] * 3
    first.write(tmp_path)
    manifest = json.loads((tmp_path / "subset.json").read_text())
    assert manifest["rule"] == rule and manifest["seed"] == 0 and manifest["images"] == count
    assert manifest["keys"] == [dataset.sample_ids[i] for i in indices]
    assert (tmp_path / "subset.txt").read_text().split() == manifest["keys"]


def test_kcenter_and_kmeanspp_pick_one_point_of_every_planted_cluster():
    features, cluster = planted()
    for pick in (kcenter_greedy, kmeanspp):
        for seed in range(3):
            picks = pick(features, 5, seed)
            assert sorted(cluster[picks].tolist()) == [0, 1, 2, 3, 4], (pick.__name__, seed)
            assert pick(features, 5, seed) == picks  # deterministic per seed
    assert kcenter_greedy(features, 5, 0) != kcenter_greedy(features, 5, 1)  # the seed picks the first point


def test_a_coreset_choice_draws_a_pool_then_picks_from_every_cluster(tmp_path):
    dataset = array_set(n_per_class=40, classes=5, labelled=False)
    features, cluster = planted(clusters=5, per_cluster=40)
    seen = []

    def teacher_features(indices):  # what distill passes: the teacher's CLS features of the candidates
        seen.append(list(indices))
        return features[indices]

    choice = SubsetChoice(dataset, rule="coreset", images=5, pool=120, seed=0).prepare()
    assert choice.needs_features and len(choice.candidates) == 120  # drawn uniformly, capped
    indices, _ = choice.choose(teacher_features)
    assert seen == [choice.candidates] and set(indices) <= set(choice.candidates)
    assert sorted(cluster[indices].tolist()) == [0, 1, 2, 3, 4]
    again = SubsetChoice(dataset, rule="coreset", images=5, pool=120, seed=0).prepare()
    assert again.choose(teacher_features)[0] == indices
    record = choice.record()
    assert record["rule"] == "coreset" and record["method"] == "kcenter" and record["pool"] == 120
    # The pool is raised to the subset size when the subset is larger than the cap.
    assert len(SubsetChoice(dataset, rule="coreset", images=50, pool=10).prepare().candidates) == 50


def test_a_resumed_run_reuses_the_manifest_and_refuses_keys_the_source_lost(tmp_path):
    dataset = array_set(labelled=False)
    choice = SubsetChoice(dataset, rule="coreset", images=4, pool=20, seed=3).prepare()
    indices, _ = choice.choose(lambda idx: torch.randn(len(idx), 4))
    choice.write(tmp_path)

    resumed = SubsetChoice(dataset, rule="coreset", images=4, pool=20, seed=3)
    assert resumed.reuse(tmp_path / "subset.json") and not resumed.needs_features
    assert resumed.choose()[0] == indices  # no features asked: the saved images, not a new pick
    assert resumed.record()["from_manifest"] is True
    assert not SubsetChoice(dataset, rule="random").reuse(tmp_path / "nope.json")

    smaller = array_set(n_per_class=1, labelled=False)  # train/000000..000002 only
    with pytest.raises(UserError, match=r"names \d+ image\(s\) the source no longer holds \(first: train/0000"):
        SubsetChoice(smaller, rule="random").reuse(tmp_path / "subset.json")
    (tmp_path / "subset.json").write_text("{not json")
    with pytest.raises(UserError, match="subset.json is damaged"):
        SubsetChoice(dataset, rule="random").reuse(tmp_path / "subset.json")


def test_a_subset_the_source_cannot_give_is_refused_in_one_line():
    dataset = array_set(n_per_class=2, classes=2)
    with pytest.raises(UserError, match=r"keeps fewer than 1 image\(s\) in class 1 \(2 images -> 0\).*ask for more --images"):
        SubsetChoice(array_set(n_per_class=2, classes=2), rule="per-class", images=1).prepare()
    with pytest.raises(UserError, match="--subset 'best' is invalid"):
        SubsetChoice(dataset, rule="best")
    with pytest.raises(UserError, match="--coreset-method 'median' is invalid"):
        SubsetChoice(dataset, rule="coreset", method="median")

"""Tests for wecolora.evaluation.metrics: top-1/top-5 accuracy, precision at 1 for multi-label targets, and
mean ROC-AUC with ties, each on small hand-computed cases."""
import pytest
import torch

from wecolora.errors import UserError
from wecolora.evaluation.metrics import _average_ranks, classification_metrics, multilabel_auc

# 4 images, 6 classes; every row's scores are distinct so that top-k is well defined.
# Classes by score, best first: image 0: 0 4 3 2 1 5; image 1: 1 0 5 4 3 2; images 2 and 3: 5 4 3 2 1 0.
SCORES = torch.tensor([
    [0.9, 0.1, 0.2, 0.3, 0.4, 0.0],
    [0.5, 0.6, 0.0, 0.1, 0.2, 0.3],
    [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
    [0.0, 0.1, 0.2, 0.3, 0.4, 0.7],
])


@pytest.mark.parametrize("labels, top1, top5", [
    ([0, 0, 0, 5], 0.5, 0.75),  # ranks 1, 2, 6, 1
    ([0, 1, 5, 5], 1.0, 1.0),  # every label ranks first
    ([5, 2, 0, 0], 0.0, 0.0),  # every label ranks sixth
    ([4, 3, 4, 1], 0.0, 1.0),  # ranks 2, 5, 2, 5
])
def test_top1_and_top5(labels, top1, top5):
    out = classification_metrics(SCORES, torch.tensor(labels))
    assert set(out) == {"top1", "top5"}
    assert out["top1"] == pytest.approx(top1)
    assert out["top5"] == pytest.approx(top5)


def test_with_fewer_than_five_classes_top5_is_every_class():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    assert classification_metrics(scores, torch.tensor([1, 2])) == pytest.approx({"top1": 0.5, "top5": 1.0})


# Multi-label: 4 images, 3 labels. Label 2 has no positive image, so it has no AUC.
ML_SCORES = torch.tensor([[0.1, 0.5, 0.3], [0.4, 0.5, 0.2], [0.35, 0.2, 0.9], [0.8, 0.9, 0.1]])
ML_TARGETS = torch.tensor([[0, 1, 0], [0, 0, 0], [1, 0, 0], [1, 1, 0]])
# label 0: positives {0.35, 0.8} vs negatives {0.1, 0.4}: pairs won 1 + 0 + 1 + 1 = 3 of 4 -> 0.75
# label 1: positives {0.5, 0.9} vs negatives {0.5, 0.2}: 0.5 (a tie) + 1 + 1 + 1 = 3.5 of 4 -> 0.875
ML_AUC = (0.75 + 0.875) / 2


def test_multilabel_auc_by_hand():
    assert multilabel_auc(ML_SCORES, ML_TARGETS) == pytest.approx(ML_AUC)


def test_multilabel_auc_by_pair_counting():
    """The rank formula against the definition: the share of (positive, negative) pairs ordered right."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (30, 5), generator=gen).float()  # many ties
    targets = (torch.rand(30, 5, generator=gen) < 0.4).long()
    aucs = []
    for s, t in zip(scores.T, targets.T):
        pos, neg = s[t == 1], s[t == 0]
        if len(pos) and len(neg):
            wins = (pos[:, None] > neg[None, :]).float() + 0.5 * (pos[:, None] == neg[None, :]).float()
            aucs.append(wins.mean().item())
    assert multilabel_auc(scores, targets) == pytest.approx(sum(aucs) / len(aucs))


@pytest.mark.parametrize("scores, targets, auc", [
    ([[0.0], [1.0]], [[0], [1]], 1.0),
    ([[1.0], [0.0]], [[0], [1]], 0.0),
    ([[0.5], [0.5]], [[0], [1]], 0.5),
    ([[0.1], [0.2], [0.3], [0.4]], [[1], [0], [1], [0]], 0.25),  # positives 0.1, 0.3 vs 0.2, 0.4: 1 of 4 pairs
])
def test_multilabel_auc_literal(scores, targets, auc):
    assert multilabel_auc(torch.tensor(scores), torch.tensor(targets)) == pytest.approx(auc)


@pytest.mark.parametrize("targets", [[[0, 0], [0, 0]], [[1, 1], [1, 1]], [[1, 0], [1, 0]]])
def test_multilabel_auc_without_any_two_class_label_is_a_user_error(targets):
    with pytest.raises(UserError, match="ROC-AUC is undefined"):
        multilabel_auc(torch.tensor([[0.1, 0.2], [0.3, 0.4]]), torch.tensor(targets))


def test_multilabel_classification_metrics():
    out = classification_metrics(ML_SCORES, ML_TARGETS)
    # best label per image: 1 (positive), 1 (negative), 2 (negative), 1 (positive); 3 labels: top-5 is "any positive"
    assert out == pytest.approx({"top1": 0.5, "top5": 0.75, "auc": ML_AUC})


@pytest.mark.parametrize("values, ranks", [
    ([3.0, 1.0, 2.0], [3.0, 1.0, 2.0]),
    ([3.0, 1.0, 2.0, 2.0], [4.0, 1.0, 2.5, 2.5]),
    ([7.0, 7.0, 7.0], [2.0, 2.0, 2.0]),
    ([0.0], [1.0]),
])
def test_average_ranks(values, ranks):
    import numpy as np

    assert _average_ranks(np.array(values)).tolist() == ranks

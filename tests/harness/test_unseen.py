import math

import pytest
import torch

from harness.bench.unseen import similarity_weights


def test_hand_computed_gamma():
    target = torch.tensor([1.0, 0.0])
    seen = {"x": torch.tensor([1.0, 0.0]), "y": torch.tensor([1.0, 1.0]),
            "z": torch.tensor([0.0, 2.0])}
    # cosines 1, 1/sqrt(2), 0 -> normalized by their sum
    total = 1 + 1 / math.sqrt(2)
    assert similarity_weights(target, seen) == pytest.approx(
        {"x": 1 / total, "y": (1 / math.sqrt(2)) / total, "z": 0.0})


def test_negative_cosines_are_kept():
    gamma = similarity_weights(torch.tensor([1.0, 0.0]),
                               {"x": torch.tensor([1.0, 0.0]), "y": torch.tensor([-1.0, 1.0])})
    assert gamma["y"] < 0 and sum(gamma.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("seen", [
    {"x": torch.tensor([0.0, 1.0])},                                   # orthogonal: sum 0
    {"x": torch.tensor([-1.0, 0.0]), "y": torch.tensor([0.0, 1.0])},   # opposite: sum < 0
])
def test_zero_or_negative_similarity_sum_is_an_error(seen):
    with pytest.raises(ValueError, match="for 'u' are undefined.*sum to"):
        similarity_weights(torch.tensor([1.0, 0.0]), seen, "'u'")


def test_no_seen_tasks_is_an_error():
    with pytest.raises(ValueError, match="no seen tasks"):
        similarity_weights(torch.tensor([1.0]), {})

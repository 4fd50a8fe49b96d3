import math

import pytest
import torch

from normlightning.evaluation.confidence_interval import mean_confidence_interval


def test_ci_formula_on_fixed_list():
    acc = [0.6, 0.8, 0.7, 0.9, 0.5]
    mean = sum(acc) / 5
    std = math.sqrt(sum((a - mean) ** 2 for a in acc) / 4)
    m, ci = mean_confidence_interval(acc)
    assert m == pytest.approx(0.7)
    assert ci == pytest.approx(1.96 * std / math.sqrt(5))
    assert ci == pytest.approx(1.96 * math.sqrt(0.025) / math.sqrt(5))
    m2, ci2 = mean_confidence_interval(torch.tensor(acc) * 100)
    assert m2 == pytest.approx(70.0) and ci2 == pytest.approx(100 * ci, rel=1e-6)


def test_ci_needs_two():
    with pytest.raises(ValueError, match="at least 2"):
        mean_confidence_interval([0.5])

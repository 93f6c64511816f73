"""CKA math (``analysis/cka/compare.py``): the estimators against hand-computed values and their invariances."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nnunet_ssl.analysis.cka.compare import (
    MinibatchCKA,
    gram,
    linear_cka,
    same_layer_cka,
    unbiased_cka,
    unbiased_hsic,
)


def _minibatch_cka(x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    accumulator = MinibatchCKA(["x"], ["y"])
    for start in range(0, len(x), batch):
        accumulator.update({"x": gram(x[start : start + batch])}, {"y": gram(y[start : start + batch])})
    return float(accumulator.compute()[0, 0])


def _correlated(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g, dtype=torch.float64)
    y = x[:, :16] @ torch.randn(16, 24, generator=g, dtype=torch.float64) + 2 * torch.randn(n, 24, generator=g, dtype=torch.float64)
    return x, y


def test_cka_of_a_representation_with_itself_is_one() -> None:
    x, _ = _correlated(64)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert unbiased_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert _minibatch_cka(x, x, 16) == pytest.approx(1.0, abs=1e-12)


def test_large_common_offset_keeps_cka_exact() -> None:
    """CKA(x, 0.01 x + 30) is 1 for every estimator (uncentred Gram matrices gave 0.257 here)."""
    x = torch.randn(64, 4096, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = 0.01 * x + 30
    assert linear_cka(x, y) == pytest.approx(1.0, abs=1e-9)
    assert unbiased_cka(x, y) == pytest.approx(1.0, abs=1e-9)
    assert _minibatch_cka(x, y, 8) == pytest.approx(1.0, abs=1e-9)
    # what the centring fixes: the same minibatch estimate from uncentred Gram matrices
    accumulator = MinibatchCKA(["x"], ["y"])
    for start in range(0, 64, 8):
        accumulator.update({"x": gram(x[start : start + 8], center=False)},
                           {"y": gram(y[start : start + 8], center=False)})
    assert not accumulator.compute()[0, 0] > 0.9


def test_invariant_to_orthogonal_transforms_and_isotropic_scaling() -> None:
    x, y = _correlated(80, seed=1)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    for estimator in (linear_cka, unbiased_cka, lambda a, b: _minibatch_cka(a, b, 20)):
        reference = estimator(x, y)
        assert estimator(x @ q, y) == pytest.approx(reference, abs=1e-10)
        assert estimator(x, 7.5 * y) == pytest.approx(reference, abs=1e-10)
        assert estimator(0.01 * (x @ q), y) == pytest.approx(reference, abs=1e-10)


def test_known_answer_by_hand() -> None:
    """x = (1, 2, 3, 4), y = (1, -1, 1, -1), one feature each, n = 4.

    K~ (K = x x^T, diagonal zeroed), row sums 9, 16, 21, 24, total 70:
        [0 2 3 4; 2 0 6 8; 3 6 0 12; 4 8 12 0]
    L~ = off-diagonal y_i y_j, every row sum -1, total -4:
        [0 -1 1 -1; -1 0 -1 1; 1 -1 0 -1; -1 1 -1 0]
    n = 4: (n-1)(n-2) = 6, n-2 = 2, n(n-3) = 4.
    HSIC(K, L): tr(K~L~) = -3 + 0 - 15 - 8 = -26; 1^T K~ 1 * 1^T L~ 1 / 6 = 70 * -4 / 6 = -140/3;
        1^T K~ L~ 1 = 9*-1 + 16*-1 + 21*-1 + 24*-1 = -70, times 2/2;
        -> (-26 - 140/3 + 70) / 4 = (-8/3) / 4 = -2/3.
    HSIC(K, K): tr = 2 * (4 + 9 + 16 + 36 + 64 + 144) = 546; 70^2 / 6 = 2450/3;
        1^T K~ K~ 1 = 9^2 + 16^2 + 21^2 + 24^2 = 1354 -> (546 + 2450/3 - 1354) / 4 = 13/6.
    HSIC(L, L): tr = 12; (-4)^2 / 6 = 8/3; 1^T L~ L~ 1 = 4 -> (12 + 8/3 - 4) / 4 = 8/3.
    CKA = (-2/3) / sqrt(13/6 * 8/3) = -1/sqrt(13).
    Biased linear CKA of 1-D features is the squared Pearson correlation: centred x = (-1.5, -0.5, 0.5, 1.5),
    x.y = -2, |x|^2 = 5, |y|^2 = 4 -> 4 / 20 = 0.2.
    """
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    y = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]])
    k, l = gram(x), gram(y)
    assert unbiased_hsic(k, l) == pytest.approx(-2 / 3)
    assert unbiased_hsic(k, k) == pytest.approx(13 / 6)
    assert unbiased_hsic(l, l) == pytest.approx(8 / 3)
    assert unbiased_cka(x, y) == pytest.approx(-1 / math.sqrt(13))
    assert _minibatch_cka(x, y, 4) == pytest.approx(-1 / math.sqrt(13))
    assert linear_cka(x.numpy(), y.numpy()) == pytest.approx(0.2)


def test_minibatch_estimate_agrees_with_full_batch_unbiased() -> None:
    x, y = _correlated(1200, seed=3)
    assert _minibatch_cka(x, y, 40) == pytest.approx(unbiased_cka(x, y), abs=0.03)


def test_unbiased_estimates_converge_to_linear_cka_for_large_n() -> None:
    gaps = []
    for n in (64, 4096):
        x, y = _correlated(n, seed=4)
        gaps.append(abs(_minibatch_cka(x, y, 64) - linear_cka(x, y)))
    assert gaps[1] < 0.02 and gaps[1] < gaps[0]
    # independent high-dimensional features: biased CKA is far from 0 at small n, the unbiased one is not
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(32, 256, generator=g), torch.randn(32, 256, generator=g)
    assert linear_cka(a, b) > 0.5
    assert abs(unbiased_cka(a, b)) < 0.15


def test_too_few_or_mismatched_examples_raise() -> None:
    with pytest.raises(ValueError, match="at least 4"):
        unbiased_hsic(torch.eye(3), torch.eye(3))
    with pytest.raises(ValueError, match="same"):
        unbiased_hsic(torch.eye(4), torch.eye(5))
    with pytest.raises(ValueError, match="same examples"):
        linear_cka(torch.randn(5, 3), torch.randn(6, 3))
    accumulator = MinibatchCKA(["a"], ["b"])
    with pytest.raises(ValueError, match="at least 4"):
        accumulator.update({"a": torch.eye(3)}, {"b": torch.eye(3)})
    with pytest.raises(ValueError, match="same examples"):
        accumulator.update({"a": torch.eye(4)}, {"b": torch.eye(5)})
    with pytest.raises(ValueError, match="no minibatch"):
        accumulator.compute()


def test_same_layer_cka_reads_the_diagonal_in_layer_order() -> None:
    matrix = np.array([[0.9, 0.1, 0.2], [0.3, 0.8, 0.4], [0.5, 0.6, math.nan]])
    pairs = same_layer_cka(["embed", "stage1.block1", "stage1.block2"], matrix)
    assert pairs[:2] == [("embed", 0.9), ("stage1.block1", 0.8)]
    assert pairs[2][0] == "stage1.block2" and math.isnan(pairs[2][1])
    assert all(type(value) is float for _, value in pairs)

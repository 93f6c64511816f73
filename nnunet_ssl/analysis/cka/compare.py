"""Compare: the CKA math, pure functions on features and Gram matrices (no I/O, no networks).

* :func:`linear_cka` is Kornblith et al. 2019's linear CKA on full feature matrices (biased HSIC,
  centred Gram matrices).
* :func:`unbiased_hsic` is Song et al. 2012's unbiased HSIC estimator, which Nguyen, Raghu & Kornblith
  2021 ("Do wide and deep networks learn the same things?") average over minibatches so that CKA
  of large activations needs only one ``(n, n)`` Gram matrix per layer and minibatch
  (:class:`MinibatchCKA`). The minibatch estimate converges to linear CKA as the number of
  minibatches grows, without the bias of small-batch biased HSIC.
* :func:`same_layer_cka` reads each layer against itself off a CKA matrix.

Everything is computed in float64 on torch tensors; numpy arrays are accepted.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

#: Smallest example count the unbiased estimator is defined for (it divides by n - 3).
MIN_EXAMPLES = 4
#: Feature elements converted to float64 at a time in :func:`gram` (bounds the temporary copy).
GRAM_CHUNK_ELEMENTS = 1 << 24


def _float64(x: Tensor | np.ndarray) -> Tensor:
    return torch.as_tensor(x).to(torch.float64)


def gram(features: Tensor | np.ndarray, center: bool = True) -> Tensor:
    """Linear-kernel Gram matrix ``K = X X^T`` of flattened examples, in float64.

    By default the features are centred first (each feature minus its mean over the ``n`` examples,
    in float64). That changes neither the unbiased HSIC (it is invariant to adding a constant vector
    to every example) nor linear CKA (which centres the Gram matrix), but it keeps their precision:
    with a large common offset the uncentred Gram entries are dominated by the offset and the
    estimator's cancellations lose the signal (CKA(x, 0.01 x + 30) must be 1).

    Args:
        features: ``(n, ...)``; each example is flattened to one vector.
        center: Subtract the mean example before the products.

    Returns:
        ``(n, n)`` float64 tensor on the input's device.
    """
    x = torch.as_tensor(features)
    x = x.reshape(x.shape[0], -1)
    n, p = x.shape
    step = max(1, GRAM_CHUNK_ELEMENTS // max(n, 1))
    k = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    for start in range(0, p, step):
        chunk = x[:, start : start + step].to(torch.float64)
        if center:
            chunk = chunk - chunk.mean(dim=0, keepdim=True)
        k += chunk @ chunk.T
    return k


def center_gram(k: Tensor | np.ndarray) -> Tensor:
    """``H K H`` with the centring matrix ``H = I - 11^T / n``."""
    k = _float64(k)
    return k - k.mean(dim=0, keepdim=True) - k.mean(dim=1, keepdim=True) + k.mean()


def linear_cka(x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> float:
    """Full-batch linear CKA (biased HSIC) of two representations of the same examples.

    Args:
        x: ``(n, p)`` features (further dimensions are flattened).
        y: ``(n, q)`` features of the same ``n`` examples.

    Returns:
        ``<K_c, L_c>_F / (||K_c||_F ||L_c||_F)`` in [0, 1]; NaN when either representation is constant.
    """
    _check_examples(len(x), len(y), minimum=2)
    kc, lc = center_gram(gram(x)), center_gram(gram(y))
    denominator = torch.linalg.norm(kc) * torch.linalg.norm(lc)
    if denominator == 0:
        return math.nan
    return float((kc * lc).sum() / denominator)


def unbiased_hsic(k: Tensor | np.ndarray, l: Tensor | np.ndarray) -> float:
    """Unbiased HSIC estimator of Song et al. 2012 on two ``(n, n)`` Gram matrices, ``n >= 4``.

    With ``K~``, ``L~`` the Gram matrices with zeroed diagonals::

        HSIC_1 = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n (n-3))

    No centring is needed in exact arithmetic (the estimator is unbiased for the HSIC of centred
    kernels); :func:`gram` centres the features anyway, for precision.
    """
    k, l = _float64(k), _float64(l)
    if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape != l.shape:
        raise ValueError(f"need two square Gram matrices of the same size, got {tuple(k.shape)} and {tuple(l.shape)}")
    n = k.shape[0]
    _check_examples(n, n)
    k = k - torch.diag(torch.diagonal(k))
    l = l - torch.diag(torch.diagonal(l))
    trace = (k * l.T).sum()
    sums = k.sum() * l.sum() / ((n - 1) * (n - 2))
    cross = k.sum(dim=0) @ l.sum(dim=1) * 2 / (n - 2)
    return float((trace + sums - cross) / (n * (n - 3)))


def unbiased_cka(x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> float:
    """CKA from the unbiased HSIC of all ``n`` examples at once (one "minibatch" of everything)."""
    _check_examples(len(x), len(y))
    k, l = gram(x), gram(y)
    return _ratio(unbiased_hsic(k, l), unbiased_hsic(k, k), unbiased_hsic(l, l))


class MinibatchCKA:
    """Accumulate unbiased HSIC over minibatches for every (pretrained layer, fine-tuned layer) pair.

    ``CKA(a, b) = mean HSIC(K_a, L_b) / sqrt(mean HSIC(K_a, K_a) * mean HSIC(L_b, L_b))``, means over
    minibatches (Nguyen, Raghu & Kornblith 2021). Feed Gram matrices (:func:`gram`), so activations
    never need to be kept.

    Args:
        layers_a: Layer names of the first network (rows of the matrix).
        layers_b: Layer names of the second network (columns).
    """

    def __init__(self, layers_a: Sequence[str], layers_b: Sequence[str]) -> None:
        if not layers_a or not layers_b:
            raise ValueError("MinibatchCKA needs at least one layer on each side")
        self.layers_a = list(layers_a)
        self.layers_b = list(layers_b)
        self.cross = np.zeros((len(self.layers_a), len(self.layers_b)))
        self.self_a = np.zeros(len(self.layers_a))
        self.self_b = np.zeros(len(self.layers_b))
        self.batches = 0
        self.examples = 0

    def update(self, grams_a: Mapping[str, Tensor], grams_b: Mapping[str, Tensor]) -> None:
        """Add one minibatch: ``(n, n)`` Gram matrices of the same ``n >= 4`` examples for every layer."""
        missing = [a for a in self.layers_a if a not in grams_a] + [b for b in self.layers_b if b not in grams_b]
        if missing:
            raise ValueError(f"minibatch lacks Gram matrices for layers {missing}")
        ka = [_float64(grams_a[name]).cpu() for name in self.layers_a]
        lb = [_float64(grams_b[name]).cpu() for name in self.layers_b]
        sizes = {k.shape[0] for k in ka + lb}
        if len(sizes) != 1:
            raise ValueError(f"every layer must see the same examples; got minibatch sizes {sorted(sizes)}")
        n = sizes.pop()
        _check_examples(n, n)
        for i, k in enumerate(ka):
            self.self_a[i] += unbiased_hsic(k, k)
            for j, l in enumerate(lb):
                self.cross[i, j] += unbiased_hsic(k, l)
        for j, l in enumerate(lb):
            self.self_b[j] += unbiased_hsic(l, l)
        self.batches += 1
        self.examples += n

    def compute(self) -> np.ndarray:
        """The ``(len(layers_a), len(layers_b))`` CKA matrix; NaN where a self-HSIC is not positive."""
        if self.batches == 0:
            raise ValueError("no minibatch was added")
        cross = self.cross / self.batches
        a, b = self.self_a / self.batches, self.self_b / self.batches
        with np.errstate(invalid="ignore", divide="ignore"):
            denominator = np.sqrt(np.outer(a, b))
            matrix = cross / denominator
        matrix[~(np.outer(a, b) > 0)] = np.nan
        return matrix


def same_layer_cka(layers: Sequence[str], matrix: np.ndarray) -> list[tuple[str, float]]:
    """``(layer, CKA(layer of network a, same layer of network b))``: the diagonal, in ``layers`` order.

    Args:
        layers: Names of the ``L`` layers, the rows and columns of ``matrix``.
        matrix: ``(L, L)`` CKA matrix (:meth:`MinibatchCKA.compute` with the same layers on both sides).
    """
    return [(name, float(matrix[i, i])) for i, name in enumerate(layers)]


def _ratio(cross: float, self_a: float, self_b: float) -> float:
    product = self_a * self_b
    return cross / math.sqrt(product) if product > 0 else math.nan


def _check_examples(n_a: int, n_b: int, minimum: int = MIN_EXAMPLES) -> None:
    if n_a != n_b:
        raise ValueError(f"both representations must hold the same examples: got {n_a} and {n_b}")
    if n_a < minimum:
        raise ValueError(f"CKA needs at least {minimum} examples per (mini)batch, got {n_a}")

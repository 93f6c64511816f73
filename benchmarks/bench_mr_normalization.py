"""MR normalisation: how close nnU-Net's built-in schemes come to the paper's per-image 5-95 % mapping.

nnU-Net 2.8.1 looks normalization schemes up only inside its own package, and none of them clips at
each image's own percentiles. ``nnunet-ssl plan`` therefore measures two stand-ins on the training
images and uses the closer one (``plans/planner.py``, :func:`mr_percentile_approximation`):

* one window for every image (``CTNormalization`` with the medians of the images' 5th and 95th
  percentiles): exact when every image has the same intensity scale;
* per-image min-max (``RescaleTo01Normalization``): follows each image's gain, but the brightest
  voxel (fat, vessels, artefacts), not the 95th percentile, sets the scale.

This script makes T1-like head phantoms (an MR intensity model) and prints the mean absolute
difference, in [0, 1] units, between each stand-in and the exact per-image mapping:

* background air with Rician noise; scalp fat (bright), skull (dark), CSF (dark), grey and white
  matter, a few bright vessels; a smooth multiplicative bias field (+-15 %);
* per-image gain: "one site" (log-normal, sd 0.1) and "several sites" (uniform x0.5 to x2).

Usage::

    python -m benchmarks.bench_mr_normalization [--cases 12] [--shape 96 112 96]
"""
from __future__ import annotations

import argparse

import numpy as np

from nnunet_ssl.plans.planner import mr_percentile_approximation


def head_phantom(rng: np.random.Generator, shape: tuple[int, int, int], gain: float) -> np.ndarray:
    """(z, y, x) T1-like magnitude image of a head in air."""
    z, y, x = (np.mgrid[: shape[0], : shape[1], : shape[2]].astype(np.float32) -
               np.array(shape, dtype=np.float32)[:, None, None, None] / 2)
    scale = rng.uniform(0.9, 1.1, 3) * np.array(shape) * 0.4
    r = np.sqrt((z / scale[0]) ** 2 + (y / scale[1]) ** 2 + (x / scale[2]) ** 2)
    image = np.zeros(shape, np.float32)
    image[r < 1.0] = 700.0   # scalp fat: bright in T1
    image[r < 0.93] = 60.0   # skull
    image[r < 0.88] = 120.0  # CSF
    image[r < 0.84] = 330.0  # grey matter
    wm = (r < 0.6) | ((np.sin(z / 3.0) * np.cos(y / 4.0) > 0.3) & (r < 0.8))
    image[wm] = 420.0        # white matter
    vessels = (r < 0.8) & (rng.random(shape) < 0.002)
    image[vessels] = 900.0
    bias = 1 + 0.15 * np.sin(z / shape[0] * np.pi + rng.uniform(0, 6)) * np.cos(y / shape[1] * np.pi)
    noise = rng.normal(0, 12.0, (2, *shape)).astype(np.float32)
    return gain * np.hypot(image * bias + noise[0], noise[1])


def measure(cases: int, shape: tuple[int, int, int], gains: np.ndarray, seed: int) -> tuple[float, float, str]:
    rng = np.random.default_rng(seed)
    images = [head_phantom(rng, shape, float(g)).reshape(-1) for g in gains[:cases]]
    fit = mr_percentile_approximation(images, (5.0, 95.0))
    return fit.window_difference, fit.rescale_difference, fit.scheme


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 112, 96])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    scenarios = {
        "one site (gain log-normal sd 0.1)": np.exp(rng.normal(0, 0.1, args.cases)),
        "several sites (gain x0.5 to x2)": rng.uniform(0.5, 2.0, args.cases),
        "identical gain": np.ones(args.cases),
    }
    print(f"{args.cases} T1-like head phantoms of {tuple(args.shape)} voxels; mean |stand-in - exact per-image "
          "5-95 % mapping| in [0, 1] units\n")
    print("| scenario | one window (CTNormalization) | per-image min-max (RescaleTo01) | planner picks |")
    print("|---|---|---|---|")
    for name, gains in scenarios.items():
        window, rescale, scheme = measure(args.cases, tuple(args.shape), gains, args.seed)
        print(f"| {name} | {window:.4f} | {rescale:.4f} | {scheme} |")


if __name__ == "__main__":
    main()

"""MR normalisation on the foreground: which built-in scheme `nnunet-ssl plan` picks on T1-like head phantoms.

The phantoms are ``make-phantoms --modality mr``'s (:func:`nnunet_ssl.data.phantoms.generate_mr_case`: heads in
a large noisy background that goes negative, per-case gain x0.55 to x1.8). For each scheme the script prints the
mean |scheme - exact per-image 5-95 % mapping| over all voxels (the planner's criterion before issue 20) and
over the foreground (its criterion now), the largest share of an image's foreground the scheme clips away, and
per pair of labelled structures the median contrast and the number of images where the scheme loses it
(:mod:`nnunet_ssl.plans.mr_normalization`); then what each criterion picks.

Usage::

    python -m benchmarks.bench_mr_foreground [--cases 12] [--shape 64 96 96] [--seed 0]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from nnunet_ssl.data.phantoms import MR_LABELS, _case_rng, generate_mr_case
from nnunet_ssl.plans.mr_normalization import (
    SCHEME_TITLES,
    UNIT_SCHEMES,
    choose_mr_scheme,
    dataset_label_names,
    measure_mr_normalization,
    sample_image,
)
from nnunet_ssl.plans.planner import mr_percentile_approximation

PERCENTILES = (5.0, 95.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--cases", type=int, default=12, help="training phantoms (default 12)")
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 96, 96], help="nominal z y x (default 64 96 96)")
    parser.add_argument("--seed", type=int, default=0, help="make-phantoms --seed (default 0)")
    args = parser.parse_args()
    shape = (args.shape[0], args.shape[1], args.shape[2])
    start = time.perf_counter()
    cases = [generate_mr_case(_case_rng(args.seed, 0, j), shape) for j in range(args.cases)]
    generated = time.perf_counter() - start
    start = time.perf_counter()
    samples = [sample_image(f"Phantom_{j:03d}", image, label, PERCENTILES) for j, (image, label, _) in enumerate(cases)]
    measurement = measure_mr_normalization(samples, PERCENTILES, dataset_label_names(MR_LABELS))
    choice = choose_mr_scheme(measurement)
    measured = time.perf_counter() - start
    old = mr_percentile_approximation([image.reshape(-1) for image, _, _ in cases], PERCENTILES)
    negative = np.mean([float((image < 0).mean()) for image, _, _ in cases])
    print(f"{args.cases} T1-like head phantoms {shape} (seed {args.seed}); foreground {np.mean(measurement.foreground_fraction):.0%} "
          f"of the voxels, {negative:.0%} of the voxels negative; generated in {generated:.1f} s, measured in "
          f"{measured:.1f} s\n")
    print("| scheme | error, all voxels | error, foreground (worst image) | most foreground clipped away | "
          + " | ".join(f"{pair.name}: median (images losing it)" for pair in measurement.contrasts) + " |")
    print("|---|---|---|---|" + "---|" * len(measurement.contrasts))
    raw = " | ".join(f"{pair.median('raw'):.4g} raw, {pair.median('exact'):.3g} exact" for pair in measurement.contrasts)
    print(f"| (raw; exact per-image 5-95 %) | | | | {raw} |")
    for name in ("window", "minmax", "zscore"):
        scheme = measurement.schemes[name]
        if name in UNIT_SCHEMES:
            errors = (f"{scheme.mean_all_voxel_error:.4f} | {scheme.mean_foreground_error:.4f} "
                      f"({max(scheme.foreground_error or (0.0,)):.4f})")
        else:
            errors = "- | -"
        contrasts = " | ".join(f"{pair.median(name):.3g} ({len(pair.lost(name))} of {len(pair.counted())})"
                               for pair in measurement.contrasts)
        print(f"| {SCHEME_TITLES[name]} | {errors} | {scheme.max_extra_clipped:.0%} | {contrasts} |")
    picked_before = "one window" if old.scheme == "CTNormalization" else "per-image min-max"
    print(f"\nall voxels (before) picks: {picked_before}; foreground (now) picks: {SCHEME_TITLES[choice.scheme]} "
          f"({choice.reason})")


if __name__ == "__main__":
    main()

"""Pretraining data pipeline: crops from the blosc2 cache vs preprocessing the NIfTI per sample.

Generates CT-like volumes of realistic size (default 5 volumes of 512 x 512 x ~150 int16 at
0.8 x 0.8 x 2.5 mm: an elliptic body with fat, muscle, organs, spine, lung bases, a table, and
Gaussian noise of 20 HU), writes them as ``.nii.gz`` into a temporary folder and measures:

1. **Crop sampling**: one random 96^3 crop from the cache (open memory-mapped ``.b2nd``,
   decompress the chunks the crop touches, float32), against the same crop made the naive way
   (read the ``.nii.gz``, resample to 1.5 x 1.5 x 2 mm, window, crop) from the same volumes.
   The two are interleaved per volume so slow phases of a noisy machine hit both; medians.
2. **Loader throughput**: ``make_loader`` with the default worker count, batch 2, 2 views
   (crops/s and batches/s after a warm-up), to compare with the training step rate; also with
   ``num_workers=0`` for reference.
3. **Sizes**: cache size vs source ``.nii.gz`` size (and the raw int16 size).

With ``--scan`` it measures the scan instead: the checks ``read_source`` makes on each NIfTI
file before SimpleITK reads it (``check_nifti``: the header, the length of the data, the float
voxels), and ``read_source`` as a whole (check and read), per encoding (int16 ``.nii.gz``,
float32 ``.nii.gz``, int16 ``.nii``), medians over files and repeats. ``--baseline`` times a
copy of ``pretraining/data/preprocess.py`` from another commit in the same run, interleaved
per file, and reports the ratios.

Usage::

    python -m benchmarks.bench_pretraining_data                 # 5 x 512 x 512 x 150
    python -m benchmarks.bench_pretraining_data --num-volumes 3 --shape 256 256 100 --markdown
    git show HEAD~1:pretraining/data/preprocess.py > /tmp/preprocess_before.py
    python -m benchmarks.bench_pretraining_data --scan --baseline /tmp/preprocess_before.py --markdown
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from types import ModuleType

import blosc2
import numpy as np
import SimpleITK as sitk
import torch

from benchmarks.tables import format_table
from nnunet_ssl.pretraining.data import (
    DataConfig,
    Manifest,
    ViewSampler,
    build_cache,
    make_loader,
    open_array,
    preprocess,
    summarize,
)
from nnunet_ssl.pretraining.data.preprocess import resample_to_spacing, window_ct
from nnunet_ssl.pretraining.data.sources import Source

logger = logging.getLogger(__name__)

MB = 1024**2


def ct_phantom(shape_xyz: tuple[int, int, int], spacing_xyz: tuple[float, float, float], seed: int) -> sitk.Image:
    """An int16 abdominal-CT-like volume of ``shape_xyz`` voxels (HU, air -1000, noise 20 HU)."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape_xyz
    sx, sy = spacing_xyz[:2]
    x = ((np.arange(nx) - nx / 2) * sx).astype(np.float32)[None, :]
    y = ((np.arange(ny) - ny / 2) * sy).astype(np.float32)[:, None]
    out = np.empty((nz, ny, nx), dtype=np.int16)
    ax, ay = rng.uniform(150, 180), rng.uniform(105, 125)
    organs = [
        (rng.uniform(-80, 80), rng.uniform(-40, 40), rng.uniform(25, 60), rng.uniform(20, 50), rng.uniform(30, 70))
        for _ in range(6)
    ]
    for k in range(nz):
        t = k / max(nz - 1, 1)
        scale = 1.0 + 0.08 * np.sin(2 * np.pi * t + seed)
        r = (x / (ax * scale)) ** 2 + (y / (ay * scale)) ** 2
        hu = np.full((ny, nx), -1000.0, dtype=np.float32)
        hu[r < 1.0] = -100.0  # subcutaneous fat
        hu[r < 0.8] = 50.0  # muscle wall / viscera background
        texture = 20.0 + 15.0 * np.sin(x / 13.0 + k / 7.0) * np.cos(y / 11.0)  # mixed soft tissue
        hu = np.where(r < 0.7, texture, hu)
        for cx, cy, rx, ry, value in organs:
            hu[((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1.0] = value
        if t > 0.8:  # lung bases
                hu[(((np.abs(x) - 70) / 55) ** 2 + ((y + 10) / 60) ** 2 < 1.0) & (r < 0.7)] = -850.0
        hu[((x / 18) ** 2 + ((y - 0.6 * ay) / 16) ** 2) < 1.0] = 700.0  # vertebral body
        hu[(np.abs(x) < 0.9 * ax) & (np.abs(y - 1.15 * ay - 12) < 4) & (r >= 1.0)] = 100.0  # table
        hu += rng.normal(0.0, 20.0, size=hu.shape).astype(np.float32)
        out[k] = np.clip(hu, -1024, 3000).astype(np.int16)
    img = sitk.GetImageFromArray(out)
    img.SetSpacing(spacing_xyz)
    return img


@dataclass
class Timing:
    """Medians (seconds) of the two ways to get a crop."""

    cache_s: float
    naive_s: float
    cache_n: int
    naive_n: int


def time_crops(paths: list[str], arrays: list[str], config: DataConfig, samples: int, crops_per_sample: int, seed: int) -> Timing:
    """Interleave per volume: one naive crop (read + resample + window + crop) and a run of cache crops."""
    sampler = ViewSampler(config.crop_size, config.region_size, 1)
    rng = np.random.default_rng(seed)
    opened = [open_array(p) for p in arrays]  # kept open, as the loader's workers do
    blosc2.set_nthreads(1)
    cache_times: list[float] = []
    naive_times: list[float] = []
    for i in range(samples):
        k = i % len(paths)
        t0 = time.perf_counter()
        hu = sitk.GetArrayFromImage(resample_to_spacing(sitk.ReadImage(paths[k]), config.spacing))
        crop = window_ct(sampler.read(hu, sampler.origins(hu.shape, rng))[0, 0], config.ct_window)
        naive_times.append(time.perf_counter() - t0)
        del hu, crop
        for _ in range(crops_per_sample):
            t0 = time.perf_counter()
            sampler.sample(opened[k], rng)
            cache_times.append(time.perf_counter() - t0)
        logger.info(
            "volume %d: naive %.2f s, cache %.2f ms (median so far)", k, naive_times[-1], 1e3 * statistics.median(cache_times)
        )
    return Timing(statistics.median(cache_times), statistics.median(naive_times), len(cache_times), len(naive_times))


def time_loader(manifest: Manifest, config: DataConfig, batches: int, warmup: int, seed: int) -> tuple[float, float]:
    """``(batches/s, crops/s)`` of ``make_loader`` with batch 2 and 2 views after ``warmup`` batches."""
    loader = make_loader(manifest, config, batch_size=2, num_views=2, seed=seed)
    try:
        for _ in range(warmup):
            next(loader)
        t0 = time.perf_counter()
        for _ in range(batches):
            batch = next(loader)
        elapsed = time.perf_counter() - t0
    finally:
        loader.close()
    views = batch["views"]
    return batches / elapsed, batches * views.shape[0] * views.shape[1] / elapsed


#: The encodings ``--scan`` writes each volume in: label -> (file suffix, pixel type, compressed).
SCAN_ENCODINGS = {
    "int16 .nii.gz": ("_i16.nii.gz", sitk.sitkInt16, True),
    "float32 .nii.gz": ("_f32.nii.gz", sitk.sitkFloat32, True),
    "int16 .nii": ("_i16.nii", sitk.sitkInt16, False),
}


def load_baseline(path: str) -> ModuleType:
    """A copy of ``preprocess.py`` (e.g. from ``git show``) imported beside the current one."""
    name = f"{preprocess.__package__}._baseline_preprocess"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def write_scan_volumes(src: str, args: argparse.Namespace) -> dict[str, list[str]]:
    """Each generated volume in every :data:`SCAN_ENCODINGS` (reused when ``--keep`` has them)."""
    rng = np.random.default_rng(args.seed)
    paths: dict[str, list[str]] = {label: [] for label in SCAN_ENCODINGS}
    for i in range(args.num_volumes):
        nz = round(args.shape[2] * rng.uniform(0.9, 1.1))
        image = None
        for label, (suffix, pixel, compressed) in SCAN_ENCODINGS.items():
            path = os.path.join(src, f"ct_{i:03d}{suffix}")
            if not os.path.isfile(path):
                if image is None:
                    image = ct_phantom((args.shape[0], args.shape[1], nz), tuple(args.spacing), args.seed + i)
                sitk.WriteImage(sitk.Cast(image, pixel), path, useCompression=compressed)
            paths[label].append(path)
    return paths


def time_scan(
    paths: dict[str, list[str]], modules: dict[str, ModuleType], repeats: int
) -> dict[tuple[str, str, str], list[float]]:
    """Seconds of ``check_nifti`` and ``read_source`` per (step, encoding, module) call.

    Every file is timed with every module in turn (the order alternating per repeat), so a slow
    phase of a shared machine hits all of them.
    """
    times: dict[tuple[str, str, str], list[float]] = {}
    labels = list(modules)
    for r in range(repeats):
        order = labels if r % 2 == 0 else labels[::-1]
        for encoding, files in paths.items():
            for path in files:
                source = Source(key=path, path=path, kind="nifti", modality="ct")
                for label in order:
                    module = modules[label]
                    t0 = time.perf_counter()
                    module.check_nifti(path)
                    times.setdefault(("check_nifti", encoding, label), []).append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    module.read_source(source)
                    times.setdefault(("read_source", encoding, label), []).append(time.perf_counter() - t0)
        logger.info("scan repeat %d of %d done", r + 1, repeats)
    return times


def nibabel_import_seconds(runs: int = 5) -> float:
    """Median seconds a fresh process spends importing nibabel after numpy, scipy and SimpleITK."""
    code = (
        "import time, numpy, scipy.ndimage, SimpleITK; t = time.perf_counter(); "
        "import nibabel.nifti2, nibabel.arrayproxy, nibabel.openers; print(time.perf_counter() - t)"
    )
    out = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout) for _ in range(runs)]
    return statistics.median(out)


def run_scan(args: argparse.Namespace, work: str) -> tuple[list[str], list[list[str]]]:
    """``--scan``: the table header and rows (times in ms, ratios current / baseline)."""
    src = os.path.join(work, "nifti_scan")
    os.makedirs(src, exist_ok=True)
    t0 = time.perf_counter()
    paths = write_scan_volumes(src, args)
    logger.info("volumes ready in %.1f s", time.perf_counter() - t0)
    modules = {"current": preprocess}
    if args.baseline:
        modules = {"baseline": load_baseline(args.baseline), "current": preprocess}
    times = time_scan(paths, modules, args.repeats)
    header = ["step", "encoding", *(f"{label} (ms, median)" for label in modules)]
    if args.baseline:
        header.append("current / baseline")
    rows = []
    for step in ("check_nifti", "read_source"):
        for encoding in paths:
            medians = [statistics.median(times[(step, encoding, label)]) for label in modules]
            row = [step, encoding, *(f"{1e3 * m:.2f}" for m in medians)]
            if args.baseline:
                row.append(f"{medians[-1] / medians[0]:.2f}")
            rows.append(row)
    try:
        nibabel_ms = f"{1e3 * nibabel_import_seconds():.0f}"
    except (subprocess.CalledProcessError, ValueError):
        nibabel_ms = "not installed"
    row = ["import nibabel (fresh process)", "once per worker", *([""] * (len(modules) - 1)), nibabel_ms]
    rows.append(row + [""] * (len(header) - len(row)))
    return header, rows


def machine_description(args: argparse.Namespace) -> list[str]:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    data = (
        f"- data: {args.num_volumes} generated CT volumes of {' x '.join(map(str, args.shape))} voxels "
        f"(x y z, slice count varied +-10 %) at {' x '.join(map(str, args.spacing))} mm, "
        + (
            f"each written as {', '.join(SCAN_ENCODINGS)}; {args.repeats} repeats"
            if args.scan
            else f"int16, written as .nii.gz; crops {args.crop}^3, regions {args.region}^3, target spacing 1.5 x 1.5 x 2 mm"
        )
    )
    return [
        f"- command: `python -m benchmarks.bench_pretraining_data {' '.join(sys.argv[1:])}`".rstrip(),
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {cpu}, {cores} cores available",
        (
            f"- SimpleITK {sitk.Version.VersionString()}, blosc2 {blosc2.__version__}, torch {torch.__version__}, "
            f"numpy {np.__version__}, nibabel {_version('nibabel')}, Python {platform.python_version()}"
        ),
        data,
    ]


def _version(package: str) -> str:
    try:
        return importlib.import_module(package).__version__
    except ImportError:
        return "not installed"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-volumes", type=int, default=5)
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 150], metavar=("X", "Y", "Z"))
    parser.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 2.5], metavar=("X", "Y", "Z"))
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--region", type=int, default=128)
    parser.add_argument("--workers", type=int, default=None, help="loader/preprocessing workers (default: DataConfig's)")
    parser.add_argument("--naive-samples", type=int, default=10, help="naive crops (one per volume in turn)")
    parser.add_argument("--crops-per-sample", type=int, default=20, help="cache crops timed after each naive one")
    parser.add_argument("--loader-batches", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", default=None, help="folder for the volumes and the cache (default: a temp folder, deleted)")
    parser.add_argument("--markdown", action="store_true", help="also print a Markdown table for docs/benchmarks.md")
    parser.add_argument("--scan", action="store_true", help="measure the NIfTI checks and reads of the scan instead (module docstring)")
    parser.add_argument("--baseline", default=None, help="with --scan: a copy of preprocess.py to time against in the same run")
    parser.add_argument("--repeats", type=int, default=3, help="with --scan: timed passes over every file")
    args = parser.parse_args(argv)
    if args.num_volumes < 1 or min(args.shape) < 2 or args.naive_samples < 1 or args.crops_per_sample < 1 or args.repeats < 1:
        parser.error("need at least one volume, sample, crop and repeat")
    if args.baseline and not args.scan:
        parser.error("--baseline needs --scan")
    return args


def print_tables(args: argparse.Namespace, header: list[str], rows: list[list[str]]) -> None:
    sys.stdout.write("\n" + format_table(header, rows, markdown=False) + "\n\n")
    if args.markdown:
        sys.stdout.write("\n".join(machine_description(args)) + "\n\n" + format_table(header, rows, markdown=True) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    args = parse_args(argv)
    work = args.keep or tempfile.mkdtemp(prefix="bench_pretraining_data_")
    os.makedirs(work, exist_ok=True)
    started = time.perf_counter()
    if args.scan:
        try:
            header, rows = run_scan(args, work)
        finally:
            if args.keep is None:
                shutil.rmtree(work, ignore_errors=True)
        logger.info("done in %.1f min", (time.perf_counter() - started) / 60)
        print_tables(args, header, rows)
        return
    try:
        src = os.path.join(work, "nifti")
        os.makedirs(src, exist_ok=True)
        paths, raw_bytes = [], 0
        rng = np.random.default_rng(args.seed)
        t0 = time.perf_counter()
        for i in range(args.num_volumes):
            nz = round(args.shape[2] * rng.uniform(0.9, 1.1))
            path = os.path.join(src, f"ct_{i:03d}.nii.gz")
            if not os.path.isfile(path):
                sitk.WriteImage(ct_phantom((args.shape[0], args.shape[1], nz), tuple(args.spacing), args.seed + i), path)
            paths.append(path)
            raw_bytes += args.shape[0] * args.shape[1] * nz * 2
        logger.info("volumes ready in %.1f s", time.perf_counter() - t0)
        extra = {} if args.workers is None else {"num_workers": args.workers}
        config = DataConfig(
            inputs=(src,), cache_dir=os.path.join(work, "cache"), crop_size=args.crop, region_size=args.region, **extra
        )
        t0 = time.perf_counter()
        manifest = build_cache(config, progress=False)
        build_s = time.perf_counter() - t0
        logger.info("cache built in %.1f s\n%s", build_s, summarize(manifest))
        usable = manifest.usable()
        arrays = [manifest.array_path(e) for e in usable]
        source_bytes = sum(os.path.getsize(p) for p in paths)
        cache_bytes = sum(os.path.getsize(p) for p in arrays)
        cached_shapes = [e.shape for e in usable if e.shape is not None]  # a usable entry has its array's shape
        cached_voxels = sum(int(np.prod(shape)) for shape in cached_shapes)

        timing = time_crops(
            [e.source for e in usable], arrays, config, args.naive_samples, args.crops_per_sample, args.seed
        )
        loader_bps, loader_cps = time_loader(manifest, config, args.loader_batches, warmup=5, seed=args.seed)
        serial = dataclasses.replace(config, num_workers=0)
        serial_bps, serial_cps = time_loader(manifest, serial, max(10, args.loader_batches // 3), warmup=2, seed=args.seed)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    logger.info("done in %.1f min", (time.perf_counter() - started) / 60)

    shapes = ", ".join("x".join(map(str, shape[::-1])) for shape in cached_shapes)
    rows = [
        ["cache crop (96^3 from .b2nd), median", f"{1e3 * timing.cache_s:.2f} ms ({timing.cache_n} crops)"],
        ["naive crop (read .nii.gz + resample + window), median", f"{timing.naive_s:.2f} s ({timing.naive_n} crops)"],
        ["speed-up, cache vs naive", f"{timing.naive_s / timing.cache_s:.0f}x"],
        [f"loader, {config.num_workers} workers, batch 2 x 2 views", f"{loader_cps:.1f} crops/s, {loader_bps:.1f} batches/s"],
        ["loader, 0 workers (in process), batch 2 x 2 views", f"{serial_cps:.1f} crops/s, {serial_bps:.1f} batches/s"],
        ["cache build (scan, preprocess, write)", f"{build_s:.1f} s ({build_s / len(paths):.1f} s per volume, {config.num_workers} workers)"],
        ["source .nii.gz / raw int16", f"{source_bytes / MB:.0f} MB / {raw_bytes / MB:.0f} MB"],
        ["cache .b2nd (float16, body-cropped, 1.5x1.5x2 mm)", f"{cache_bytes / MB:.1f} MB ({cached_voxels / 1e6:.1f} M voxels: x y z {shapes})"],
        ["cache / source .nii.gz", f"{cache_bytes / source_bytes:.2f}"],
    ]
    print_tables(args, ["measure", "value"], rows)


if __name__ == "__main__":
    main()

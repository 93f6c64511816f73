"""Spark3D's step cost: the sparse step against the same network trained densely, and peak memory against the Swin.

Three measurements:

* **time** (always): Spark3D training steps (block masks, sparse encoder, mask tokens and densify
  convs, DNA's decoder, L2 over the masked voxels; backward; gradient clipping at 12; SGD with
  Nesterov momentum 0.99, lr 1e-2, weight decay 3e-5, the method's recipe) alternate with *dense*
  steps of the same network (a copy with the same initial weights): the input zeroed at the same
  masked blocks, DNA's plain forward (no sparse layers, no mask tokens, no densify), the same loss
  and optimiser. The order alternates (sparse, dense; dense, sparse; ...) so that a busy phase of a
  shared machine slows both alike. Reported: the median seconds per step after ``--warmup`` steps,
  and sparse / dense (the issue's target is <= 1.15x).
* **memory** (``--memory``): peak memory of a Spark3D step of ``--memory-preset`` (resenc_l) at
  ``--memory-size`` (160^3), of the dense step of the same network, and of a training step of the
  Swin ``SwinUNETRSeg`` with the ``smit`` preset at ``--swin-size`` (96^3), with the same batch, loss
  and optimiser. Each runs in its own spawned process: on CUDA ``torch.cuda.max_memory_allocated``
  minus what was allocated before the steps; on CPU the peak resident set size during the steps
  minus the resident size before them (activations, gradients, momentum; the built model excluded).
* ``--gpu-one-step``: on CUDA, resenc_l at 160^3, batch 2, bf16 autocast (the engine's ``amp``
  default on GPUs that support it): one warm-up step and one timed step, sparse and dense, each with
  its peak memory. Prepared for a GPU machine; it refuses to run without CUDA.

Run::

    python -m benchmarks.bench_spark3d --preset resenc_tiny --size 64 --batch 2      # CPU, seconds
    python -m benchmarks.bench_spark3d --preset resenc_l --size 96 --batch 2 --repeats 3 --warmup 1
    python -m benchmarks.bench_spark3d --memory --memory-size 160 --swin-size 96    # GPU-sized memory run
    python -m benchmarks.bench_spark3d --gpu-one-step
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import multiprocessing as mp
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.tables import format_table
from nnunet_ssl.networks.presets import get_preset
from nnunet_ssl.networks.resenc import get_resenc_preset
from nnunet_ssl.networks.segmentation import SwinUNETRSeg
from nnunet_ssl.pretraining.losses import masked_pixel_loss
from nnunet_ssl.pretraining.masking import bottleneck_block_masks
from nnunet_ssl.pretraining.methods.base import StepContext
from nnunet_ssl.pretraining.methods.spark3d import Spark3D, Spark3DConfig

logger = logging.getLogger("bench_spark3d")

#: The recipe's optimiser (Spark3D.engine_defaults), used for every variant.
RECIPE = Spark3D.engine_defaults
VARIANTS = ("sparse", "dense", "swin")


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="utf-8") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def _sgd(parameters: Iterator[nn.Parameter]) -> torch.optim.SGD:
    return torch.optim.SGD(
        list(parameters), lr=float(RECIPE["base_lr"]), momentum=float(RECIPE["momentum"]),
        nesterov=bool(RECIPE["nesterov"]), weight_decay=float(RECIPE["weight_decay"]),
    )


def _autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _context(step: int) -> StepContext:
    return StepContext(step=step, steps_per_epoch=250, total_steps=250_000)


class Steps:
    """Training steps of one variant on one fixed batch: ``step(index)`` runs one and returns its seconds.

    Args:
        variant: ``"sparse"`` (Spark3D), ``"dense"`` (the same network, masked input, plain forward)
            or ``"swin"`` (SwinUNETRSeg with the smit preset, masked input, the same loss).
        preset: ResEnc preset name (sparse, dense).
        size: Cubic crop edge.
        batch: Crops per step.
        device: Where to run.
        amp: ``"off"``, ``"bf16"`` or ``"fp16"`` autocast (fp16 without a grad scaler: timing only).
        method: An existing Spark3D to share weights with (the dense variant copies its network).

    Every variant masks the same blocks at a given step (32^3 blocks, ratio 0.75, from the step's generator).
    """

    def __init__(self, variant: str, preset: str, size: int, batch: int, device: torch.device, amp: str,
                 method: Spark3D | None = None) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.variant, self.device, self.amp = variant, device, amp
        self.config = Spark3DConfig(crop_size=size)
        self.model: nn.Module
        if variant == "swin":
            self.model = SwinUNETRSeg(get_preset("smit"), 1, 1, deep_supervision=False).to(device)
        else:
            self.method = method if method is not None else Spark3D(get_resenc_preset(preset), self.config).to(device)
            self.model = self.method.student_modules() if variant == "sparse" else copy.deepcopy(self.method.network)
        self.model.train()
        self.optimizer = _sgd(self.model.parameters())
        self.last = self.last_cpu = float("nan")
        generator = torch.Generator().manual_seed(0)
        self.batch = {"views": torch.randn(batch, 1, 1, size, size, size, generator=generator).to(device)}

    def _loss(self, context: StepContext) -> Tensor:
        if self.variant == "sparse":
            return self.method.training_step(self.batch, context)["loss"]
        x = self.batch["views"][:, 0]
        config = self.config
        masks = bottleneck_block_masks(x.shape[0], (config.crop_size,) * 3, config.block, config.mask_ratio,
                                       generator=context.generator, device=x.device)
        reconstruction = self.model(x * ~masks.voxel)
        return masked_pixel_loss(reconstruction, x, masks.voxel, "l2")

    def step(self, index: int) -> float:
        """One full step (forward, loss, backward, clipping, SGD); seconds of wall time."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start, start_cpu = time.perf_counter(), time.process_time()
        self.optimizer.zero_grad(set_to_none=True)
        with _autocast(self.device, self.amp):
            loss = self._loss(_context(index))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(RECIPE["grad_clip"]))
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.last = time.perf_counter() - start
        self.last_cpu = time.process_time() - start_cpu
        return self.last


def time_sparse_vs_dense(preset: str, size: int, batch: int, repeats: int, warmup: int, device: torch.device,
                         amp: str) -> dict[str, Any]:
    """Step times of Spark3D and of the dense network, alternating, with the same masks per step.

    Returns the median wall seconds of each, the median of the per-pair ratios (sparse step / the
    dense step next to it, robust to slow drift) and, for CPU runs, the ratio of the median process
    CPU seconds (robust to other jobs taking the cores: a step's CPU time does not count their turns).
    """
    torch.manual_seed(0)
    sparse = Steps("sparse", preset, size, batch, device, amp)
    dense = Steps("dense", preset, size, batch, device, amp, method=sparse.method)
    wall: dict[str, list[float]] = {"sparse": [], "dense": []}
    cpu: dict[str, list[float]] = {"sparse": [], "dense": []}
    for i in range(warmup + repeats):
        order = [("sparse", sparse), ("dense", dense)]
        for name, runner in order if i % 2 == 0 else order[::-1]:
            runner.step(i)
            if i >= warmup:
                wall[name].append(runner.last)
                cpu[name].append(runner.last_cpu)
        logger.info("step %d: sparse %.3f s (cpu %.3f), dense %.3f s (cpu %.3f)%s", i, sparse.last, sparse.last_cpu,
                    dense.last, dense.last_cpu, "" if i >= warmup else " (warm-up)")
    medians = {name: statistics.median(values) for name, values in wall.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpu.items()}
    pairs = [s / d for s, d in zip(wall["sparse"], wall["dense"], strict=True)]
    return {"wall": wall, "cpu": cpu, "sparse": medians["sparse"], "dense": medians["dense"],
            "ratio": medians["sparse"] / medians["dense"], "pair_ratio": statistics.median(pairs),
            "sparse_cpu": cpu_medians["sparse"], "dense_cpu": cpu_medians["dense"],
            "cpu_ratio": cpu_medians["sparse"] / cpu_medians["dense"]}


def measure_memory(variant: str, preset: str, size: int, batch: int, steps: int, device_name: str, amp: str,
                   threads: int) -> dict[str, Any]:
    """Peak step memory and median step time of one variant (meant for a fresh process)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device(device_name)
    runner = Steps(variant, preset, size, batch, device, amp)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _rss_bytes()
    times = [runner.step(i) for i in range(steps)]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"variant": variant, "preset": "smit" if variant == "swin" else preset, "size": size, "batch": batch,
            "peak_bytes": max(peak, 0), "seconds": statistics.median(times), "steps": steps}


def _worker(queue: Any, args: tuple) -> None:
    queue.put(measure_memory(*args))


def memory_table_rows(args: argparse.Namespace, run: Callable[[tuple], dict[str, Any]]) -> list[list[str]]:
    """Memory of the sparse and dense ResEnc steps and of the Swin step, one spawned process each."""
    rows = []
    for variant, size in (("sparse", args.memory_size), ("dense", args.memory_size), ("swin", args.swin_size)):
        if variant not in args.memory_variants:
            continue
        result = run((variant, args.memory_preset, size, args.memory_batch, args.memory_steps, args.device, args.amp,
                      args.threads))
        logger.info("%s: %.0f MiB, %.3f s/step", variant, result["peak_bytes"] / 2**20, result["seconds"])
        label = {"sparse": "Spark3D (sparse)", "dense": "dense ResEnc, masked input", "swin": "SwinUNETRSeg"}[variant]
        rows.append([label, result["preset"], f"{size}^3 x {args.memory_batch}", f"{result['peak_bytes'] / 2**20:.0f}",
                     f"{result['seconds']:.3f}"])
    return rows


def _spawned(args: tuple) -> dict[str, Any]:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_worker, args=(queue, args))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="resenc_tiny", help="ResEnc preset of the time measurement")
    parser.add_argument("--size", type=int, default=64, help="crop edge of the time measurement (multiple of 32)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=("off", "bf16", "fp16"), default=None,
                        help="autocast (default: bf16 on CUDA, off on CPU, as the engine's 'auto')")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory against the Swin")
    parser.add_argument("--memory-preset", default="resenc_l")
    parser.add_argument("--memory-size", type=int, default=160)
    parser.add_argument("--swin-size", type=int, default=96)
    parser.add_argument("--memory-batch", type=int, default=2)
    parser.add_argument("--memory-variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="which steps the memory measurement runs")
    parser.add_argument("--memory-steps", type=int, default=2, help="steps per memory process (the first allocates momentum)")
    parser.add_argument("--gpu-one-step", action="store_true",
                        help="CUDA only: resenc_l 160^3 batch 2, one warm-up and one timed step, sparse and dense, with memory")
    parser.add_argument("--no-time", action="store_true", help="skip the sparse-vs-dense time measurement")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.gpu_one_step:
        if not torch.cuda.is_available():
            parser.error("--gpu-one-step needs CUDA; on CPU use --preset/--size/--memory")
        args.device, args.preset, args.size, args.batch, args.repeats, args.warmup = "cuda", "resenc_l", 160, 2, 1, 1
        args.memory, args.memory_preset, args.memory_size, args.memory_batch, args.memory_steps = True, "resenc_l", 160, 2, 2
    if args.amp is None:
        args.amp = "bf16" if args.device.startswith("cuda") else "off"
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    where = f"{args.device}" + (f" ({args.threads} threads)" if device.type == "cpu" else "") + f", amp {args.amp}"
    if not args.no_time:
        report_time(args, device, where)
    if args.memory:
        rows = memory_table_rows(args, _spawned)
        logger.info("\npeak step memory, %s, %d steps per process\n%s", where, args.memory_steps,
                    format_table(["step", "preset", "crop x batch", "peak memory (MiB)", "time/step (s)"], rows,
                                 args.markdown))


def report_time(args: argparse.Namespace, device: torch.device, where: str) -> None:
    """Run :func:`time_sparse_vs_dense` with the command line's settings and log its table."""
    result = time_sparse_vs_dense(args.preset, args.size, args.batch, args.repeats, args.warmup, device, args.amp)
    header = ["step", "time/step (s)", "vs dense", "median of pair ratios"]
    print_rows = [
        ["Spark3D (sparse)", f"{result['sparse']:.3f}", f"{result['ratio']:.2f}x", f"{result['pair_ratio']:.2f}x"],
        ["dense, masked input", f"{result['dense']:.3f}", "1.00x", ""],
    ]
    if device.type == "cpu":
        header += ["process CPU s/step", "CPU vs dense"]
        print_rows[0] += [f"{result['sparse_cpu']:.3f}", f"{result['cpu_ratio']:.2f}x"]
        print_rows[1] += [f"{result['dense_cpu']:.3f}", "1.00x"]
    logger.info("\n%s, %d^3 x %d, %s, median of %d steps after %d (alternating)\n%s", args.preset, args.size,
                args.batch, where, args.repeats, args.warmup, format_table(header, print_rows, args.markdown))
    logger.info("all timed steps (wall s): sparse %s; dense %s", [round(t, 3) for t in result["wall"]["sparse"]],
                [round(t, 3) for t in result["wall"]["dense"]])


if __name__ == "__main__":
    main()

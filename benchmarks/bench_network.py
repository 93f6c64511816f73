"""Training-step time and peak memory of our ``smit`` SwinUNETR against MONAI's SwinUNETR.

One step is forward, cross-entropy against fixed random labels, backward (no optimizer step;
gradients are freed before each step). Every (variant, input size) runs in its own freshly
spawned worker process, so its peak memory belongs to that model alone: peak RSS
(``ru_maxrss``) on CPU, ``torch.cuda.max_memory_allocated`` on CUDA. The baseline is the
memory right before the first forward (model, input and labels built), and "activation" memory
is peak - baseline (it includes the gradients, which backward allocates).

The workers of one input size live together and the parent asks them for one step at a time in
turn, reversing the order every round (ours, MONAI, ..., MONAI, ours, ...), so slow phases of a
noisy machine hit all variants alike; the table reports medians over the timed rounds.

Variants (MONAI's SwinUNETR uses window 7 by default, ours uses 4; ``monai_w4`` is MONAI with
window 4 for a like-for-like comparison):

    ours        SwinUNETRSeg(PRESETS["smit"], 1, 2, deep_supervision=False)
    ours_ckpt   the same with gradient_checkpointing=True (Swin blocks and full/half-res decoder)
    monai       SwinUNETR(1, 2, feature_size=48, depths=(2, 2, 8, 2), num_heads=(4, 4, 8, 16))
    monai_ckpt  the same with use_checkpoint=True (Swin blocks only)
    monai_w4    the same as monai with window_size=4

Usage::

    python -m benchmarks.bench_network                       # 96^3 and 64^3, batch 1, all variants
    python -m benchmarks.bench_network --sizes 64 --repeats 5 --markdown
    python -m benchmarks.bench_network --device cuda --amp   # on a GPU: ms/step and allocated memory
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import importlib.metadata
import logging
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import cast

import torch
import torch.nn.functional as F

from benchmarks.tables import format_table

logger = logging.getLogger(__name__)

GB = 1024**3


@dataclass(frozen=True)
class Variant:
    """One network configuration of the benchmark.

    Attributes:
        name: Key used on the command line.
        family: ``"ours"`` or ``"monai"``.
        window: Attention window edge.
        checkpointing: Gradient checkpointing on.
        time_reference: Variant whose time is the denominator of the "vs MONAI" ratio.
        like_for_like: Variant with MONAI at our window size (denominator of "vs MONAI w4").
    """

    name: str
    family: str
    window: int
    checkpointing: bool
    time_reference: str
    like_for_like: str | None = None


VARIANTS: dict[str, Variant] = {
    "ours": Variant("ours", "ours", 4, False, "monai", "monai_w4"),
    "ours_ckpt": Variant("ours_ckpt", "ours", 4, True, "monai_ckpt"),
    "monai": Variant("monai", "monai", 7, False, "monai"),
    "monai_ckpt": Variant("monai_ckpt", "monai", 7, True, "monai_ckpt"),
    "monai_w4": Variant("monai_w4", "monai", 4, False, "monai", "monai_w4"),
}
#: Denominator of the memory ratio.
MEMORY_REFERENCE = "monai"


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker process builds and runs."""

    variant: str
    size: int
    batch: int
    device: str
    threads: int
    amp: bool
    num_classes: int = 2
    seed: int = 0


@dataclass
class Result:
    """Measurements of one (variant, size)."""

    variant: str
    size: int
    params: int
    baseline_bytes: int = 0
    peak_bytes: int = 0
    forward_s: list[float] = field(default_factory=list)
    backward_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)

    @property
    def step_s(self) -> list[float]:
        return [f + b for f, b in zip(self.forward_s, self.backward_s, strict=True)]

    @property
    def activation_bytes(self) -> int:
        return self.peak_bytes - self.baseline_bytes


def build_network(variant: Variant, num_classes: int) -> torch.nn.Module:
    """Build the network of ``variant`` with one input channel."""
    if variant.family == "ours":
        from nnunet_ssl.networks import PRESETS, SwinUNETRSeg

        preset = dataclasses.replace(PRESETS["smit"], gradient_checkpointing=variant.checkpointing)
        return SwinUNETRSeg(preset, in_channels=1, num_classes=num_classes, deep_supervision=False)
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(
        in_channels=1,
        out_channels=num_classes,
        feature_size=48,
        depths=(2, 2, 8, 2),
        num_heads=(4, 4, 8, 16),
        window_size=variant.window,
        use_checkpoint=variant.checkpointing,
    )


# ----------------------------------------------------------------------------------------------
# worker side


def _current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="utf-8") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return _peak_rss_bytes()


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _release_free_memory() -> None:
    """Hand freed heap memory back to the OS so idle workers do not sit on their peak."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _worker(conn: Connection, spec: WorkerSpec) -> None:
    try:
        _serve(conn, spec)
    except Exception:  # noqa: BLE001  (any failure, MemoryError included, goes to the parent)
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _serve(conn: Connection, spec: WorkerSpec) -> None:
    device = torch.device(spec.device)
    cuda = device.type == "cuda"
    torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    model = build_network(VARIANTS[spec.variant], spec.num_classes).to(device).train()
    generator = torch.Generator().manual_seed(spec.seed + 1)
    shape = (spec.size,) * 3
    x = torch.randn(spec.batch, 1, *shape, generator=generator).to(device)
    y = torch.randint(0, spec.num_classes, (spec.batch, *shape), generator=generator).to(device)
    amp_dtype = torch.float16 if cuda else torch.bfloat16
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if spec.amp else nullcontext

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    _release_free_memory()
    sync()
    if cuda:
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        baseline = _current_rss_bytes()
    conn.send(("ready", {"params": sum(p.numel() for p in model.parameters()), "baseline": baseline}))
    while True:
        command = conn.recv()
        if command == "step":
            model.zero_grad(set_to_none=True)
            sync()
            cpu_start = time.process_time()
            start = time.perf_counter()
            with autocast():
                out = model(x)
            loss = F.cross_entropy(out.float(), y)
            sync()
            middle = time.perf_counter()
            loss.backward()
            sync()
            end = time.perf_counter()
            cpu = time.process_time() - cpu_start
            del out, loss
            _release_free_memory()
            conn.send(("step", (middle - start, end - middle, cpu)))
        elif command == "stop":
            peak = torch.cuda.max_memory_allocated(device) if cuda else _peak_rss_bytes()
            conn.send(("done", {"peak": peak}))
            return
        else:
            raise ValueError(f"unknown command {command!r}")


# ----------------------------------------------------------------------------------------------
# parent side


class _Worker:
    def __init__(self, ctx: mp.context.SpawnContext, spec: WorkerSpec) -> None:
        self.spec = spec
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_worker, args=(child_conn, spec), daemon=True)
        self.process.start()
        child_conn.close()

    def request(self, command: str, expect: str) -> object:
        self.conn.send(command)
        return self.receive(expect)

    def receive(self, expect: str) -> object:
        try:
            kind, payload = self.conn.recv()
        except EOFError:
            self.process.join(timeout=5)
            raise RuntimeError(
                f"worker {self.spec.variant} at {self.spec.size}^3 died (exit code {self.process.exitcode}; "
                "-9 usually means it ran out of memory)"
            ) from None
        if kind == "error":
            raise RuntimeError(f"worker {self.spec.variant} at {self.spec.size}^3 failed:\n{payload}")
        if kind != expect:
            raise RuntimeError(f"worker {self.spec.variant}: expected {expect!r}, got {kind!r}")
        return payload

    def close(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
        self.process.join(timeout=10)


def run_size(size: int, variants: list[str], args: argparse.Namespace) -> dict[str, Result]:
    """Benchmark all ``variants`` at one input size with interleaved steps."""
    ctx = mp.get_context("spawn")
    workers: dict[str, _Worker] = {}
    results: dict[str, Result] = {}
    try:
        for name in variants:  # build one after the other: builds do not compete for the cores
            spec = WorkerSpec(name, size, args.batch, args.device, args.threads, args.amp)
            workers[name] = worker = _Worker(ctx, spec)
            info = worker.receive("ready")
            assert isinstance(info, dict)
            results[name] = Result(name, size, info["params"], baseline_bytes=info["baseline"])
            logger.info(
                "%d^3 %-10s built: %.2f M parameters, baseline memory %.2f GB",
                size, name, info["params"] / 1e6, info["baseline"] / GB,
            )
        rounds = args.warmup + args.repeats
        for r in range(rounds):
            order = variants if r % 2 == 0 else variants[::-1]
            label = "warm-up" if r < args.warmup else f"repeat {r - args.warmup + 1}/{args.repeats}"
            for name in order:
                forward_s, backward_s, cpu_s = cast(tuple[float, float, float], workers[name].request("step", "step"))
                logger.info(
                    "%d^3 %-10s %-12s forward %7.3f s  backward %7.3f s  step %7.3f s  (CPU time %7.3f s)",
                    size, name, label, forward_s, backward_s, forward_s + backward_s, cpu_s,
                )
                if r >= args.warmup:
                    results[name].forward_s.append(forward_s)
                    results[name].backward_s.append(backward_s)
                    results[name].cpu_s.append(cpu_s)
        for name in variants:
            done = workers[name].request("stop", "done")
            assert isinstance(done, dict)
            results[name].peak_bytes = done["peak"]
    finally:
        for worker in workers.values():
            worker.close()
    return results


# ----------------------------------------------------------------------------------------------
# report


def _ratio(value: float, reference: float | None) -> str:
    return "-" if reference is None or reference == 0 else f"{value / reference:.2f}"


def table_rows(results: dict[int, dict[str, Result]], args: argparse.Namespace) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the summary table (medians over the timed repeats)."""
    cuda = args.device.startswith("cuda")
    scale, unit = (1000.0, "ms") if cuda else (1.0, "s")
    memory = "allocated" if cuda else "RSS"
    header = [
        "input", "variant", "window", "ckpt", f"fwd ({unit})", f"bwd ({unit})", f"step ({unit})",
        *([] if cuda else ["CPU time (s)"]), "time vs MONAI", "time vs MONAI w4", f"peak {memory} (GB)", "activation (GB)", "act. vs MONAI plain",
    ]
    rows = []
    for size, by_variant in results.items():
        median_step = {name: statistics.median(r.step_s) for name, r in by_variant.items()}
        memory_reference = by_variant.get(MEMORY_REFERENCE)
        for name, r in by_variant.items():
            v = VARIANTS[name]
            step = median_step[name]
            like = median_step.get(v.like_for_like) if v.like_for_like else None
            rows.append([
                f"{args.batch}x{size}^3",
                name,
                str(v.window),
                "yes" if v.checkpointing else "no",
                f"{statistics.median(r.forward_s) * scale:.2f}",
                f"{statistics.median(r.backward_s) * scale:.2f}",
                f"{step * scale:.2f}",
                *([] if cuda else [f"{statistics.median(r.cpu_s):.2f}"]),
                _ratio(step, median_step.get(v.time_reference)),
                _ratio(step, like),
                f"{r.peak_bytes / GB:.2f}",
                f"{r.activation_bytes / GB:.2f}",
                _ratio(r.activation_bytes, memory_reference.activation_bytes if memory_reference else None),
            ])
    return header, rows


def machine_description(args: argparse.Namespace) -> list[str]:
    """Lines that say where and how the numbers were taken."""
    if args.device.startswith("cuda"):
        device = torch.cuda.get_device_name(torch.device(args.device))
    else:
        cpu = platform.processor() or "unknown CPU"
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                info = f.read()
            cpu = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
            flags = next((line for line in info.splitlines() if line.startswith("flags")), "").split()
            isa = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if flag in flags]
            cpu += f" ({', '.join(isa) or 'no avx2'})"
        except (OSError, StopIteration):
            pass
        device = f"{cpu}, {len(os.sched_getaffinity(0))} cores available, {args.threads} threads"
    try:
        monai_version = importlib.metadata.version("monai")
    except importlib.metadata.PackageNotFoundError:
        monai_version = "not installed"
    precision = ("autocast fp16" if args.device.startswith("cuda") else "autocast bf16") if args.amp else "fp32"
    return [
        f"- command: `python -m benchmarks.bench_network {' '.join(sys.argv[1:])}`".rstrip(),
        f"- date: {datetime.date.today().isoformat()}",
        f"- device: {device}",
        f"- torch {torch.__version__}, MONAI {monai_version}, Python {platform.python_version()}",
        (
            f"- batch {args.batch}, {precision}, {args.warmup} warm-up + {args.repeats} timed steps per variant "
            "(medians), interleaved"
        ),
    ]


# ----------------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 64], help="cubic input edges (multiples of 32)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per variant (default 3 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 on CPU, 3 on CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: all cores)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="networks to compare"
    )
    parser.add_argument("--amp", action="store_true", help="autocast (bf16 on CPU, fp16 on CUDA)")
    parser.add_argument("--markdown", action="store_true", help="also print a Markdown table for docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    if args.repeats is None:
        args.repeats = 20 if cuda else 3
    if args.warmup is None:
        args.warmup = 3 if cuda else 1
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    bad = [s for s in args.sizes if s % 32 or s < 64]
    if bad:
        parser.error(f"sizes must be multiples of 32 and at least 64, got {bad}")
    if args.repeats < 1 or args.warmup < 0 or args.batch < 1 or args.threads < 1:
        parser.error("--repeats, --batch and --threads must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    args = parse_args(argv)
    variants = [name for name in VARIANTS if name in args.variants]  # fixed order
    logger.info(
        "device %s, %d threads, sizes %s, batch %d, %d warm-up + %d timed steps, variants %s",
        args.device, args.threads, args.sizes, args.batch, args.warmup, args.repeats, variants,
    )
    logger.info("MONAI's SwinUNETR uses window 7 by default, ours uses window 4 (monai_w4: MONAI at window 4)")
    started = time.perf_counter()
    results: dict[int, dict[str, Result]] = {}
    failed = []
    for size in args.sizes:
        try:
            results[size] = run_size(size, variants, args)
        except RuntimeError as error:  # a worker died or failed: keep the other sizes
            logger.error("%d^3 failed: %s", size, error)
            failed.append(size)
            continue
        header, rows = table_rows({size: results[size]}, args)
        logger.info("%d^3 done:\n%s", size, format_table(header, rows, markdown=False, right_align=True))
    logger.info("done in %.1f min", (time.perf_counter() - started) / 60)
    if results:
        header, rows = table_rows(results, args)
        sys.stdout.write("\n" + format_table(header, rows, markdown=False, right_align=True) + "\n\n")
        if args.markdown:
            description = "\n".join(machine_description(args))
            sys.stdout.write(description + "\n\n" + format_table(header, rows, markdown=True) + "\n")
        sys.stdout.flush()
    if failed:
        sys.exit(f"failed sizes: {failed}")


if __name__ == "__main__":
    main()

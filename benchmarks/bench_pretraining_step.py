"""Pretraining step time and peak memory of every registered method, relative to SimMIM, in one run.

A full step is what the engine does: forward, loss, backward, the optional hooks (frozen last
layer), AdamW step and the EMA update. Every method gets the same number of input crops per step
(``--crops``, default 4): a 2-view method gets ``crops / 2`` volumes x 2 views, SimMIM (1 view)
``crops`` volumes x 1 view. The crops that actually pass through the student encoder are counted
(a hook on its patch embedding, which every path through the encoder runs), since a method may make several student inputs from one view (SwinUNETR
rotates each crop twice), and "per crop" divides by that count, so it compares like with like.
Teacher forwards, heads and losses are what the ratio measures.

``--keep-freed-memory`` (CPU, glibc) starts the measuring processes with ``MALLOC_MMAP_MAX_=0`` and a
huge ``MALLOC_TRIM_THRESHOLD_`` (:mod:`nnunet_ssl.cpu_memory`): freed tensors stay in the heap and are reused instead of being
returned to the kernel and faulted in, zeroed, on the next step. At 96^3 that page-fault work is a
large share of a CPU step and grows with a method's working set, which a GPU's caching allocator
never pays (docs/benchmarks.md). Peak memory cannot be read from the resident size then and is
not reported.

``--rounds N`` measures every method N times, interleaved (all methods, then all again), and
takes the median over all timed steps, so slow drift of a shared machine hits every method alike.

Each method runs in its own spawned process, one after the other, so peak memory is its own:
on CUDA ``torch.cuda.max_memory_allocated``; on CPU the peak resident set size during the
steps minus the resident size just before them (the step's working set: activations,
gradients, optimiser moments; the built model is excluded).

Run: ``python -m benchmarks.bench_pretraining_step [--preset tiny --size 64 --crops 4] [--methods simmim smit]``.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import multiprocessing as mp
import os
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from nnunet_ssl.cpu_memory import KEEP_FREED_MEMORY_ENV
from nnunet_ssl.networks.presets import get_preset
from nnunet_ssl.networks.swin import SwinEncoder
from nnunet_ssl.optim import decay_parameter_groups
from nnunet_ssl.pretraining.methods import METHODS, build_method, method_family
from nnunet_ssl.pretraining.methods.base import StepContext, after_step, before_optimizer_step, method_contract

logger = logging.getLogger("bench_pretraining_step")


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="utf-8") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def measure(name: str, preset: str, size: int, crops: int, repeats: int, warmup: int, device_name: str,
            threads: int) -> dict[str, Any]:
    """Median step time and peak step memory of method ``name`` (runs in a fresh process)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device(device_name)
    fields = {f.name for f in dataclasses.fields(METHODS[name][1])}
    method = build_method(name, get_preset(preset), 1, {"crop_size": size} if "crop_size" in fields else {})
    method.to(device).train()
    contract = method_contract(method)
    views = contract.num_views
    if crops % views:
        raise ValueError(f"--crops {crops} is not a multiple of {name}'s {views} views")
    optimizer = torch.optim.AdamW(decay_parameter_groups(contract.student_modules(), 0.05), lr=1e-4)
    batch = {"views": torch.rand(crops // views, views, 1, size, size, size, device=device)}

    def step(index: int) -> float:
        context = StepContext(step=10 + index, steps_per_epoch=5, total_steps=1000)  # epoch > 1: all heads train
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        contract.training_step(batch, context)["loss"].backward()
        before_optimizer_step(method, context)
        optimizer.step()
        after_step(method, context)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    # untimed: the first step allocates the optimiser moments and counts the crops through the student
    crops_through_student = _count_student_crops(contract.student_modules(), lambda: step(0))
    if crops_through_student == 0:
        raise RuntimeError(f"{name}: no crop reached the student encoder's patch embedding")
    for i in range(1, warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _rss_bytes()
    times = [step(warmup + i) for i in range(repeats)]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"method": name, "views": views, "volumes": crops // views, "crops": crops_through_student,
            "times": times, "seconds": statistics.median(times), "peak_bytes": max(peak, 0)}


def _count_student_crops(student: torch.nn.Module, run_step: Callable[[], object]) -> int:
    """Crops that pass through the student's (only) Swin encoder during ``run_step()``."""
    encoders = [m for m in student.modules() if isinstance(m, SwinEncoder)]
    if len(encoders) != 1:
        raise ValueError(f"expected one Swin encoder in the student, found {len(encoders)}")
    counted = 0

    def count(_module: torch.nn.Module, args: tuple) -> None:
        nonlocal counted
        counted += args[0].shape[0]

    # at the patch embedding: DINO and iBOT skip encoder.forward (pretraining/tokens.py)
    handle = encoders[0].patch_embed.register_forward_pre_hook(count)
    try:
        run_step()
    finally:
        handle.remove()
    return counted


def _worker(queue: Any, args: tuple) -> None:
    try:
        queue.put(measure(*args))
    except ValueError as error:  # e.g. NT-Xent needs >= 2 volumes: that method's row says so, the rest still run
        queue.put({"method": args[0], "error": str(error)})


def run_all(preset: str, size: int, crops: int, repeats: int, warmup: int, device: str, threads: int,
            methods: list[str] | None = None, rounds: int = 1) -> list[dict]:
    """:func:`measure` for ``methods`` (default: every Swin-family method in ``METHODS``), each in a spawned process,
    ``rounds`` times interleaved; a method's result pools the timed steps of all its rounds."""
    context = mp.get_context("spawn")
    names = list(methods or (n for n in METHODS if method_family(n).name == "swin"))  # the tiny/smit presets are Swin
    pooled: dict[str, dict] = {}
    for round_index in range(rounds):
        for name in names:
            queue = context.Queue()
            process = context.Process(
                target=_worker, args=(queue, (name, preset, size, crops, repeats, warmup, device, threads))
            )
            process.start()
            result = queue.get()
            process.join()
            if "error" in result:
                logger.warning("%s: not measured: %s", name, result["error"])
                pooled[name] = result
                continue
            logger.info("round %d, %s: %.3f s/step", round_index + 1, name, result["seconds"])
            if name in pooled:
                result["times"] = pooled[name]["times"] + result["times"]
                result["peak_bytes"] = max(pooled[name]["peak_bytes"], result["peak_bytes"])
                result["seconds"] = statistics.median(result["times"])
            pooled[name] = result
    return [pooled[name] for name in names]


def table(results: list[dict], header: str, memory: bool = True) -> str:
    """Markdown table with per-crop time and (if ``memory``) memory relative to SimMIM."""
    ref = next(r for r in results if r["method"] == "simmim")
    lines = [header, "", "| method | volumes x views | crops through the student | time/step (s) | time/crop vs SimMIM | "
             "peak step memory (MiB) | memory/crop vs SimMIM |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | not measured: {r['error']} | | | | | |")
            continue
        time_ratio = (r["seconds"] / r["crops"]) / (ref["seconds"] / ref["crops"])
        mem_ratio = (r["peak_bytes"] / r["crops"]) / max(ref["peak_bytes"] / ref["crops"], 1)
        memory_cells = f"{r['peak_bytes'] / 2**20:.0f} | {mem_ratio:.2f}x" if memory else "not measured | "
        lines.append(
            f"| {r['method']} | {r['volumes']} x {r['views']} | {r['crops']} | {r['seconds']:.3f} | {time_ratio:.2f}x | "
            f"{memory_cells} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--crops", type=int, default=4,
                        help="crops through the student per step (all methods); the contrastive methods need >= 2 "
                             "volumes, i.e. >= 4 crops for their 2 views")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=None,
                        help="methods to measure (default: all); simmim, the reference, is always added")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved measurements of every method")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="CPU: glibc keeps freed memory for reuse (no page faults per step); no memory figures")
    args = parser.parse_args()
    if args.rounds < 1 or args.repeats < 1 or args.warmup < 1:
        parser.error("--rounds, --repeats and --warmup must be >= 1 (the untimed first step counts the crops "
                     "through the student and allocates the optimiser moments)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    methods = None if args.methods is None else list(dict.fromkeys(["simmim", *args.methods]))
    if args.keep_freed_memory:  # read by glibc when each spawned measuring process starts
        os.environ.update(KEEP_FREED_MEMORY_ENV)
    results = run_all(args.preset, args.size, args.crops, args.repeats, args.warmup, args.device, args.threads,
                      methods, args.rounds)
    header = (f"preset {args.preset}, {args.size}^3 crops, {args.crops} input crops/step, "
              f"device {args.device} ({args.threads} threads), median of {args.repeats} steps after {args.warmup}"
              f" x {args.rounds} interleaved round(s)" + (", freed memory kept (MALLOC_MMAP_MAX_=0)"
                                                            if args.keep_freed_memory else ""))
    logger.info("\n%s", table(results, header, memory=not args.keep_freed_memory))


if __name__ == "__main__":
    main()

"""Pretraining step time and peak memory of every registered method, relative to SimMIM, in one run.

A full step is what the engine does: forward, loss, backward, the optional hooks (frozen last
layer), AdamW step and the EMA update. Every method gets the same number of crops through its
student per step (``--crops``, default 4): a 2-view method gets ``crops / 2`` volumes x 2 views,
SimMIM (1 view) ``crops`` volumes x 1 view; so "per crop" compares like with like. Teacher
forwards, heads and losses are what the ratio measures.

Each method runs in its own spawned process, one after the other, so peak memory is its own:
on CUDA ``torch.cuda.max_memory_allocated``; on CPU the peak resident set size during the
steps minus the resident size just before them (the step's working set: activations,
gradients, optimiser moments; the built model is excluded).

Run: ``python -m benchmarks.bench_pretraining_step [--preset tiny --size 64 --crops 4]``.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import multiprocessing as mp
import resource
import statistics
import time
from typing import Any

import torch

from nnunet_ssl.networks.presets import get_preset
from nnunet_ssl.optim import decay_parameter_groups
from nnunet_ssl.pretraining.methods import METHODS, build_method
from nnunet_ssl.pretraining.methods.base import StepContext, after_step, before_optimizer_step

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
    views = method.num_views
    if crops % views:
        raise ValueError(f"--crops {crops} is not a multiple of {name}'s {views} views")
    optimizer = torch.optim.AdamW(decay_parameter_groups(method.student_modules(), 0.05), lr=1e-4)
    batch = {"views": torch.rand(crops // views, views, 1, size, size, size, device=device)}

    def step(index: int) -> float:
        context = StepContext(step=10 + index, steps_per_epoch=5, total_steps=1000)  # epoch > 1: all heads train
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        method.training_step(batch, context)["loss"].backward()
        before_optimizer_step(method, context)
        optimizer.step()
        after_step(method, context)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for i in range(warmup):  # also allocates the optimiser moments
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
    return {"method": name, "views": views, "volumes": crops // views, "crops": crops,
            "seconds": statistics.median(times), "peak_bytes": max(peak, 0)}


def _worker(queue: Any, args: tuple) -> None:
    try:
        queue.put(measure(*args))
    except ValueError as error:  # e.g. NT-Xent needs >= 2 volumes: that method's row says so, the rest still run
        queue.put({"method": args[0], "error": str(error)})


def run_all(preset: str, size: int, crops: int, repeats: int, warmup: int, device: str, threads: int) -> list[dict]:
    """:func:`measure` for every method in ``METHODS``, each in a spawned process."""
    context = mp.get_context("spawn")
    results = []
    for name in METHODS:
        queue = context.Queue()
        process = context.Process(
            target=_worker, args=(queue, (name, preset, size, crops, repeats, warmup, device, threads))
        )
        process.start()
        results.append(queue.get())
        process.join()
        if "error" in results[-1]:
            logger.warning("%s: not measured: %s", name, results[-1]["error"])
        else:
            logger.info("%s: %.3f s/step", name, results[-1]["seconds"])
    return results


def table(results: list[dict], header: str) -> str:
    """Markdown table with per-crop time and memory relative to SimMIM."""
    ref = next(r for r in results if r["method"] == "simmim")
    lines = [header, "", "| method | volumes x views | time/step (s) | time/crop vs SimMIM | "
             "peak step memory (MiB) | memory/crop vs SimMIM |", "|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | not measured: {r['error']} | | | | |")
            continue
        time_ratio = (r["seconds"] / r["crops"]) / (ref["seconds"] / ref["crops"])
        mem_ratio = (r["peak_bytes"] / r["crops"]) / max(ref["peak_bytes"] / ref["crops"], 1)
        lines.append(
            f"| {r['method']} | {r['volumes']} x {r['views']} | {r['seconds']:.3f} | {time_ratio:.2f}x | "
            f"{r['peak_bytes'] / 2**20:.0f} | {mem_ratio:.2f}x |"
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
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = run_all(args.preset, args.size, args.crops, args.repeats, args.warmup, args.device, args.threads)
    header = (f"preset {args.preset}, {args.size}^3 crops, {args.crops} crops/step through the student, "
              f"device {args.device} ({args.threads} threads), median of {args.repeats} steps after {args.warmup}")
    logger.info("\n%s", table(results, header))


if __name__ == "__main__":
    main()

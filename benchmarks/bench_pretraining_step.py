"""SMIT vs SimMIM pretraining step time, same preset, same run, interleaved.

A full step is what the engine does: forward, loss, backward, AdamW step, EMA update. Two
normalisations are reported, because SMIT sees two views of every volume:

* same volumes per step: SMIT gets B volumes x 2 views, SimMIM B volumes x 1 view;
* same crops through the student: SimMIM gets 2B crops, as many as SMIT's student sees.

Run: ``python -m benchmarks.bench_pretraining_step [--preset smit --size 96 --batch 1] [--markdown]``.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
from nnunet_ssl.pretraining.methods import build_method
from nnunet_ssl.pretraining.methods.base import StepContext, after_step, before_optimizer_step

from nnunet_ssl.networks.presets import get_preset
from nnunet_ssl.optim import decay_parameter_groups

logger = logging.getLogger("bench_pretraining_step")


def make_step(method_name: str, preset: str, size: int, volumes: int, views: int, device: torch.device):
    """A closure running one full training step of ``method_name`` on a fixed random batch."""
    method = build_method(method_name, get_preset(preset), 1, {"crop_size": size}).to(device)
    optimizer = torch.optim.AdamW(decay_parameter_groups(method.student_modules(), 0.05), lr=1e-4)
    batch = {"views": torch.rand(volumes, views, 1, size, size, size, device=device)}
    context = StepContext(step=10, steps_per_epoch=100, total_steps=1000)

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = method.training_step(batch, context)["loss"]
        loss.backward()
        before_optimizer_step(method, context)
        optimizer.step()
        after_step(method, context)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smit")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=1, help="volumes per step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    b = args.batch
    runs = {
        f"SMIT ({b} vol x 2 views)": make_step("smit", args.preset, args.size, b, 2, device),
        f"SimMIM ({b} vol x 1 view)": make_step("simmim", args.preset, args.size, b, 1, device),
        f"SimMIM ({2 * b} vol x 1 view)": make_step("simmim", args.preset, args.size, 2 * b, 1, device),
    }
    for step in runs.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved, so machine noise hits all alike
        for name, step in runs.items():
            times[name].append(step())
    medians = {name: statistics.median(t) for name, t in times.items()}
    smit, simmim_same_volumes, simmim_same_crops = medians.values()
    unit = "ms" if device.type == "cuda" else "s"
    scale = 1000.0 if device.type == "cuda" else 1.0
    rows = [
        (name, medians[name] * scale) for name in runs
    ]
    header = f"preset {args.preset}, {args.size}^3, device {device}, median of {args.repeats}"
    if args.markdown:
        lines = [f"{header}", "", f"| run | time/step ({unit}) |", "|---|---|"]
        lines += [f"| {name} | {value:.3f} |" for name, value in rows]
        lines += [
            f"| **SMIT / SimMIM, same volumes** | **{smit / simmim_same_volumes:.2f}x** |",
            f"| **SMIT / SimMIM, same crops through the student** | **{smit / simmim_same_crops:.2f}x** |",
        ]
        logger.info("\n".join(lines))
    else:
        logger.info(header)
        for name, value in rows:
            logger.info("%-28s %.3f %s", name, value, unit)
        logger.info("SMIT / SimMIM same volumes: %.2fx; same crops: %.2fx",
                    smit / simmim_same_volumes, smit / simmim_same_crops)


if __name__ == "__main__":
    main()

"""Cost of a Swin trainer against nnU-Net's own CNN: one training epoch and one ``nnUNetv2_predict``.

Both trainers see the same preprocessed dataset, patch size and batch size: phantoms are planned
and preprocessed once with ``nnUNetv2_plan_and_preprocess``; a copy of nnU-Net's plans
(``nnUNetPlansCost``, same ``data_identifier``, so the same preprocessed files) fixes the patch and
batch size for both. Then, for ``SwinScratchTrainer`` (smit preset) and nnU-Net's ``nnUNetTrainer``:

* **epoch**: both trainers are built and initialised in this process as ``nnUNetv2_train`` does
  (network, optimizer, loss, torch.compile where nnU-Net would use it); ``--warmup`` steps are
  run untimed, then ``--iterations`` ``train_step`` calls are timed on batches drawn beforehand from
  each trainer's own nnU-Net data loader (the same augmentation pipeline for both; loading itself
  is left out of the timing because it is the same for both and runs in background workers in
  real training). The two trainers' steps alternate (A B, B A, ...) so a busy phase of a shared
  machine slows both alike. Reported: the median ms per iteration and the projected epoch of 250
  iterations.
* **predict**: the trainer's weights are saved as ``checkpoint_final.pth`` in a normal nnU-Net
  results folder, and ``nnUNetv2_predict`` (a subprocess, default test-time mirroring unless
  ``--disable-tta``) predicts one test case; reported: its wall time.

Ratios are Swin / nnU-Net. On a GPU the script runs on CUDA (nnU-Net's fp16 autocast and
GradScaler, synchronised timings) and the same table comes out.

Usage::

    python -m benchmarks.bench_finetune_cost                          # CPU or GPU, a few minutes on CPU
    python -m benchmarks.bench_finetune_cost --iterations 20 --patch 96 96 96 --batch 2   # GPU-sized run
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.tables import format_table

logger = logging.getLogger(__name__)

BIN = Path(sys.executable).parent
COST_PLANS = "nnUNetPlansCost"
SWIN = "SwinScratchTrainer"
NNUNET = "nnUNetTrainer"


def prepare_dataset(work: Path, patch: list[int], batch: int) -> dict[str, str]:
    """Phantoms, nnU-Net planning + preprocessing, and the cost plans; returns the nnU-Net environment."""
    from nnunet_ssl.cli import ext_trainer_path
    from nnunet_ssl.data.phantoms import PhantomConfig, write_phantom_datasets

    env = {
        **os.environ,
        "nnUNet_raw": str(work / "nnUNet_raw"), "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
        "nnUNet_results": str(work / "nnUNet_results"), "nnUNet_extTrainer": str(ext_trainer_path()),
        "nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "1",
    }
    preprocessed = work / "nnUNet_preprocessed" / "Dataset501_Phantom"
    if not (preprocessed / "nnUNetPlans.json").is_file():
        write_phantom_datasets(work, PhantomConfig(num_train=4, num_test=1, num_unlabeled=0, shape=(64, 96, 96)))
        subprocess.run([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", "501", "-c", "3d_fullres", "-np", "1"],
                       env=env, check=True, capture_output=True)
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text(encoding="utf-8"))
    plans["plans_name"] = COST_PLANS
    config = plans["configurations"]["3d_fullres"]
    config["patch_size"], config["batch_size"] = list(patch), batch
    (preprocessed / f"{COST_PLANS}.json").write_text(json.dumps(plans, indent=1), encoding="utf-8")
    return env


def build_trainer(name: str, env: dict[str, str], device: torch.device) -> Any:
    """A trainer built as nnUNetv2_train builds it (plans, dataset.json, fold ``all``), initialised."""
    from nnunetv2.run.run_training import get_trainer_from_args

    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer",
                                          "nnUNet_def_n_proc", "nnUNet_n_proc_DA")})
    trainer = get_trainer_from_args("501", "3d_fullres", "all", name, COST_PLANS, device=device)
    trainer.initialize()
    return trainer


def prepare_steps(name: str, env: dict[str, str], device: torch.device, count: int) -> tuple[Any, list[dict]]:
    """A trainer (initialised, data loaders started and stopped) and ``count`` batches from its own loader.

    Each trainer draws its own batches: the deep-supervision targets differ (nnU-Net's follow its
    plans' pooling, the Swin trainer's its decoder's strides).
    """
    trainer = build_trainer(name, env, device)
    trainer.on_train_start()  # data loaders, plans.json/dataset.json in the results folder
    batches = [next(trainer.dataloader_train) for _ in range(count)]
    for loader in (trainer.dataloader_train, trainer.dataloader_val):
        if hasattr(loader, "_finish"):
            loader._finish()
    trainer.network.train()
    trainer.lr_scheduler.step(0)
    return trainer, batches


def timed_step(trainer: Any, batch: dict, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    trainer.train_step(batch)
    _sync(device)
    return time.perf_counter() - start


def time_epochs(env: dict[str, str], device: torch.device, iterations: int, warmup: int) -> dict[str, tuple[float, Any]]:
    """Median seconds per ``train_step`` of each trainer; the two trainers' steps alternate, so a busy
    phase of the machine slows both alike."""
    prepared = {name: prepare_steps(name, env, device, warmup + iterations) for name in (NNUNET, SWIN)}
    times: dict[str, list[float]] = {name: [] for name in prepared}
    for i in range(warmup + iterations):
        for name, (trainer, batches) in (prepared.items() if i % 2 == 0 else reversed(prepared.items())):
            seconds = timed_step(trainer, batches[i], device)
            if i >= warmup:
                times[name].append(seconds)
    return {name: (statistics.median(times[name]), prepared[name][0]) for name in prepared}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_predict(name: str, trainer: Any, env: dict[str, str], work: Path, device: torch.device, tta: bool) -> float:
    """Wall time of ``nnUNetv2_predict`` on one test case with the trainer's current weights."""
    trainer.save_checkpoint(os.path.join(trainer.output_folder, "checkpoint_final.pth"))
    images = work / "nnUNet_raw" / "Dataset501_Phantom" / "imagesTs"
    one = work / "predict_input"
    one.mkdir(exist_ok=True)
    case = sorted(images.glob("*_0000.nii.gz"))[0]
    shutil.copy(case, one / case.name)
    out = work / "predictions" / name
    shutil.rmtree(out, ignore_errors=True)
    command = [str(BIN / "nnUNetv2_predict"), "-i", str(one), "-o", str(out), "-d", "501", "-c", "3d_fullres",
               "-p", COST_PLANS, "-tr", name, "-f", "all", "-device", device.type, "-npp", "1", "-nps", "1"]
    if not tta:
        command.append("--disable_tta")
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, encoding="utf-8", errors="replace")
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"nnUNetv2_predict -tr {name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one, removed afterwards)")
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64], help="patch size for both (default 64^3)")
    parser.add_argument("--batch", type=int, default=2, help="batch size for both (default 2)")
    parser.add_argument("--iterations", type=int, default=3, help="timed train steps (default 3; nnU-Net's epoch is 250)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed train steps first (default 1)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--disable-tta", action="store_true", help="predict without test-time mirroring")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if any(n % 32 or n < 64 for n in args.patch):
        raise SystemExit(f"--patch {args.patch}: every axis must be a multiple of 32 and >= 64 (the Swin encoder's)")
    temporary = args.work is None
    work = Path(tempfile.mkdtemp(prefix="bench_finetune_cost_")) if temporary else args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        env = prepare_dataset(work, args.patch, args.batch)
        results = {}
        for name, (step, trainer) in time_epochs(env, device, args.iterations, args.warmup).items():
            parameters = sum(p.numel() for p in trainer.network.parameters())
            logger.info("%s: %.0f ms/iteration (%.1f M parameters)", name, step * 1000, parameters / 1e6)
            predict = time_predict(name, trainer, env, work, device, not args.disable_tta)
            logger.info("%s: nnUNetv2_predict of one case %.1f s", name, predict)
            results[name] = {"step_s": step, "predict_s": predict, "parameters": parameters}
            del trainer
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    swin, cnn = results[SWIN], results[NNUNET]
    cpu = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    device_name = torch.cuda.get_device_name(0) if device.type == "cuda" else cpu
    header = ["measure", f"{SWIN} (smit)", NNUNET, "ratio Swin / nnU-Net"]
    rows = [
        ["parameters (M)", f"{swin['parameters'] / 1e6:.1f}", f"{cnn['parameters'] / 1e6:.1f}",
         f"{swin['parameters'] / cnn['parameters']:.2f}"],
        ["train step (ms)", f"{swin['step_s'] * 1000:.0f}", f"{cnn['step_s'] * 1000:.0f}",
         f"{swin['step_s'] / cnn['step_s']:.2f}"],
        ["epoch of 250 iterations (s, projected)", f"{swin['step_s'] * 250:.0f}", f"{cnn['step_s'] * 250:.0f}",
         f"{swin['step_s'] / cnn['step_s']:.2f}"],
        ["nnUNetv2_predict, one case (s)", f"{swin['predict_s']:.1f}", f"{cnn['predict_s']:.1f}",
         f"{swin['predict_s'] / cnn['predict_s']:.2f}"],
    ]
    sys.stdout.write(
        f"device: {device_name}; patch {args.patch}, batch {args.batch}; {args.iterations} timed iterations after "
        f"{args.warmup} warm-up; predict {'with' if not args.disable_tta else 'without'} test-time mirroring\n"
        + format_table(header, rows, args.markdown) + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Do decoder warm-up or LLRD stop pretrained fine-tunes from predicting only background? (issue 11)

Runs ``nnUNetv2_train`` (study trainers: the demo's tiny network and recipe, 10 epochs of 6
iterations; found by nnU-Net through a re-export shim this script writes) on a few-shot fold of a
demo work folder (``nnunet-ssl demo`` stages 1-5:
phantoms, SMIT pretraining, ``nnunet-ssl plan``, ``export``, ``split --shots 5``) for each
configuration and repeat, each in its own ``nnUNet_results`` folder (the same trainer class is
used with several policies), then tabulates from nnU-Net's own checkpoint logs:

* the first epoch (0-based, as nnU-Net's log numbers them) whose pseudo-Dice (nnU-Net's mean over
  the foreground structures) exceeds 0.1, and the first whose best single structure does;
* the epochs whose pseudo-Dice is 0 for every structure (background only);
* the last epoch's pseudo-Dice, EMA pseudo-Dice and validation loss;
* the foreground mean Dice of nnU-Net's final validation (``validation/summary.json``).

Usage (CPU: 10-40 minutes per run, depending on how busy the 2 cores are)::

    python -m benchmarks.finetune_policies --work demo_work --repeats 1
    python -m benchmarks.finetune_policies --work demo_work --table-only

Each repeat sets ``NNUNET_SSL_SEED`` to its index; a build without that variable runs unseeded
repeats. Finished runs are skipped, so a re-run adds repeats or configurations.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from nnunet_ssl.analysis.stats import spread
from nnunet_ssl.trainers.named import CPU_TRIAL_RECIPE, SwinScratchTrainer, SwinSMITTrainer

logger = logging.getLogger("finetune_policies")

#: The study's schedule: the CPU-trial recipe (tiny network, lr 1e-3, 1 warm-up epoch, cosine) shortened
#: to 10 epochs of 6 iterations, to fit a 2-core CPU shared with other jobs.
STUDY_RECIPE = replace(CPU_TRIAL_RECIPE, num_epochs=10, iterations_per_epoch=6)


class SwinScratchTrainer_tiny_policystudy(SwinScratchTrainer):  # noqa: N801 (nnU-Net trainer naming)
    preset_name, recipe = "tiny", STUDY_RECIPE


class SwinSMITTrainer_tiny_policystudy(SwinSMITTrainer):  # noqa: N801
    preset_name, recipe = "tiny", STUDY_RECIPE


SCRATCH = SwinScratchTrainer_tiny_policystudy.__name__
SMIT = SwinSMITTrainer_tiny_policystudy.__name__
PLANS = "nnUNetSwinPlans"
#: nnU-Net finds the study trainers through a re-export shim written into the work folder.
SHIM = f"from benchmarks.finetune_policies import {SCRATCH}, {SMIT}  # noqa: F401\n"
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class RunConfig:
    name: str
    trainer: str
    pretrained: bool
    policy: str


CONFIGS = (
    RunConfig("scratch", SCRATCH, False, ""),
    RunConfig("smit", SMIT, True, ""),
    RunConfig("smit+warmup", SMIT, True, "freeze_encoder_epochs=2,encoder_lr_warmup_epochs=2"),
    RunConfig("smit+llrd", SMIT, True, "llrd=0.75"),
    RunConfig("smit+warmup+llrd", SMIT, True, "freeze_encoder_epochs=2,encoder_lr_warmup_epochs=2,llrd=0.75"),
)


def fold_of(preprocessed: Path, shots: int) -> int:
    manifest = json.loads((preprocessed / "splits_manifest.json").read_text(encoding="utf-8"))
    for entry in manifest["folds"]:
        if entry["kind"] == "few_shot" and entry["size"] == shots:
            return int(entry["fold"])
    raise SystemExit(f"{preprocessed}: no {shots}-shot fold in splits_manifest.json; run `nnunet-ssl split --shots {shots}`")


def results_root(work: Path, config: RunConfig, repeat: int) -> Path:
    return work / "policy_runs" / config.name / f"repeat{repeat}"


def fold_dir(work: Path, config: RunConfig, repeat: int, fold: int) -> Path:
    return results_root(work, config, repeat) / "Dataset501_Phantom" / f"{config.trainer}__{PLANS}__3d_fullres" / f"fold_{fold}"


def train(work: Path, config: RunConfig, repeat: int, fold: int) -> float:
    """Train one run (skipped when finished); returns the wall time in seconds."""
    from nnunet_ssl.cli import ext_trainer_path

    out = fold_dir(work, config, repeat, fold)
    if (out / "checkpoint_final.pth").is_file():
        logger.info("%s repeat %d: done already", config.name, repeat)
        return 0.0
    shim = work / "policy_runs" / "ext"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "nnunet_ssl_policystudy_trainers.py").write_text(SHIM, encoding="utf-8")
    env = {
        **os.environ, "nnUNet_raw": str(work / "nnUNet_raw"), "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
        "nnUNet_results": str(results_root(work, config, repeat)),
        "nnUNet_extTrainer": f"{ext_trainer_path()}{os.pathsep}{shim}",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p),
        "nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "1", "NNUNET_SSL_FINETUNE": config.policy,
        "NNUNET_SSL_SEED": str(repeat),
    }
    args = ["501", "3d_fullres", str(fold), "-tr", config.trainer, "-p", PLANS, "-device", "cpu"]
    if (out / "checkpoint_latest.pth").is_file() or (out / "checkpoint_best.pth").is_file():
        args.append("--c")  # nnU-Net continues from latest, else best (a killed run keeps its policy)
    elif config.pretrained:
        args += ["-pretrained_weights", str(work / "weights" / "smit_Dataset501_Phantom.pt")]
    log = work / "policy_runs" / f"{config.name}_repeat{repeat}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with log.open("a", encoding="utf-8") as handle:
        result = subprocess.run([str(Path(sys.executable).parent / "nnUNetv2_train"), *args], env=env,
                                stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"{config.name} repeat {repeat} failed; see {log}")
    seconds = time.monotonic() - start
    logger.info("%s repeat %d: %.0f s", config.name, repeat, seconds)
    return seconds


def first_epoch_above(values: list[float], threshold: float) -> int | None:
    """First index whose value exceeds ``threshold`` (NaN never does), None if none."""
    return next((i for i, v in enumerate(values) if math.isfinite(v) and v > threshold), None)


def summarize(work: Path, config: RunConfig, repeat: int, fold: int) -> dict[str, Any] | None:
    from nnunet_ssl.analysis.curves import load_curves

    out = fold_dir(work, config, repeat, fold)
    curves = load_curves(out, config.trainer, fold)
    if curves is None or not (out / "checkpoint_final.pth").is_file():
        return None
    from nnunet_ssl.checkpoints import load_nnunet_checkpoint

    dice, ema = curves.series["mean_fg_dice"], curves.series["ema_fg_dice"]
    logged = load_nnunet_checkpoint(curves.source, mmap=True)["logging"]
    per_class = [[float(v) for v in epoch] for epoch in logged["dice_per_class_or_region"]]
    best_class = [max((v for v in epoch if math.isfinite(v)), default=math.nan) for epoch in per_class]
    summary = out / "validation" / "summary.json"
    final = json.loads(summary.read_text(encoding="utf-8"))["foreground_mean"]["Dice"] if summary.is_file() else math.nan
    return {
        "config": config.name, "policy": config.policy or "none", "repeat": repeat, "epochs": curves.epochs,
        "first_epoch_pseudo_dice_gt_0.1": first_epoch_above(dice, 0.1),
        "first_epoch_any_structure_gt_0.1": first_epoch_above(best_class, 0.1),
        "background_only_epochs": sum(1 for epoch in per_class if all(v == 0 for v in epoch)),
        "pseudo_dice_per_epoch": " ".join(f"{v:.3f}" for v in dice),
        "last_pseudo_dice": round(dice[-1], 4), "last_ema_pseudo_dice": round(ema[-1], 4),
        "last_val_loss": round(curves.series["val_losses"][-1], 4),
        "validation_dice": round(final, 4),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    columns = ["config", "policy", "repeat", "first_epoch_pseudo_dice_gt_0.1", "first_epoch_any_structure_gt_0.1",
               "background_only_epochs", "last_pseudo_dice", "last_ema_pseudo_dice", "last_val_loss", "validation_dice"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        value = {k: ("never" if row[k] is None else row[k]) for k in columns}
        lines.append("| " + " | ".join(str(value[k]) for k in columns) + " |")
    return "\n".join(lines)


def _mean_sd(values: list[float]) -> str:
    """Mean +/- sample sd of the finite ``values`` (the report's :func:`spread`), as plain text."""
    s = spread(values)
    if s.n == 0:
        return "n/a"
    return f"{s.mean:.3f} +/- {s.std:.3f}" if s.n > 1 else f"{s.mean:.3f}"


def aggregate_markdown(rows: list[dict[str, Any]]) -> str:
    """One line per configuration over its repeats: how many repeats ever passed 0.1 (and the mean
    first epoch of those), background-only epochs, and mean +/- sd of the last pseudo-Dice and the
    final validation Dice."""
    columns = ["config", "policy", "repeats", "repeats with pseudo-Dice > 0.1 (mean first epoch)",
               "background-only epochs (mean)", "last pseudo-Dice", "validation Dice"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for name in dict.fromkeys(str(r["config"]) for r in rows):
        group = [r for r in rows if r["config"] == name]
        firsts = [int(r["first_epoch_pseudo_dice_gt_0.1"]) for r in group if r["first_epoch_pseudo_dice_gt_0.1"] is not None]
        reached = f"{len(firsts)}/{len(group)}" + (f" ({statistics.fmean(firsts):.1f})" if firsts else "")
        background = statistics.fmean(float(r["background_only_epochs"]) for r in group)
        cells = [name, str(group[0]["policy"]), str(len(group)), reached, f"{background:.1f}",
                 _mean_sd([float(r["last_pseudo_dice"]) for r in group]),
                 _mean_sd([float(r["validation_dice"]) for r in group])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, type=Path, help="demo work folder (stages 1-5 done)")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--configs", nargs="+", default=[c.name for c in CONFIGS[:4]],
                        choices=[c.name for c in CONFIGS])
    parser.add_argument("--table-only", action="store_true", help="tabulate finished runs, train nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = args.work.resolve()
    fold = fold_of(work / "nnUNet_preprocessed" / "Dataset501_Phantom", args.shots)
    configs = [c for c in CONFIGS if c.name in args.configs]
    for repeat in range(args.repeats):
        for config in configs:
            if not args.table_only:
                train(work, config, repeat, fold)
    rows = [r for repeat in range(args.repeats) for c in configs if (r := summarize(work, c, repeat, fold))]
    table = markdown(rows)
    sys.stdout.write(table + "\n\n" + aggregate_markdown(rows) + "\n")
    with (work / "policy_runs" / "table.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["config"])
        writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

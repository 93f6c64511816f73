"""The main job: the whole story on generated phantoms, through nnU-Net's own commands.

Stages (each skipped when its output exists, so a re-run resumes):

1. generate phantoms (labeled dataset 501 + unlabeled pool);
2. ``nnUNetv2_plan_and_preprocess``;
3. ``nnUNetv2_train`` with the scratch trainer (continues a killed run with ``--c``);
4. ``nnUNetv2_predict`` on the test images;
5. Dice per structure against the test labels, written to ``results.md``.
"""
from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_ssl.analysis.metrics import dice_per_label
from nnunet_ssl.data.phantoms import LABELS, PhantomConfig, write_phantom_datasets

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs. The defaults fit about 15 minutes on 2 CPU cores."""

    work_dir: Path
    trainer: str = "SwinScratchTrainer_tiny_2epochs"
    dataset_id: int = 501
    configuration: str = "3d_fullres"
    fold: int = 0
    phantoms: PhantomConfig = PhantomConfig(num_train=8, num_test=3, num_unlabeled=4, shape=(40, 64, 64))
    processes: int = 2


class DemoError(RuntimeError):
    """A stage failed; the message names the stage and its log file."""


class Demo:
    """Runs the demo stages with nnU-Net's folders inside ``config.work_dir``."""

    def __init__(self, config: DemoConfig) -> None:
        from nnunet_ssl.cli import ext_trainer_path

        self.config = config
        self.root = config.work_dir.resolve()
        self.raw = self.root / "nnUNet_raw"
        self.preprocessed = self.root / "nnUNet_preprocessed"
        self.results = self.root / "nnUNet_results"
        self.logs = self.root / "logs"
        self.env = {
            **os.environ,
            "nnUNet_raw": str(self.raw),
            "nnUNet_preprocessed": str(self.preprocessed),
            "nnUNet_results": str(self.results),
            "nnUNet_extTrainer": str(ext_trainer_path()),
            "nnUNet_def_n_proc": str(config.processes),
            "nnUNet_n_proc_DA": str(config.processes),
        }

    @property
    def dataset_name(self) -> str:
        return f"Dataset{self.config.dataset_id:03d}_{self.config.phantoms.dataset_name}"

    @property
    def fold_dir(self) -> Path:
        c = self.config
        return self.results / self.dataset_name / f"{c.trainer}__nnUNetPlans__{c.configuration}" / f"fold_{c.fold}"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions" / self.config.trainer

    def stages(self) -> list[tuple[str, Callable[[], None]]]:
        return [
            ("generate phantoms", self.make_phantoms),
            ("nnUNetv2_plan_and_preprocess", self.plan),
            (f"nnUNetv2_train {self.config.trainer}", self.train),
            ("nnUNetv2_predict on the test images", self.predict),
            ("Dice per structure", self.evaluate),
        ]

    def run(self) -> Path:
        """Run every stage; returns the results file."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        stages = self.stages()
        for index, (name, stage) in enumerate(stages, start=1):
            start = time.monotonic()
            logger.info("[%d/%d] %s ...", index, len(stages), name)
            stage()
            logger.info("[%d/%d] %s done in %.0f s", index, len(stages), name, time.monotonic() - start)
        return self.root / "results.md"

    # ------------------------------------------------------------------ stages
    def make_phantoms(self) -> None:
        config = self.config.phantoms
        if config.dataset_id != self.config.dataset_id:
            raise DemoError("phantom dataset id and demo dataset id differ")
        write_phantom_datasets(self.root, config)

    def plan(self) -> None:
        stamp = self.preprocessed / self.dataset_name / ".nnunet_ssl_demo_planned"
        if stamp.is_file():
            logger.info("    already planned and preprocessed")
            return
        self._nnunet(
            "plan", "nnUNetv2_plan_and_preprocess", "-d", str(self.config.dataset_id),
            "-c", self.config.configuration, "-np", str(self.config.processes), "--verify_dataset_integrity",
        )
        stamp.touch()

    def train(self) -> None:
        if (self.fold_dir / "checkpoint_final.pth").is_file():
            logger.info("    already trained: %s", self.fold_dir)
            return
        resume = ["--c"] if (self.fold_dir / "checkpoint_latest.pth").is_file() else []
        if resume:
            logger.info("    continuing the interrupted run from checkpoint_latest.pth")
        c = self.config
        self._nnunet(
            "train", "nnUNetv2_train", str(c.dataset_id), c.configuration, str(c.fold), "-tr", c.trainer,
            "-device", "cpu", *resume,
        )

    def test_images(self) -> list[Path]:
        return sorted((self.raw / self.dataset_name / "imagesTs").glob("*_0000.nii.gz"))

    def prediction_for(self, image: Path) -> Path:
        return self.predictions / image.name.replace("_0000.nii.gz", ".nii.gz")

    def predict(self) -> None:
        if all(self.prediction_for(image).is_file() for image in self.test_images()):
            logger.info("    predictions exist: %s", self.predictions)
            return
        c = self.config
        self._nnunet(
            "predict", "nnUNetv2_predict", "-i", str(self.raw / self.dataset_name / "imagesTs"),
            "-o", str(self.predictions), "-d", str(c.dataset_id), "-c", c.configuration, "-tr", c.trainer,
            "-f", str(c.fold), "-device", "cpu", "-npp", "1", "-nps", "1",
        )

    def evaluate(self) -> None:
        labels = {name: value for name, value in LABELS.items() if value > 0}
        rows = []
        for image in self.test_images():
            reference_file = self.raw / self.dataset_name / "labelsTs" / self.prediction_for(image).name
            prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(self.prediction_for(image))))
            reference = sitk.GetArrayFromImage(sitk.ReadImage(str(reference_file)))
            rows.append((reference_file.name, dice_per_label(prediction, reference, list(labels.values()))))
        table = format_dice_table(rows, labels)
        out = self.root / "results.md"
        out.write_text(f"# nnunet-ssl demo\n\nTrainer `{self.config.trainer}`, test set Dice:\n\n{table}\n")
        logger.info("results: %s\n%s", out, table)

    # ------------------------------------------------------------------ helpers
    def _nnunet(self, stage: str, executable: str, *args: str) -> None:
        log_file = self.logs / f"{stage}.log"
        command = [str(Path(sys.executable).parent / executable), *args]
        logger.info("    $ %s  (log: %s)", " ".join([executable, *args]), log_file)
        with log_file.open("a") as log:
            result = subprocess.run(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            tail = "\n".join(log_file.read_text().splitlines()[-25:])
            raise DemoError(f"stage '{stage}' failed (exit {result.returncode}); see {log_file}:\n{tail}")


def format_dice_table(rows: list[tuple[str, dict[int, float]]], labels: dict[str, int]) -> str:
    """Markdown table of Dice per case and structure, with a mean row (NaN = structure absent)."""
    header = "| case | " + " | ".join(labels) + " |"
    lines = [header, "|" + "---|" * (len(labels) + 1)]
    for case, scores in rows:
        lines.append(f"| {case} | " + " | ".join(_fmt(scores[v]) for v in labels.values()) + " |")
    means = []
    for value in labels.values():
        present = [scores[value] for _, scores in rows if not math.isnan(scores[value])]
        means.append(float(np.mean(present)) if present else float("nan"))
    lines.append("| **mean** | " + " | ".join(_fmt(m) for m in means) + " |")
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"

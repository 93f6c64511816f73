"""The main job: the whole story on generated phantoms, through nnU-Net's own commands.

Stages (each skipped when its output exists, so a re-run resumes):

1. generate phantoms (labeled dataset 501 + unlabeled pool);
2. pretrain SMIT briefly on the unlabeled pool (``nnunet-ssl pretrain``, resumable);
3. ``nnUNetv2_plan_and_preprocess``;
4. ``nnunet-ssl export`` of the SMIT encoder for dataset 501's plans;
5. ``nnUNetv2_train`` from scratch and from the SMIT weights (each continues a killed run with ``--c``);
6. ``nnUNetv2_predict`` on the test images with both;
7. Dice per structure against the test labels, both trainers side by side, written to ``results.md``.
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
    scratch_trainer: str = "SwinScratchTrainer_tiny_8epochs"
    pretrained_trainer: str = "SwinSMITTrainer_tiny_8epochs"
    pretrain_steps: int = 30
    dataset_id: int = 501
    configuration: str = "3d_fullres"
    fold: int = 0
    phantoms: PhantomConfig = PhantomConfig(num_train=8, num_test=3, num_unlabeled=4, shape=(40, 64, 64))
    processes: int = 2
    augmentation_processes: int = 1


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
            "nnUNet_n_proc_DA": str(config.augmentation_processes),
        }

    @property
    def dataset_name(self) -> str:
        return f"Dataset{self.config.dataset_id:03d}_{self.config.phantoms.dataset_name}"

    def fold_dir(self, trainer: str) -> Path:
        c = self.config
        return self.results / self.dataset_name / f"{trainer}__nnUNetPlans__{c.configuration}" / f"fold_{c.fold}"

    def predictions(self, trainer: str) -> Path:
        return self.root / "predictions" / trainer

    @property
    def trainers(self) -> tuple[str, str]:
        return self.config.scratch_trainer, self.config.pretrained_trainer

    @property
    def pretrain_dir(self) -> Path:
        return self.root / "pretraining" / "smit"

    @property
    def weights_file(self) -> Path:
        return self.root / "weights" / f"smit_{self.dataset_name}.pt"

    def stages(self) -> list[tuple[str, Callable[[], None]]]:
        scratch, pretrained = self.trainers
        return [
            ("generate phantoms", self.make_phantoms),
            ("nnunet-ssl pretrain --method smit (unlabeled pool)", self.pretrain),
            ("nnUNetv2_plan_and_preprocess", self.plan),
            ("nnunet-ssl export (SMIT encoder -> -pretrained_weights file)", self.export),
            (f"nnUNetv2_train {scratch} (from scratch)", lambda: self.train(scratch, None)),
            (f"nnUNetv2_train {pretrained} -pretrained_weights", lambda: self.train(pretrained, self.weights_file)),
            ("nnUNetv2_predict on the test images (both)", self.predict),
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

    def pretrain(self) -> None:
        if (self.pretrain_dir / "checkpoint_final.pt").is_file():
            logger.info("    already pretrained: %s", self.pretrain_dir)
            return
        resume = ["--resume"] if (self.pretrain_dir / "checkpoint_latest.pt").is_file() else []
        self._run(
            "pretrain", "nnunet-ssl", "pretrain", "--method", "smit", "--data", str(self.root / "unlabeled"),
            "--out", str(self.pretrain_dir), "--preset", "tiny", "--crop-size", "64", "--batch-size", "2",
            "--max-steps", str(self.config.pretrain_steps), "--warmup-epochs", "2", "--lr", "5e-4",
            "--checkpoint-every", "10", "--workers", "1", "--no-progress",
            "--set", "out_dim=1024", "head_hidden_dim=256", "head_bottleneck_dim=64", *resume,
        )

    def plan(self) -> None:
        stamp = self.preprocessed / self.dataset_name / ".nnunet_ssl_demo_planned"
        if stamp.is_file():
            logger.info("    already planned and preprocessed")
            return
        self._run(
            "plan", "nnUNetv2_plan_and_preprocess", "-d", str(self.config.dataset_id),
            "-c", self.config.configuration, "-np", str(self.config.processes), "--verify_dataset_integrity",
        )
        stamp.touch()

    def export(self) -> None:
        if self.weights_file.is_file():
            logger.info("    already exported: %s", self.weights_file)
            return
        self._run(
            "export", "nnunet-ssl", "export", str(self.pretrain_dir), "-d", str(self.config.dataset_id),
            "-c", self.config.configuration, "--out", str(self.weights_file),
        )

    def train(self, trainer: str, weights: Path | None) -> None:
        fold_dir = self.fold_dir(trainer)
        if (fold_dir / "checkpoint_final.pth").is_file():
            logger.info("    already trained: %s", fold_dir)
            return
        c = self.config
        args = [str(c.dataset_id), c.configuration, str(c.fold), "-tr", trainer, "-device", "cpu"]
        if (fold_dir / "checkpoint_latest.pth").is_file():
            logger.info("    continuing the interrupted run from checkpoint_latest.pth")
            args.append("--c")
        elif weights is not None:
            args += ["-pretrained_weights", str(weights)]
        self._run(f"train_{trainer}", "nnUNetv2_train", *args)
        for log in sorted(fold_dir.glob("training_log_*.txt")):
            for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
                if "Pretrained weights loaded" in line or "training from scratch" in line:
                    logger.info("    %s", line.split(": ", 1)[-1])

    def test_images(self) -> list[Path]:
        return sorted((self.raw / self.dataset_name / "imagesTs").glob("*_0000.nii.gz"))

    @staticmethod
    def case_file(image: Path) -> str:
        return image.name.replace("_0000.nii.gz", ".nii.gz")

    def predict(self) -> None:
        c = self.config
        for trainer in self.trainers:
            out = self.predictions(trainer)
            if all((out / self.case_file(image)).is_file() for image in self.test_images()):
                logger.info("    predictions exist: %s", out)
                continue
            self._run(
                f"predict_{trainer}", "nnUNetv2_predict", "-i", str(self.raw / self.dataset_name / "imagesTs"),
                "-o", str(out), "-d", str(c.dataset_id), "-c", c.configuration, "-tr", trainer,
                "-f", str(c.fold), "-device", "cpu", "-npp", "1", "-nps", "1",
            )

    def evaluate(self) -> None:
        labels = {name: value for name, value in LABELS.items() if value > 0}
        sections = []
        for trainer in self.trainers:
            rows = []
            for image in self.test_images():
                case = self.case_file(image)
                prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(self.predictions(trainer) / case)))
                reference = sitk.GetArrayFromImage(sitk.ReadImage(str(self.raw / self.dataset_name / "labelsTs" / case)))
                rows.append((case, dice_per_label(prediction, reference, list(labels.values()))))
            sections.append(f"## {trainer}\n\n{format_dice_table(rows, labels)}\n")
        out = self.root / "results.md"
        out.write_text(
            "# nnunet-ssl demo: scratch vs SMIT-pretrained, test-set Dice\n\n"
            "Tiny preset and very short schedules so the demo runs on a laptop CPU: the numbers show the\n"
            "pipeline works end to end, not what pretraining buys at full scale.\n\n" + "\n".join(sections)
        )
        logger.info("results: %s\n%s", out, "\n".join(sections))

    # ------------------------------------------------------------------ helpers
    def _run(self, stage: str, executable: str, *args: str) -> None:
        log_file = self.logs / f"{stage}.log"
        command = [str(Path(sys.executable).parent / executable), *args]
        logger.info("    $ %s  (log: %s)", " ".join([executable, *args]), log_file)
        with log_file.open("a") as log:
            result = subprocess.run(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            tail = "\n".join(log_file.read_text(encoding="utf-8", errors="replace").splitlines()[-25:])
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

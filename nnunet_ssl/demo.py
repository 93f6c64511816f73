"""The main job: the whole story on generated phantoms, through nnU-Net's own commands.

Stages (each skipped when its output exists, so a re-run resumes):

1. generate phantoms (labeled dataset 501 + unlabeled pool);
2. pretrain SMIT briefly on the unlabeled pool (``nnunet-ssl pretrain``, resumable);
3. ``nnunet-ssl plan``: nnU-Net's planning and preprocessing with the paper's spacing and CT window;
4. ``nnunet-ssl export`` of the SMIT (student) encoder for those plans;
5. ``nnunet-ssl split``: a 5-shot fold appended to nnU-Net's ``splits_final.json``;
6. ``nnUNetv2_train`` on that fold from scratch and from the SMIT weights (``--c`` continues a killed run),
   with nnU-Net's epoch progress (epoch k/N, losses, pseudo-Dice) printed as it goes;
7. ``nnUNetv2_predict`` on the test images with both;
8. ``nnunet-ssl report``: test-set Dice, gap %, Wilcoxon, curves (``report/report.md``);
9. ``nnunet-ssl cka``: pretrained vs fine-tuned SMIT encoder, layer by layer (``cka/``).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from nnunet_ssl.cpu_memory import with_freed_memory_kept
from nnunet_ssl.data.phantoms import PhantomConfig, write_phantom_datasets
from nnunet_ssl.demo_progress import EpochProgress, keep_structures
from nnunet_ssl.io import atomic_json_dump

logger = logging.getLogger(__name__)

PLANS = "nnUNetSwinPlans"


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs. The defaults fit about 15 minutes on 2 CPU cores.

    Attributes:
        structures: Labels kept for segmentation (the two large organs by default, so that both
            arms learn something visible in a few minutes of CPU training); liver lesions count as
            liver, other structures become background. None keeps all four phantom structures.
        seed: ``NNUNET_SSL_SEED`` for the nnU-Net commands (seeded Swin trainers give the same table
            on every run of one machine).
        keep_freed_memory: Start the commands with glibc keeping freed memory for reuse
            (:mod:`nnunet_ssl.cpu_memory`; up to about 15 % less time per nnU-Net training on CPU). A
            ``MALLOC_*`` variable set in the caller's environment wins.
    """

    work_dir: Path
    scratch_trainer: str = "SwinScratchTrainer_tiny_16epochs"
    pretrained_trainer: str = "SwinSMITTrainer_tiny_16epochs"
    pretrain_steps: int = 30
    dataset_id: int = 501
    configuration: str = "3d_fullres"
    shots: int = 5
    split_seed: int = 0
    # (64, 96, 96) nominal voxels fill the 64^3 patch at the paper's 2 x 1.5 x 1.5 mm; at (40, 64, 64)
    # the organs covered ~3 % of a mostly padded patch and neither arm found them in 160 iterations.
    phantoms: PhantomConfig = PhantomConfig(num_train=8, num_test=3, num_unlabeled=4, shape=(64, 96, 96))
    structures: tuple[str, ...] | None = ("liver", "spleen")
    seed: int = 0
    processes: int = 2
    augmentation_processes: int = 1
    cka_patches_per_case: int = 2
    keep_freed_memory: bool = True


class DemoError(RuntimeError):
    """A stage failed; the message names the stage and its log file."""


class Demo:
    """Runs the demo stages with nnU-Net's folders inside ``config.work_dir``."""

    def __init__(self, config: DemoConfig) -> None:
        from nnunet_ssl.nnunet_ext import ext_trainer_path

        self.config = config
        self.root = config.work_dir.resolve()
        self.raw = self.root / "nnUNet_raw"
        self.preprocessed = self.root / "nnUNet_preprocessed"
        self.results = self.root / "nnUNet_results"
        self.logs = self.root / "logs"
        #: Per trainer, the epoch progress lines printed while it trained in this run.
        self.progress: dict[str, list[str]] = {}
        self.env = {
            **os.environ,
            "nnUNet_raw": str(self.raw),
            "nnUNet_preprocessed": str(self.preprocessed),
            "nnUNet_results": str(self.results),
            "nnUNet_extTrainer": str(ext_trainer_path()),
            "nnUNet_def_n_proc": str(config.processes),
            "nnUNet_n_proc_DA": str(config.augmentation_processes),
            "NNUNET_SSL_SEED": str(config.seed),
            "PYTHONUNBUFFERED": "1",  # nnU-Net's epoch lines as they happen, not when the pipe's buffer fills
        }
        if config.keep_freed_memory:
            self.env = with_freed_memory_kept(self.env)

    @property
    def dataset_name(self) -> str:
        return f"Dataset{self.config.dataset_id:03d}_{self.config.phantoms.dataset_name}"

    @cached_property
    def fold(self) -> int:
        """The 5-shot fold's index, read once from the split manifest (after the split stage)."""
        from nnunet_ssl.splits import MANIFEST_FILE, read_manifest

        c = self.config
        for entry in read_manifest(self.preprocessed / self.dataset_name / MANIFEST_FILE):
            if (entry.kind, entry.size, entry.seed) == ("few_shot", c.shots, c.split_seed):
                return entry.fold
        raise DemoError(f"no {c.shots}-shot fold (seed {c.split_seed}) in the split manifest; re-run the split stage")

    def fold_dir(self, trainer: str) -> Path:
        c = self.config
        return self.results / self.dataset_name / f"{trainer}__{PLANS}__{c.configuration}" / f"fold_{self.fold}"

    @property
    def predictions_root(self) -> Path:
        return self.root / "predictions"

    def predictions(self, trainer: str) -> Path:
        return self.predictions_root / trainer / f"fold_{self.fold}"

    @property
    def trainers(self) -> tuple[str, str]:
        return self.config.scratch_trainer, self.config.pretrained_trainer

    @property
    def pretrain_dir(self) -> Path:
        return self.root / "pretraining" / "smit"

    @property
    def weights_file(self) -> Path:
        return self.root / "weights" / f"smit_{self.dataset_name}.pt"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def cka_dir(self) -> Path:
        return self.root / "cka"

    @property
    def test_images_dir(self) -> Path:
        return self.raw / self.dataset_name / "imagesTs"

    def stages(self) -> list[tuple[str, Callable[[], None]]]:
        scratch, pretrained = self.trainers
        return [
            ("generate phantoms", self.make_phantoms),
            ("nnunet-ssl pretrain --method smit (unlabeled pool)", self.pretrain),
            ("nnunet-ssl plan (nnU-Net planning + preprocessing, paper setup)", self.plan),
            ("nnunet-ssl export --from student (SMIT encoder -> -pretrained_weights file)", self.export),
            (f"nnunet-ssl split --shots {self.config.shots}", self.split),
            (f"nnUNetv2_train {scratch} (from scratch)", lambda: self.train(scratch, None)),
            (f"nnUNetv2_train {pretrained} -pretrained_weights", lambda: self.train(pretrained, self.weights_file)),
            ("nnUNetv2_predict on the test images (both)", self.predict),
            ("nnunet-ssl report", self.report),
            ("nnunet-ssl cka (pretrained vs fine-tuned SMIT encoder)", self.cka),
        ]

    @property
    def stage_times_file(self) -> Path:
        return self.logs / "stage_seconds.json"

    def run(self) -> Path:
        """Run every stage; returns the report file.

        Each stage that did work records its duration in ``logs/stage_seconds.json``; a re-run that
        skips finished stages keeps their times, so summary.json's run time stays the work's.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        stages = self.stages()
        times = self._read_stage_times()
        started = time.monotonic()
        for index, (name, stage) in enumerate(stages, start=1):
            start = time.monotonic()
            logger.info("[%d/%d] %s ...", index, len(stages), name)
            worked = stage()
            seconds = time.monotonic() - start
            if worked is not False:
                times[name] = round(seconds, 1)
                atomic_json_dump(times, self.stage_times_file)
            logger.info("[%d/%d] %s done in %.0f s", index, len(stages), name, seconds)
        self.summarize(sum(times.get(name, 0.0) for name, _ in stages), time.monotonic() - started)
        return self.report_dir / "report.md"

    def _read_stage_times(self) -> dict[str, float]:
        try:
            return {k: float(v) for k, v in json.loads(self.stage_times_file.read_text(encoding="utf-8")).items()}
        except (OSError, ValueError, AttributeError):
            return {}

    # ------------------------------------------------------------------ stages
    def make_phantoms(self) -> bool:
        config = self.config.phantoms
        if config.dataset_id != self.config.dataset_id:
            raise DemoError("phantom dataset id and demo dataset id differ")
        existed = (self.raw / self.dataset_name / "dataset.json").is_file()
        write_phantom_datasets(self.root, config)
        if self.config.structures is not None:
            kept = keep_structures(self.raw / self.dataset_name, self.config.structures)
            logger.info("    structures: %s (liver lesions count as liver)", ", ".join(kept))
        return not existed

    def pretrain(self) -> bool:
        if (self.pretrain_dir / "checkpoint_final.pt").is_file():
            logger.info("    already pretrained: %s", self.pretrain_dir)
            return False
        resume = ["--resume"] if (self.pretrain_dir / "checkpoint_latest.pt").is_file() else []
        self._run(
            "pretrain", "nnunet-ssl", "pretrain", "--method", "smit", "--data", str(self.root / "unlabeled"),
            "--out", str(self.pretrain_dir), "--modality", "ct", "--preset", "tiny", "--crop-size", "64", "--batch-size", "2",
            "--max-steps", str(self.config.pretrain_steps), "--warmup-epochs", "2", "--lr", "5e-4",
            "--checkpoint-every", "10", "--workers", "1", "--no-progress",
            "--set", "out_dim=1024", "head_hidden_dim=256", "head_bottleneck_dim=64", *resume,
        )

    def plan(self) -> bool:
        stamp = self.preprocessed / self.dataset_name / ".nnunet_ssl_demo_planned"
        if stamp.is_file():
            logger.info("    already planned and preprocessed")
            return False
        self._run(
            "plan", "nnunet-ssl", "plan", "-d", str(self.config.dataset_id), "--preset", "tiny",
            "-np", str(self.config.processes), "--verify",
        )
        stamp.touch()

    def export(self) -> bool:
        if self.weights_file.is_file():
            logger.info("    already exported: %s", self.weights_file)
            return False
        # The student, not the default EMA teacher: after a few dozen steps at momentum 0.996 the
        # teacher is still about 90% its random initialisation (0.996**30 = 0.89), while the student
        # has learned to reconstruct masked patches ([SMIT]'s own code fine-tunes from the student).
        self._run(
            "export", "nnunet-ssl", "export", str(self.pretrain_dir), "-d", str(self.config.dataset_id),
            "-c", self.config.configuration, "-p", PLANS, "--from", "student", "--out", str(self.weights_file),
        )

    def split(self) -> None:
        c = self.config
        self._run(  # idempotent: a re-run returns the existing fold
            "split", "nnunet-ssl", "split", "-d", str(c.dataset_id), "--shots", str(c.shots),
            "--seeds", str(c.split_seed),
        )
        logger.info("    %d-shot fold: %d (splits_manifest.json)", c.shots, self.fold)

    def train(self, trainer: str, weights: Path | None) -> bool:
        from nnunet_ssl.trainers.named import TRAINERS

        fold_dir = self.fold_dir(trainer)
        if (fold_dir / "checkpoint_final.pth").is_file():
            logger.info("    already trained: %s", fold_dir)
            return False
        c = self.config
        args = [str(c.dataset_id), c.configuration, str(self.fold), "-tr", trainer, "-p", PLANS, "-device", "cpu"]
        if (fold_dir / "checkpoint_latest.pth").is_file():
            logger.info("    continuing the interrupted run from checkpoint_latest.pth")
            args.append("--c")
        elif weights is not None:
            args += ["-pretrained_weights", str(weights)]
        epochs = TRAINERS[trainer].recipe.for_few_shot().num_epochs if trainer in TRAINERS else None
        progress = EpochProgress(epochs, self.structure_names())
        self.progress[trainer] = progress.lines
        self._run(f"train_{trainer}", "nnUNetv2_train", *args, on_line=progress.feed)
        for log in sorted(fold_dir.glob("training_log_*.txt")):
            for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
                if any(key in line for key in ("Pretrained weights loaded", "training from scratch", "-shot fold")):
                    logger.info("    %s", line.split(": ", 1)[-1])
        return True

    def structure_names(self) -> list[str]:
        """Foreground label names of the dataset, by label value."""
        labels = json.loads((self.raw / self.dataset_name / "dataset.json").read_text(encoding="utf-8"))["labels"]
        return [name for name, value in sorted(labels.items(), key=lambda item: item[1]) if value != 0]

    def predict(self) -> bool:
        c = self.config
        cases = [p.name.replace("_0000.nii.gz", ".nii.gz") for p in sorted(self.test_images_dir.glob("*_0000.nii.gz"))]
        worked = False
        for trainer in self.trainers:
            out = self.predictions(trainer)
            if all((out / case).is_file() for case in cases):
                logger.info("    predictions exist: %s", out)
                continue
            worked = True
            self._run(
                f"predict_{trainer}", "nnUNetv2_predict", "-i", str(self.test_images_dir), "-o", str(out),
                "-d", str(c.dataset_id), "-c", c.configuration, "-p", PLANS, "-tr", trainer,
                "-f", str(self.fold), "-device", "cpu", "-npp", "1", "-nps", "1",
            )
        return worked

    def report(self) -> None:
        c = self.config
        self._run(
            "report", "nnunet-ssl", "report", "-d", str(c.dataset_id), "--trainers", *self.trainers,
            "-p", PLANS, "-c", c.configuration, "--folds", str(self.fold),
            "--test-images", str(self.test_images_dir), "--test-labels", str(self.raw / self.dataset_name / "labelsTs"),
            "--predictions", str(self.predictions_root), "--device", "cpu", "--out", str(self.report_dir),
        )

    def cka(self) -> bool:
        if (self.cka_dir / "cka_per_layer.csv").is_file():
            logger.info("    CKA exists: %s", self.cka_dir)
            return False
        self._run(
            "cka", "nnunet-ssl", "cka", "--pretrained", str(self.weights_file),
            "--finetuned", str(self.fold_dir(self.config.pretrained_trainer)), "--data", str(self.test_images_dir),
            "--patches-per-case", str(self.config.cka_patches_per_case), "--batch-size", "4", "--device", "cpu",
            "--out", str(self.cka_dir),
        )

    def summarize(self, seconds: float, this_run_seconds: float) -> None:
        """Print where everything is and the headline table.

        Args:
            seconds: Time of the work, summed over the stages that did it (across resumed runs).
            this_run_seconds: Wall time of this invocation (short when it only resumed).
        """
        report = self.report_dir / "report.md"
        headline = section(report.read_text(encoding="utf-8"), "## Mean Dice")
        per_layer = (self.cka_dir / "cka_per_layer.csv").read_text(encoding="utf-8").strip().splitlines()[1:]
        cka = ", ".join(f"{row.split(',')[0]} {float(row.split(',')[1]):.2f}" for row in per_layer)
        logger.info(
            "demo finished in %.1f min\n\nreport: %s\nCKA:    %s\n\n%s\nCKA pretrained vs fine-tuned SMIT encoder "
            "(1 = unchanged): %s",
            seconds / 60, report, self.cka_dir, headline, cka,
        )
        atomic_json_dump(
            {"report": str(report), "cka": str(self.cka_dir), "fold": self.fold, "minutes": round(seconds / 60, 2),
             "this_run_minutes": round(this_run_seconds / 60, 2), "stage_seconds": str(self.stage_times_file)},
            self.root / "summary.json",
        )

    # ------------------------------------------------------------------ helpers
    def _run(self, stage: str, executable: str, *args: str, on_line: Callable[[str], None] | None = None) -> None:
        """Run a command with its output in ``logs/<stage>.log``; ``on_line`` sees each line as it comes."""
        log_file = self.logs / f"{stage}.log"
        command = [str(Path(sys.executable).parent / executable), *args]
        logger.info("    $ %s  (log: %s)", " ".join([executable, *args]), log_file)
        with log_file.open("a", encoding="utf-8") as log:
            process = subprocess.Popen(command, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True, encoding="utf-8", errors="replace", bufsize=1)
            assert process.stdout is not None
            for line in process.stdout:
                log.write(line)
                log.flush()
                if on_line is not None:
                    on_line(line.rstrip("\n"))
            returncode = process.wait()
        if returncode != 0:
            tail = "\n".join(log_file.read_text(encoding="utf-8", errors="replace").splitlines()[-25:])
            raise DemoError(f"stage '{stage}' failed (exit {returncode}); see {log_file}:\n{tail}")


def section(markdown: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same level."""
    lines = markdown.splitlines()
    level = heading.split(" ")[0]
    try:
        start = lines.index(heading) + 1
    except ValueError:
        return ""
    end = next((i for i in range(start, len(lines)) if lines[i].startswith(level + " ")), len(lines))
    return "\n".join(lines[start:end]).strip() + "\n"

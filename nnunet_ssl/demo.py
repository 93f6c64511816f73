"""The main job: the whole story on generated phantoms, through nnU-Net's own commands.

The demo is an experiment (``demo_experiment.yaml``, written into the work folder: a scratch and a
SMIT arm on one 5-shot fold, scored on the test images) run by the experiment runner, plus the stages
around it. Each stage is skipped when its output exists, so a re-run resumes:

1. generate phantoms (labeled dataset 501 + unlabeled pool);
2. pretrain SMIT briefly on the unlabeled pool (``nnunet-ssl pretrain``, resumable);
3. ``nnunet-ssl plan``: nnU-Net's planning and preprocessing with the paper's spacing and CT window;
4. the experiment file, its 5-shot fold appended to nnU-Net's ``splits_final.json`` (``nnunet-ssl
   split``'s code) and its jobs (:func:`nnunet_ssl.experiment.runner.prepare`);
5. the jobs, one stage each (:func:`nnunet_ssl.experiment.runner.run_job`): ``nnunet-ssl export`` of the
   SMIT (student) encoder for those plans; ``nnUNetv2_train`` on the fold from scratch and from the
   SMIT weights (``--c`` continues a killed run), with nnU-Net's epoch progress (epoch k/N, losses,
   pseudo-Dice) printed as it goes; ``nnUNetv2_predict`` on the test images with both;
6. the experiment report (:mod:`nnunet_ssl.experiment.report`): test-set Dice, gap % and Wilcoxon vs
   scratch, curves (``report/report.md``), rendered as ``nnunet-ssl experiment report`` renders it;
7. ``nnunet-ssl cka``: pretrained vs fine-tuned SMIT encoder, layer by layer (``cka/``).

``nnunet-ssl experiment run|emit|report demo_work/demo_experiment.yaml`` works on the same folder
(with ``nnUNet_raw`` and ``nnUNet_preprocessed`` set to the demo's).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import yaml

from nnunet_ssl.cpu_memory import with_freed_memory_kept
from nnunet_ssl.data.phantoms import PhantomConfig, write_phantom_datasets
from nnunet_ssl.demo_progress import EpochProgress, PlanProgress, finished_line, keep_structures
from nnunet_ssl.experiment.grid import RESUME, SKIP, Job, decide
from nnunet_ssl.experiment.runner import (
    FAILED,
    Prepared,
    discard_unreadable_outputs,
    ext_trainer_variable,
    prepare,
    run_job,
)
from nnunet_ssl.experiment.spec import Experiment, load_experiment
from nnunet_ssl.io import atomic_json_dump, atomic_write_text

logger = logging.getLogger(__name__)

PLANS = "nnUNetSwinPlans"
#: How the pretraining engine's progress lines start (``pretraining.engine.ProgressLines``).
PRETRAINING_PROGRESS = "pretraining step "
EXPERIMENT_FILE = "demo_experiment.yaml"


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs. The defaults take about 22 minutes on 2 CPU cores (docs/benchmarks.md).

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
    """Runs the demo stages with nnU-Net's folders inside ``config.work_dir``.

    The work folder is also the experiment's output: ``results/<arm>/``, ``predictions/<arm>/``,
    ``weights/<arm>.pt``, ``logs/`` and ``report/`` (:mod:`nnunet_ssl.experiment.grid`). The arms are
    named after their trainers, so the report's rows name the trainers that made them.
    """

    def __init__(self, config: DemoConfig) -> None:
        self.config = config
        self.root = config.work_dir.resolve()
        self.raw = self.root / "nnUNet_raw"
        self.preprocessed = self.root / "nnUNet_preprocessed"
        self.logs = self.root / "logs"
        #: Per trainer, the epoch progress lines printed while it trained in this run.
        self.progress: dict[str, list[str]] = {}
        #: Stages this run skipped because an earlier run did their work.
        self.reused: list[str] = []
        self._prepared: Prepared | None = None
        #: What every command needs: nnU-Net's folders, the demo's process counts and seed (the
        #: experiment's jobs get the same through the experiment file's ``env``, and their
        #: ``nnUNet_results`` per arm).
        self.env = {
            **os.environ,
            "nnUNet_raw": str(self.raw),
            "nnUNet_preprocessed": str(self.preprocessed),
            "nnUNet_results": str(self.root / "nnUNet_results"),
            "nnUNet_extTrainer": ext_trainer_variable(os.environ),  # folders of the user's own trainers kept
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

    @property
    def trainers(self) -> tuple[str, str]:
        return self.config.scratch_trainer, self.config.pretrained_trainer

    @property
    def pretrain_dir(self) -> Path:
        return self.root / "pretraining" / "smit"

    @property
    def experiment_file(self) -> Path:
        return self.root / EXPERIMENT_FILE

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def cka_dir(self) -> Path:
        return self.root / "cka"

    @property
    def test_images_dir(self) -> Path:
        return self.raw / self.dataset_name / "imagesTs"

    # ------------------------------------------------------------------ the experiment
    def experiment_settings(self) -> dict[str, object]:
        """The demo as an experiment file's content (written to ``demo_experiment.yaml``).

        The pretraining run and the output are relative to the work folder; ``env`` carries what the
        demo's own commands get (:attr:`env`: nnU-Net's folders, process counts, memory settings) to
        every job.
        """
        c = self.config
        scratch, pretrained = self.trainers
        env = {key: self.env[key] for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_def_n_proc",
                                               "nnUNet_n_proc_DA", "PYTHONUNBUFFERED")}
        env.update({key: value for key, value in self.env.items() if key.startswith("MALLOC_")})
        return {
            "dataset": c.dataset_id, "plans": PLANS, "configuration": c.configuration, "preset": "tiny",
            "seed": c.seed, "device": "cpu", "output": ".", "env": env,
            "arms": [
                {"name": scratch, "trainer": scratch},
                # the student, not the default EMA teacher: after a few dozen steps at momentum 0.996 the
                # teacher is still about 90% its random initialisation (0.996**30 = 0.89), while the student
                # has learned to reconstruct masked patches ([SMIT]'s own code fine-tunes from the student)
                {"name": pretrained, "trainer": pretrained, "method": "smit",
                 "pretraining_run": str(self.pretrain_dir.relative_to(self.root)), "export_from": "student"},
            ],
            "settings": {"few_shot": {"shots": [c.shots], "seeds": [c.split_seed]}},
            "test_set": "imagesTs",
        }

    @contextlib.contextmanager
    def nnunet_folders(self) -> Iterator[None]:
        """``nnUNet_raw`` and ``nnUNet_preprocessed`` set to the demo's while the runner works in this process."""
        keys = ("nnUNet_raw", "nnUNet_preprocessed")
        saved = {key: os.environ.get(key) for key in keys}
        os.environ.update({key: self.env[key] for key in keys})
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def load_experiment(self) -> Experiment:
        return load_experiment(self.experiment_file)

    @property
    def prepared(self) -> Prepared:
        """The experiment with its fold and jobs (after the experiment stage)."""
        if self._prepared is None:
            with self.nnunet_folders():
                self._prepared = prepare(self.load_experiment())
        return self._prepared

    @property
    def fold(self) -> int:
        """The 5-shot fold's index (from the split manifest, after the experiment stage)."""
        return next(iter(self.prepared.settings[0].folds))

    def fold_dir(self, trainer: str) -> Path:
        return self.prepared.paths.fold_dir(trainer, trainer, self.fold)

    @property
    def weights_file(self) -> Path:
        return self.prepared.paths.weights(self.config.pretrained_trainer)

    # ------------------------------------------------------------------ running
    def stages(self) -> list[tuple[str, Callable[[], bool | None]]]:
        """The stages before the experiment's jobs (which are known once the experiment is prepared)."""
        return [
            ("generate phantoms", self.make_phantoms),
            ("nnunet-ssl pretrain --method smit (unlabeled pool)", self.pretrain),
            ("nnunet-ssl plan (nnU-Net planning + preprocessing, paper setup)", self.plan),
            (f"experiment {EXPERIMENT_FILE}: nnunet-ssl split --shots {self.config.shots} and the jobs", self.experiment),
        ]

    def closing_stages(self) -> list[tuple[str, Callable[[], bool | None]]]:
        return [
            ("experiment report (test-set Dice, gap %, Wilcoxon, curves)", self.report),
            ("nnunet-ssl cka (pretrained vs fine-tuned SMIT encoder)", self.cka),
        ]

    #: Jobs of the demo's experiment: one export, then a training and a prediction per arm.
    JOBS = 5

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
        times = self._read_stage_times()
        self.reused = []
        started = time.monotonic()
        before, after = self.stages(), self.closing_stages()
        total = len(before) + self.JOBS + len(after)
        names: list[str] = []
        for name, stage in before:
            names.append(self._stage(len(names) + 1, total, name, stage, times))
        for job in self.prepared.jobs:
            names.append(self._stage(len(names) + 1, total, job_title(job), partial(self.run_job, job), times))
        for name, stage in after:
            names.append(self._stage(len(names) + 1, total, name, stage, times))
        work, elapsed = sum(times.get(name, 0.0) for name in names), time.monotonic() - started
        reused_work = sum(times.get(name, 0.0) for name in self.reused)
        self.summarize(work, elapsed, finished_line(elapsed, work, len(self.reused), len(names), reused_work))
        return self.report_dir / "report.md"

    def _stage(self, index: int, total: int, name: str, stage: Callable[[], bool | None],
               times: dict[str, float]) -> str:
        start = time.monotonic()
        logger.info("[%d/%d] %s ...", index, total, name)
        worked = stage()
        seconds = time.monotonic() - start
        if worked is not False:
            times[name] = round(seconds, 1)
            atomic_json_dump(times, self.stage_times_file)
        else:
            self.reused.append(name)
        logger.info("[%d/%d] %s done in %.0f s", index, total, name, seconds)
        return name

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
            on_line=show_pretraining_progress,
        )
        return True

    def plan(self) -> bool:
        stamp = self.preprocessed / self.dataset_name / ".nnunet_ssl_demo_planned"
        if stamp.is_file():
            logger.info("    already planned and preprocessed")
            return False
        self._run(
            "plan", "nnunet-ssl", "plan", "-d", str(self.config.dataset_id), "--preset", "tiny",
            "-np", str(self.config.processes), "--verify", on_line=PlanProgress(),
        )
        stamp.touch()
        return True

    def experiment(self) -> None:
        """Write the experiment file, make its fold (idempotent: a re-run finds it) and build the jobs."""
        atomic_write_text(yaml.safe_dump(self.experiment_settings(), sort_keys=False), self.experiment_file)
        self._prepared = None
        prepared = self.prepared
        logger.info("    %d-shot fold: %d (splits_manifest.json); %d jobs, logs in %s", self.config.shots, self.fold,
                    len(prepared.jobs), prepared.paths.logs)
        if len(prepared.jobs) != self.JOBS:
            raise DemoError(f"the demo's experiment has {len(prepared.jobs)} jobs, expected {self.JOBS}")

    def run_job(self, job: Job) -> bool:
        """One job of the experiment through the runner; False when it was already done."""
        discard_unreadable_outputs(job)  # a prediction cut short by an interrupted demo is redone, as the runner does
        action, _ = decide(job)
        if action == SKIP:
            done = {"export": "already exported", "train": "already trained", "predict": "predictions exist"}[job.kind]
            logger.info("    %s: %s", done, job.done[0].parent if job.kind != "export" else job.done[0])
            return False
        logger.info("    $ %s  (log: %s)", " ".join(job.resume if action == RESUME and job.resume else job.command),
                    job.log)
        on_line = None
        if job.kind == "train":
            if action == RESUME:
                logger.info("    continuing the interrupted run from checkpoint_latest.pth")
            trainer = self.prepared.experiment.arm(job.arm).trainer or job.arm
            progress = EpochProgress(self.epochs(trainer), self.structure_names())
            self.progress[trainer] = progress.lines
            on_line = progress.feed
        with self.nnunet_folders():
            status, detail = run_job(job, on_line)
        if status == FAILED:
            tail = "\n".join(job.log.read_text(encoding="utf-8", errors="replace").splitlines()[-25:])
            raise DemoError(f"stage '{job.id}' failed: {detail}:\n{tail}")
        if job.kind == "train":
            self._log_weights_lines(job.done[0].parent)
        return True

    def epochs(self, trainer: str) -> int | None:
        """The few-shot epochs of ``trainer``, found as nnU-Net finds it with the demo's ``nnUNet_extTrainer``."""
        from nnunet_ssl.trainers.inputs import ext_trainer_folders
        from nnunet_ssl.trainers.named import UnknownTrainerError, find_trainer

        try:
            trainer_class = find_trainer(trainer, ext_trainer_folders(self.env))
        except UnknownTrainerError:
            return None  # the progress lines then say "epoch k" without the total
        return trainer_class.recipe.for_few_shot().num_epochs

    @staticmethod
    def _log_weights_lines(fold_dir: Path) -> None:
        for log in sorted(fold_dir.glob("training_log_*.txt")):
            for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
                if any(key in line for key in ("Pretrained weights loaded", "training from scratch", "-shot fold")):
                    logger.info("    %s", line.split(": ", 1)[-1])

    def structure_names(self) -> list[str]:
        """Foreground label names of the dataset, by label value."""
        labels = json.loads((self.raw / self.dataset_name / "dataset.json").read_text(encoding="utf-8"))["labels"]
        return [name for name, value in sorted(labels.items(), key=lambda item: item[1]) if value != 0]

    def report(self) -> None:
        """The experiment report (what ``nnunet-ssl experiment report`` writes) into ``report/``."""
        from nnunet_ssl.experiment.report import build_experiment_report, write_experiment_report

        with self.nnunet_folders():
            report = build_experiment_report(self.prepared, cka=True, device="cpu")
            write_experiment_report(report, self.report_dir)
        for run in report.transfer.runs:
            logger.info("    %-40s fold %-3d %-10s %s", run.trainer, run.fold, run.status,
                        f"{len(run.dice)} cases" if run.complete else run.reason)

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
        return True

    def summarize(self, seconds: float, this_run_seconds: float, line: str | None = None) -> None:
        """Print where everything is and the headline table.

        Args:
            seconds: Time of the work, summed over the stages that did it (across resumed runs).
            this_run_seconds: Wall time of this invocation (short when it only resumed).
            line: The closing time line (:func:`~nnunet_ssl.demo_progress.finished_line`; default: as if
                nothing was reused).
        """
        report = self.report_dir / "report.md"
        headline = section(report.read_text(encoding="utf-8"), "## Mean Dice")
        per_layer = (self.cka_dir / "cka_per_layer.csv").read_text(encoding="utf-8").strip().splitlines()[1:]
        cka = ", ".join(f"{row.split(',')[0]} {float(row.split(',')[1]):.2f}" for row in per_layer)
        logger.info(
            "%s\n\nreport: %s\nCKA:    %s\n\n%s\nCKA pretrained vs fine-tuned SMIT encoder (1 = unchanged): %s",
            line or finished_line(this_run_seconds, seconds, 0, 0, 0.0), report, self.cka_dir, headline, cka,
        )
        atomic_json_dump(
            {"report": str(report), "cka": str(self.cka_dir), "fold": self.fold, "minutes": round(seconds / 60, 2),
             "this_run_minutes": round(this_run_seconds / 60, 2), "reused_stages": list(self.reused),
             "stage_seconds": str(self.stage_times_file),
             "experiment": str(self.experiment_file)},
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
            for line in process.stdout or ():
                log.write(line)
                log.flush()
                if on_line is not None:
                    on_line(line.rstrip("\n"))
            returncode = process.wait()
        if returncode != 0:
            tail = "\n".join(log_file.read_text(encoding="utf-8", errors="replace").splitlines()[-25:])
            raise DemoError(f"stage '{stage}' failed (exit {returncode}); see {log_file}:\n{tail}")


def show_pretraining_progress(line: str) -> None:
    """Echo the pretraining engine's progress lines (every tenth of the run, at least every 30 s) on the console."""
    if PRETRAINING_PROGRESS in line:
        logger.info("    %s", line[line.index(PRETRAINING_PROGRESS):])


def job_title(job: Job) -> str:
    """A job as a demo stage line, e.g. ``nnUNetv2_train SwinSMITTrainer_tiny_16epochs -pretrained_weights``."""
    if job.kind == "export":
        return f"nnunet-ssl export --from student ({job.arm}: SMIT encoder -> -pretrained_weights file)"
    if job.kind == "train":
        pretrained = "-pretrained_weights" in job.command
        return f"nnUNetv2_train {job.arm}" + (" -pretrained_weights" if pretrained else " (from scratch)")
    return f"nnUNetv2_predict {job.arm} on the test images"


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

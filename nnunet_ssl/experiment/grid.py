"""The experiment's grid as jobs: one model for ``experiment run`` and both ``experiment emit`` formats.

A :class:`Job` is an nnU-Net or nnunet-ssl command with the files that say how far it got. What to do
with a job is decided from those files alone (:func:`decide`): skip it when its ``done`` files exist,
validate only (``--val``) when training finished but its validation did not, continue (``--c``) from
``checkpoint_latest.pth``, else run it fresh. The runner applies :func:`decide` in Python; the emitted
shell lines spell the same decision as ``if [ -f ... ]`` tests (:mod:`nnunet_ssl.experiment.emit`),
so the two cannot drift apart.

Folder layout under the experiment's ``output``::

    weights/<arm>.pt                                   exports of pretraining runs
    results/<arm>/<Dataset>/<Trainer>__<plans>__<configuration>/fold_N/   nnUNet_results of one arm
    predictions/<arm>/fold_N/<case><ending>           nnUNetv2_predict outputs on the test set
    logs/<job id>.log                                 one log per job
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from nnunet_ssl.case_ids import check_case_ids
from nnunet_ssl.experiment.spec import Arm, Experiment, ExperimentError, TestSetSpec, arm_plans, trainer_name
from nnunet_ssl.splits import FoldEntry
from nnunet_ssl.trainers.inputs import EPOCHS_ENV, SEED_ENV

SKIP, FRESH, RESUME, VALIDATE = "skip", "fresh", "resume", "validate"


@dataclass(frozen=True)
class SettingFolds:
    """One table of the report: a setting kind and size with its folds (one per seed for subsets).

    Attributes:
        kind: ``full``, ``few_shot`` or ``data_limited``.
        size: Training cases (None for ``full``).
        folds: fold -> seed (``full``: the fold index itself).
    """

    kind: str
    size: int | None
    folds: dict[int, int]

    @property
    def label(self) -> str:
        return self.kind if self.size is None else f"{self.kind}{self.size}"

    @property
    def title(self) -> str:
        if self.kind == "full":
            return "full data (nnU-Net's cross-validation folds)"
        return f"{self.kind.replace('_', '-')}, {self.size} training cases"


@dataclass(frozen=True)
class Job:
    """One command of the grid.

    Attributes:
        id: Unique, folder-safe name (also the log file's name).
        kind: ``export``, ``train`` or ``predict``.
        env: Variables set for this command only.
        command: The command run fresh.
        resume: The command continuing from ``partial`` (training: ``--c``), or None.
        validate: The command when ``finished`` exists but ``done`` does not (``--val``), or None.
        done: Every one of these files exists: nothing to do.
        finished: Training finished (``checkpoint_final.pth``).
        partial: An interrupted training can continue (``checkpoint_latest.pth``).
        depends: Ids of jobs that must succeed first.
        references: Per ``done`` file, the image it must match in shape (a prediction: its case's first
            channel); the runner counts such a file as done only when it reads back whole (empty: no check).
        setting: The setting label (empty for exports); ``fold``: its fold (None for exports).
    """

    id: str
    kind: str
    arm: str
    env: tuple[tuple[str, str], ...]
    command: tuple[str, ...]
    done: tuple[Path, ...]
    log: Path
    resume: tuple[str, ...] | None = None
    validate: tuple[str, ...] | None = None
    finished: Path | None = None
    partial: Path | None = None
    depends: tuple[str, ...] = ()
    setting: str = ""
    fold: int | None = None
    references: tuple[Path, ...] = ()


def decide(job: Job) -> tuple[str, tuple[str, ...] | None]:
    """(action, command) of a job from its files: skip, validate, resume or fresh."""
    if job.done and all(path.is_file() for path in job.done):
        return SKIP, None
    if job.validate is not None and job.finished is not None and job.finished.is_file():
        return VALIDATE, job.validate
    if job.resume is not None and job.partial is not None and job.partial.is_file():
        return RESUME, job.resume
    return FRESH, job.command


@dataclass(frozen=True)
class Paths:
    """Where an experiment's files go (see the module docstring)."""

    output: Path
    dataset_name: str
    configuration: str
    plans_of_arm: tuple[tuple[str, str], ...] = ()

    def weights(self, arm: str) -> Path:
        return self.output / "weights" / f"{arm}.pt"

    def results_root(self, arm: str) -> Path:
        return self.output / "results" / arm

    def plans(self, arm: str) -> str:
        """The plans identifier of ``arm`` (each arm may train with its own)."""
        return dict(self.plans_of_arm)[arm]

    def model_dir(self, arm: str, trainer: str) -> Path:
        return self.results_root(arm) / self.dataset_name / f"{trainer}__{self.plans(arm)}__{self.configuration}"

    def fold_dir(self, arm: str, trainer: str, fold: int) -> Path:
        return self.model_dir(arm, trainer) / f"fold_{fold}"

    def predictions(self, arm: str, fold: int) -> Path:
        return self.output / "predictions" / arm / f"fold_{fold}"

    @property
    def logs(self) -> Path:
        return self.output / "logs"

    @property
    def report(self) -> Path:
        return self.output / "report"


def experiment_paths(experiment: Experiment, dataset_name: str) -> Paths:
    return Paths(experiment.output, dataset_name, experiment.configuration,
                 tuple((arm.name, arm_plans(experiment, arm)) for arm in experiment.arms))


def test_folders(experiment: Experiment, raw_dataset_dir: Path | None) -> tuple[Path, Path] | None:
    """(images, labels) of the experiment's test set, or None.

    Raises:
        ExperimentError: for ``imagesTs`` when the raw dataset has no imagesTs/labelsTs.
    """
    spec = experiment.test_set
    if spec is None:
        return None
    if isinstance(spec, TestSetSpec):
        return spec.images, spec.labels
    if raw_dataset_dir is None:
        raise ExperimentError(f"{experiment.source}: test_set: imagesTs needs nnUNet_raw to be set")
    images, labels = raw_dataset_dir / "imagesTs", raw_dataset_dir / "labelsTs"
    for folder in (images, labels):
        if not folder.is_dir():
            raise ExperimentError(f"{experiment.source}: test_set: imagesTs, but {folder} does not exist")
    return images, labels


def image_cases(images: Path, file_ending: str) -> list[str]:
    """Case ids of nnU-Net-style images (``CASE_0000<ending>``) in a folder.

    Raises:
        CaseIdError: when one is not a plain file name (predictions are written as ``<case><ending>``).
    """
    pattern = re.compile(r"(.+)_\d{4}" + re.escape(file_ending))
    cases = sorted({m.group(1) for p in images.iterdir() if (m := pattern.fullmatch(p.name))})
    return check_case_ids(cases, images)


def setting_folds(experiment: Experiment, manifest: list[FoldEntry]) -> list[SettingFolds]:
    """The report's settings with their folds, from the experiment and the split manifest.

    Raises:
        ExperimentError: when the manifest lacks a fold the experiment asks for (splits not made).
    """
    settings: list[SettingFolds] = []
    if experiment.full_folds:
        settings.append(SettingFolds("full", None, {f: f for f in experiment.full_folds}))
    for kind, subset in (("few_shot", experiment.few_shot), ("data_limited", experiment.data_limited)):
        if subset is None:
            continue
        for size in subset.sizes:
            folds = {}
            for seed in subset.seeds:
                entry = next((e for e in manifest if (e.kind, e.size, e.seed) == (kind, size, seed)), None)
                if entry is None:
                    raise ExperimentError(f"no {kind} fold of {size} cases for seed {seed} in the split manifest")
                folds[entry.fold] = seed
            settings.append(SettingFolds(kind, size, folds))
    return settings


def build_grid(
    experiment: Experiment, paths: Paths, settings: list[SettingFolds], test: tuple[Path, Path] | None,
    file_ending: str,
) -> list[Job]:
    """Every job of the experiment, in dependency order (exports, then per setting, fold and arm: train, predict)."""
    jobs: list[Job] = []
    dataset = experiment.dataset
    weights: dict[str, Path] = {}
    exports: dict[str, str] = {}
    for arm in experiment.arms:
        if arm.weights is not None:
            weights[arm.name] = arm.weights
        elif arm.pretraining_run is not None:
            target = paths.weights(arm.name)
            weights[arm.name] = target
            job_id = f"export-{arm.name}"
            exports[arm.name] = job_id
            jobs.append(Job(
                job_id, "export", arm.name, (),
                ("nnunet-ssl", "export", str(arm.pretraining_run), "-d", dataset, "-c", experiment.configuration,
                 "-p", paths.plans(arm.name), "--from", arm.export_from, "--out", str(target)),
                (target,), paths.logs / f"{job_id}.log",
            ))
    cases = image_cases(test[0], file_ending) if test is not None else []
    for setting in settings:
        epochs = experiment.epochs.for_kind(setting.kind)
        for fold in setting.folds:
            for arm in experiment.arms:
                jobs += _fold_jobs(experiment, paths, arm, setting, fold, epochs, weights.get(arm.name),
                                   exports.get(arm.name), test, cases, file_ending)
    return jobs


def _fold_jobs(
    experiment: Experiment, paths: Paths, arm: Arm, setting: SettingFolds, fold: int, epochs: int | None,
    weights: Path | None, export_job: str | None, test: tuple[Path, Path] | None, cases: list[str], file_ending: str,
) -> list[Job]:
    trainer = trainer_name(experiment, arm)
    env = [("nnUNet_results", str(paths.results_root(arm.name))), (SEED_ENV, str(experiment.seed))]
    if epochs is not None:
        env.append((EPOCHS_ENV, str(epochs)))
    env += list(experiment.env)
    fold_dir = paths.fold_dir(arm.name, trainer, fold)
    train = ("nnUNetv2_train", experiment.dataset, experiment.configuration, str(fold), "-tr", trainer,
             "-p", paths.plans(arm.name), "-device", experiment.device)
    fresh = train + (("-pretrained_weights", str(weights)) if weights is not None else ())
    train_id = f"train-{arm.name}-{setting.label}-fold{fold}"
    jobs = [Job(
        train_id, "train", arm.name, tuple(env), fresh,
        (fold_dir / "checkpoint_final.pth", fold_dir / "validation" / "summary.json"), paths.logs / f"{train_id}.log",
        resume=train + ("--c",), validate=train + ("--val",), finished=fold_dir / "checkpoint_final.pth",
        partial=fold_dir / "checkpoint_latest.pth", depends=(export_job,) if export_job else (),
        setting=setting.label, fold=fold,
    )]
    if test is not None:
        out = paths.predictions(arm.name, fold)
        predict_id = f"predict-{arm.name}-{setting.label}-fold{fold}"
        device = experiment.device
        jobs.append(Job(
            predict_id, "predict", arm.name, tuple(env),
            ("nnUNetv2_predict", "-i", str(test[0]), "-o", str(out), "-d", experiment.dataset, "-c",
             experiment.configuration, "-p", paths.plans(arm.name), "-tr", trainer, "-f", str(fold), "-device", device,
             "-npp", "1", "-nps", "1", "--continue_prediction", "--disable_progress_bar"),
            tuple(out / f"{case}{file_ending}" for case in cases), paths.logs / f"{predict_id}.log",
            depends=(train_id,), setting=setting.label, fold=fold,
            references=tuple(test[0] / f"{case}_0000{file_ending}" for case in cases),
        ))
    return jobs

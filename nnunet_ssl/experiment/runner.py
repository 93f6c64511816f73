"""``nnunet-ssl experiment run``: make the splits, then run the grid's jobs through nnU-Net's own commands.

Each job runs as a subprocess (``nnunet-ssl export``, ``nnUNetv2_train``, ``nnUNetv2_predict``) with
its output appended to ``logs/<job id>.log``. What a job does is decided from its files when it
starts (:func:`nnunet_ssl.experiment.grid.decide`): finished jobs are skipped, interrupted trainings
continue with ``--c``. A failed job is recorded (``jobs.json``) and the others go on; jobs that
depend on it are not started. A summary is logged at the end.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from nnunet_ssl.experiment.grid import (
    FRESH,
    SKIP,
    Job,
    Paths,
    SettingFolds,
    build_grid,
    decide,
    experiment_paths,
    setting_folds,
    test_folders,
)
from nnunet_ssl.experiment.spec import Experiment, ExperimentError
from nnunet_ssl.io import atomic_json_dump
from nnunet_ssl.nnunet_ext import ext_trainer_path

logger = logging.getLogger(__name__)

DONE, SKIPPED, FAILED, BLOCKED = "done", "skipped", "failed", "blocked"
STATUS_FILE = "jobs.json"


@dataclass(frozen=True)
class Prepared:
    """An experiment ready to run: its folders, settings with fold indices, test set and jobs."""

    experiment: Experiment
    paths: Paths
    settings: list[SettingFolds]
    test: tuple[Path, Path] | None
    file_ending: str
    jobs: list[Job]


def prepare(experiment: Experiment) -> Prepared:
    """Make the few-shot / data-limited folds (``nnunet-ssl split``'s code) and build the grid.

    Raises:
        ExperimentError / FileNotFoundError: when the dataset is not preprocessed with the plans.
    """
    import json

    from nnunet_ssl.case_ids import check_file_ending
    from nnunet_ssl.nnunet_paths import nnunet_folder, preprocessed_dataset_folder
    from nnunet_ssl.splits import (
        MANIFEST_FILE,
        SplitRequest,
        apply_split_request,
        ensure_default_splits,
        read_checked_manifest,
    )

    folder = preprocessed_dataset_folder(experiment.dataset)
    plans_file = folder / f"{experiment.plans}.json"
    if not plans_file.is_file():
        raise ExperimentError(
            f"{experiment.source}: plans {experiment.plans!r}: {plans_file} does not exist; plan and preprocess "
            "first (nnunet-ssl plan / nnUNetv2_plan_and_preprocess)"
        )
    for kind, subset in (("few_shot", experiment.few_shot), ("data_limited", experiment.data_limited)):
        if subset is not None:
            result = apply_split_request(folder, SplitRequest(kind, subset.sizes, subset.seeds, subset.val_cases,
                                                              subset.val_from_fold))
            if result.new_folds:
                logger.info("split: %d new %s fold(s) in %s", len(result.new_folds), kind, folder / MANIFEST_FILE)
    if experiment.full_folds and ensure_default_splits(folder):
        logger.info("no splits_final.json yet: wrote nnU-Net's default 5 folds (seed 12345)")
    settings = setting_folds(experiment, read_checked_manifest(folder))
    dataset_json = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    check_file_ending(dataset_json.get("file_ending"), folder / "dataset.json")  # names the predictions
    raw = os.environ.get("nnUNet_raw")
    raw_dir = nnunet_folder("nnUNet_raw") / folder.name if raw else None
    test = test_folders(experiment, raw_dir)
    paths = experiment_paths(experiment, folder.name)
    jobs = build_grid(experiment, paths, settings, test, dataset_json["file_ending"])
    return Prepared(experiment, paths, settings, test, dataset_json["file_ending"], jobs)


def executable(name: str) -> str:
    """The command beside this Python (the environment's bin folder), else the bare name for PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.is_file() else name


def ext_trainer_variable(environ: dict[str, str] | os._Environ) -> str:
    """``nnUNet_extTrainer`` with the plugin's trainer folder first, keeping folders already set."""
    current = [p for p in environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    folder = str(ext_trainer_path())
    return os.pathsep.join([folder, *(p for p in current if p != folder)])


def run_job(job: Job, on_line: Callable[[str], None] | None = None) -> tuple[str, str]:
    """Run one job now; returns (status, detail).

    Args:
        job: The job; its output is appended to ``job.log``.
        on_line: Called with each line of the command's output as it comes (e.g. to show nnU-Net's
            epoch progress), without the line ending.
    """
    action, argv = decide(job)
    if action == SKIP or argv is None:
        return SKIPPED, "already done"
    job.log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "nnUNet_extTrainer": ext_trainer_variable(os.environ), **dict(job.env)}
    command = [executable(argv[0]), *argv[1:]]
    started = time.monotonic()
    with open(job.log, "a", encoding="utf-8") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {action}: {' '.join(argv)}\n")
        log.flush()
        if on_line is None:
            returncode = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        else:
            process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       encoding="utf-8", errors="replace", bufsize=1)
            for line in process.stdout or ():
                log.write(line)
                log.flush()
                on_line(line.rstrip("\n"))
            returncode = process.wait()
    seconds = time.monotonic() - started
    if returncode != 0:
        return FAILED, f"exit {returncode} after {seconds:.0f} s ({action}); see {job.log}"
    missing = [str(p) for p in job.done if not p.is_file()]
    if missing:
        return FAILED, f"exited 0 but {missing[0]} is missing; see {job.log}"
    return DONE, f"{action} in {seconds:.0f} s"


def run_jobs(jobs: list[Job], workers: int, status_file: Path, progress: bool = True) -> dict[str, tuple[str, str]]:
    """Run every job, at most ``workers`` at a time, each once its dependencies are done or skipped.

    Returns job id -> (status, detail); also written to ``status_file`` after every job.
    """
    if workers < 1:
        raise ValueError(f"--jobs must be >= 1, got {workers}")
    status: dict[str, tuple[str, str]] = {}
    pending = list(jobs)
    running: dict[Future, Job] = {}
    bar = tqdm(total=len(jobs), desc="experiment", unit="job", disable=None if progress else True)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while pending or running:
            for job in list(pending):
                states = [status.get(d, ("", ""))[0] for d in job.depends]
                if any(s in (FAILED, BLOCKED) for s in states):
                    pending.remove(job)
                    status[job.id] = (BLOCKED, "a job it depends on failed: " + ", ".join(job.depends))
                    bar.update(1)
                elif all(s in (DONE, SKIPPED) for s in states) and len(running) < workers:
                    pending.remove(job)
                    action, _ = decide(job)
                    if action != SKIP:
                        logger.info("%s: %s", job.id, "starting" if action == FRESH else action)
                    running[pool.submit(run_job, job)] = job
            if not running:
                for job in pending:  # only possible with a dependency outside the grid
                    status[job.id] = (BLOCKED, "depends on a job that is not in the grid: " + ", ".join(job.depends))
                pending.clear()
                continue
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                try:
                    status[job.id] = future.result()
                except Exception as error:  # a job that cannot even start is a failed job, not a crash
                    status[job.id] = (FAILED, f"{type(error).__name__}: {error}")
                if status[job.id][0] == FAILED:
                    logger.error("%s failed: %s", job.id, status[job.id][1])
                elif status[job.id][0] == DONE:
                    logger.info("%s: %s", job.id, status[job.id][1])
                bar.update(1)
                atomic_json_dump({k: {"status": s, "detail": d} for k, (s, d) in status.items()}, status_file)
    bar.close()
    atomic_json_dump({k: {"status": s, "detail": d} for k, (s, d) in status.items()}, status_file)
    return status


def summary_lines(jobs: list[Job], status: dict[str, tuple[str, str]]) -> list[str]:
    counts = {s: sum(1 for v in status.values() if v[0] == s) for s in (DONE, SKIPPED, FAILED, BLOCKED)}
    lines = [f"{len(jobs)} job(s): {counts[DONE]} run, {counts[SKIPPED]} already done, {counts[FAILED]} failed, "
             f"{counts[BLOCKED]} not started (a dependency failed)"]
    lines += [f"  {s.upper()} {job_id}: {d}" for job_id, (s, d) in status.items() if s in (FAILED, BLOCKED)]
    return lines


def run_experiment(experiment: Experiment, workers: int = 1, progress: bool = True) -> dict[str, tuple[str, str]]:
    """Prepare and run the whole grid; returns the status of every job."""
    prepared = prepare(experiment)
    prepared.paths.output.mkdir(parents=True, exist_ok=True)
    logger.info("%d job(s) in %s (logs in %s)", len(prepared.jobs), prepared.paths.output, prepared.paths.logs)
    status = run_jobs(prepared.jobs, workers, prepared.paths.output / STATUS_FILE, progress)
    for line in summary_lines(prepared.jobs, status):
        logger.info("%s", line)
    return status

"""``nnunet-ssl experiment run``: make the splits, then run the grid's jobs through nnU-Net's own commands.

Each job runs as a subprocess (``nnunet-ssl export``, ``nnUNetv2_train``, ``nnUNetv2_predict``) with
its output appended to ``logs/<job id>.log``. What a job does is decided from its files when it
starts (:func:`nnunet_ssl.experiment.grid.decide`): finished jobs are skipped, interrupted trainings
continue with ``--c``. A file that exists is not yet a file that is done: a prediction counts only
when it reads back whole with its image's shape (:func:`discard_unreadable_outputs`; one cut short
is removed and predicted again). A failed job is recorded (``jobs.json``) and the others go on;
jobs that depend on it are not started. A summary is logged at the end.

``--job ID`` runs part of the grid (what each task of the emitted SLURM array runs); such runs
merge their records into ``jobs.json`` under a lock, so array tasks running at once keep each
other's. Ctrl-C (SIGINT) or SIGTERM (SLURM's time limit, ``scancel``) stops the running commands,
records their jobs as ``interrupted`` and raises :class:`RunInterrupted`; the next run continues them.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from tqdm import tqdm

from nnunet_ssl.analysis.prediction_files import read_problem
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
from nnunet_ssl.experiment.spec import Experiment, ExperimentError, arm_plans, experiment_plans
from nnunet_ssl.io import atomic_json_dump
from nnunet_ssl.nnunet_ext import ext_trainer_path

logger = logging.getLogger(__name__)

DONE, SKIPPED, FAILED, BLOCKED, INTERRUPTED = "done", "skipped", "failed", "blocked", "interrupted"
STATUS_FILE = "jobs.json"
#: Seconds a stopped command gets to end after the runner forwards SIGINT to it, before it is killed.
STOP_GRACE_S = 20.0
#: Seconds the runner first waits for commands that got the signal with it (Ctrl-C reaches the whole
#: foreground process group) before it forwards SIGINT itself.
SELF_STOP_S = 2.0
#: Exit codes of a run ended by a signal (128 + the signal's number), as shells report them.
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}
#: Return codes of a command ended by SIGINT or SIGTERM: -N (Popen's), 128 + N (a shell's).
INTERRUPT_CODES = {code for number in (signal.SIGINT, signal.SIGTERM) for code in (-number, 128 + number)}


class Terminated(KeyboardInterrupt):
    """SIGTERM turned into an interrupt while a run is in progress (SLURM's time limit, ``scancel``, ``kill``)."""


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C or SIGTERM after recording its stopped jobs as interrupted.

    Attributes:
        jobs: Ids of the jobs that were running (recorded as ``interrupted`` in ``status_file``).
        status_file: The ``jobs.json`` they are recorded in.
        signal_name: ``SIGINT`` or ``SIGTERM``.
    """

    def __init__(self, jobs: list[str], status_file: Path, signal_name: str) -> None:
        super().__init__(signal_name)
        self.jobs, self.status_file, self.signal_name = jobs, status_file, signal_name

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signal_name, 130)

    def line(self, experiment_file: Path) -> str:
        """The one line a command prints for it."""
        how = "Ctrl-C" if self.signal_name == "SIGINT" else self.signal_name
        stopped = (f"{len(self.jobs)} running job(s) stopped and recorded as interrupted in {self.status_file} "
                   f"({', '.join(self.jobs[:4])}{', ...' if len(self.jobs) > 4 else ''})") if self.jobs else (
                   "no job was running")
        return f"interrupted ({how}): {stopped}; `nnunet-ssl experiment run {experiment_file}` continues"


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
    from nnunet_ssl.case_ids import check_file_ending
    from nnunet_ssl.nnunet_paths import nnunet_folder, preprocessed_dataset_folder
    from nnunet_ssl.splits import (
        MANIFEST_FILE,
        SplitError,
        SplitRequest,
        apply_split_request,
        ensure_default_splits,
        read_checked_manifest,
    )

    folder = preprocessed_dataset_folder(experiment.dataset)
    for plans in experiment_plans(experiment):  # each arm may train with its own plans
        plans_file = folder / f"{plans}.json"
        if not plans_file.is_file():
            users = [arm.name for arm in experiment.arms if arm_plans(experiment, arm) == plans]
            raise ExperimentError(
                f"{experiment.source}: plans {plans!r} (arms {', '.join(users)}): {plans_file} does not exist; plan "
                "and preprocess first (nnunet-ssl plan [--family resenc] / nnUNetv2_plan_and_preprocess)"
            )
    for kind, subset in (("few_shot", experiment.few_shot), ("data_limited", experiment.data_limited)):
        if subset is not None:
            try:
                result = apply_split_request(folder, SplitRequest(kind, subset.sizes, subset.seeds, subset.val_cases,
                                                                  subset.val_from_fold))
            except SplitError as error:  # name the file and the field, as every experiment error does
                raise ExperimentError(f"{experiment.source}: settings.{kind}: {error}") from error
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


def unreadable_outputs(job: Job) -> dict[Path, str]:
    """The job's existing ``done`` files that do not read back whole with their reference's shape, and why.

    Only files with a reference (:attr:`Job.references`: predictions and their test images) are read.
    """
    return {
        path: problem for path, reference in zip(job.done, job.references, strict=False)
        if path.is_file() and (problem := read_problem(path, reference)) is not None
    }


def discard_unreadable_outputs(job: Job) -> list[Path]:
    """Remove the job's outputs that do not read back whole (each logged with why), so the job redoes them.

    ``nnUNetv2_predict --continue_prediction`` skips every case whose file exists, so a file cut short
    by an interrupted or killed prediction must go before the job runs again.
    """
    bad = unreadable_outputs(job)
    for path, problem in bad.items():
        logger.warning("%s: %s %s: removed, the job predicts it again", job.id, path, problem)
        path.unlink(missing_ok=True)
    return list(bad)


class Commands:
    """The commands a run has started and not yet seen end, so that an interrupt can stop them all.

    Thread-safe: worker threads start commands, the main thread stops them. Once stopped, no new
    command starts (:meth:`start` returns None).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, subprocess.Popen[Any]] = {}
        self._stopped: set[str] = set()
        self._closed = False

    def start(self, job_id: str, command: list[str], **popen: Any) -> subprocess.Popen[Any] | None:
        """``subprocess.Popen(command, **popen)``, or None once the run is being stopped."""
        with self._lock:
            if self._closed:
                self._stopped.add(job_id)
                return None
            process = subprocess.Popen(command, **popen)
            self._running[job_id] = process
            return process

    def ended(self, job_id: str) -> None:
        with self._lock:
            self._running.pop(job_id, None)

    def stopped(self, job_id: str) -> bool:
        """Whether :meth:`stop` stopped (or kept from starting) this job's command."""
        with self._lock:
            return job_id in self._stopped

    def stop(self, grace: float = STOP_GRACE_S, self_stop: float = SELF_STOP_S) -> None:
        """Stop every running command: wait ``self_stop`` s for those that got the signal too, then
        forward SIGINT (nnU-Net ends on it), then kill what is still running after ``grace`` s."""
        with self._lock:
            self._closed = True
            running = dict(self._running)
            self._stopped.update(running)
        _wait_all(running.values(), self_stop)
        for process in running.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGINT)
        _wait_all(running.values(), grace)
        for job_id, process in running.items():
            if process.poll() is None:
                logger.warning("%s: still running %.0f s after SIGINT: killed", job_id, grace)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait()


def _wait_all(processes: Any, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(deadline - time.monotonic(), 0.0))


def run_job(
    job: Job, on_line: Callable[[str], None] | None = None, commands: Commands | None = None,
) -> tuple[str, str]:
    """Run one job now; returns (status, detail).

    Outputs that do not read back whole are removed first (:func:`discard_unreadable_outputs`), and
    a job whose command exits 0 is done only when its outputs exist and read back whole.

    Args:
        job: The job; its output is appended to ``job.log``.
        on_line: Called with each line of the command's output as it comes (e.g. to show nnU-Net's
            epoch progress), without the line ending.
        commands: Where the command is registered while it runs, so that :func:`run_jobs` can stop
            it on an interrupt (the job is then ``interrupted``). Without it, an interrupt in this
            thread stops the command here and propagates.
    """
    discard_unreadable_outputs(job)
    action, argv = decide(job)
    if action == SKIP or argv is None:
        return SKIPPED, "already done"
    job.log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "nnUNet_extTrainer": ext_trainer_variable(os.environ), **dict(job.env)}
    command = [executable(argv[0]), *argv[1:]]
    commands = commands or Commands()
    started = time.monotonic()
    with open(job.log, "a", encoding="utf-8") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {action}: {' '.join(argv)}\n")
        log.flush()
        popen: dict[str, Any] = {"env": env, "stderr": subprocess.STDOUT}
        popen.update({"stdout": log} if on_line is None else {
            "stdout": subprocess.PIPE, "text": True, "encoding": "utf-8", "errors": "replace", "bufsize": 1})
        try:
            process = commands.start(job.id, command, **popen)
            returncode = None if process is None else _follow(process, log, on_line)
        except KeyboardInterrupt:  # in the main thread: no run_jobs above to stop the command
            with _ignoring_signals():
                commands.stop()
                _log_interrupt(log, time.monotonic() - started)
            raise
        finally:
            commands.ended(job.id)
        seconds = time.monotonic() - started
        # stopped by the runner, or ended by the signal that reached it too (Ctrl-C to the process group;
        # SLURM's SIGTERM to every process of the job): -N from Python and kill, 128 + N from a shell
        if commands.stopped(job.id) or returncode in INTERRUPT_CODES:
            _log_interrupt(log, seconds)
            return INTERRUPTED, _interrupted_detail(job, f"after {seconds:.0f} s ({action})")
    if returncode != 0:
        return FAILED, f"exit {returncode} after {seconds:.0f} s ({action}); see {job.log}"
    missing = [str(p) for p in job.done if not p.is_file()]
    if missing:
        return FAILED, f"exited 0 but {missing[0]} is missing; see {job.log}"
    bad = unreadable_outputs(job)
    if bad:
        path, problem = next(iter(bad.items()))
        return FAILED, f"exited 0 but {path} {problem} ({len(bad)} such file(s)); see {job.log}"
    return DONE, f"{action} in {seconds:.0f} s"


def _follow(process: subprocess.Popen[Any], log: TextIO, on_line: Callable[[str], None] | None) -> int:
    """Wait for the command, passing each line of its output to ``on_line`` (and the log) when given."""
    if on_line is not None:
        for line in process.stdout or ():
            log.write(line)
            log.flush()
            on_line(line.rstrip("\n"))
    return process.wait()


def _log_interrupt(log: TextIO, seconds: float) -> None:
    with contextlib.suppress(OSError, ValueError):
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} interrupted after {seconds:.0f} s\n")


def _interrupted_detail(job: Job, when: str = "") -> str:
    then = {"train": "continues from checkpoint_latest.pth" if job.partial is not None and job.partial.is_file()
            else "starts it again (no checkpoint_latest.pth yet)",
            "predict": "predicts the cases still missing"}.get(job.kind, "runs it again")
    return f"interrupted{' ' + when if when else ''}; the next run {then}; see {job.log}"


def select_jobs(jobs: list[Job], ids: Sequence[str], source: Path) -> list[Job]:
    """The jobs named by ``ids`` and every job they depend on (skipped when done), in the grid's order.

    Raises:
        ExperimentError: naming an id that is not in the grid (e.g. a script emitted before the
            experiment file changed).
    """
    by_id = {job.id: job for job in jobs}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise ExperimentError(
            f"{source}: no job {', '.join(map(repr, unknown))} in the grid ({len(jobs)} jobs; `nnunet-ssl experiment "
            "emit` lists them). If the experiment file changed after the script was emitted, emit it again"
        )
    wanted: set[str] = set()
    todo = list(ids)
    while todo:
        job_id = todo.pop()
        if job_id not in wanted:
            wanted.add(job_id)
            todo += [d for d in by_id[job_id].depends if d in by_id]
    return [job for job in jobs if job.id in wanted]


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created) while the block runs; none where fcntl does not exist."""
    try:
        import fcntl
    except ImportError:  # Windows: array tasks are a SLURM (Linux) matter
        yield
        return
    with open(path, "a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_status(status: dict[str, tuple[str, str]], status_file: Path, merge: bool = False) -> None:
    """Write ``jobs.json``: the jobs' status and detail; with ``merge``, over the records already there.

    Merging reads and writes under a lock (``jobs.json.lock``), so array tasks finishing at once keep
    each other's records; the file itself is replaced atomically, so a reader never sees half of it.
    """
    records = {k: {"status": s, "detail": d} for k, (s, d) in status.items()}
    if not merge:
        atomic_json_dump(records, status_file)
        return
    status_file.parent.mkdir(parents=True, exist_ok=True)
    with _lock(status_file.with_name(status_file.name + ".lock")):
        old: dict[str, Any] = {}
        if status_file.is_file():
            try:
                old = json.loads(status_file.read_text(encoding="utf-8"))
            except ValueError:
                logger.warning("%s is not JSON: written anew", status_file)
        atomic_json_dump({**old, **records}, status_file)


@contextlib.contextmanager
def _ignoring_signals() -> Iterator[None]:
    """SIGINT and SIGTERM ignored while the block runs (a second Ctrl-C must not break off the clean-up
    that records the first); main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, signal.SIG_IGN) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            if handler is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(number, handler)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) while the block runs, in the main thread.

    SLURM ends a job at its time limit (and on ``scancel``) with SIGTERM, then SIGKILL after a
    while; turning it into an interrupt lets the run record the stopped jobs before it goes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_jobs(
    jobs: list[Job], workers: int, status_file: Path, progress: bool = True, merge: bool = False,
) -> dict[str, tuple[str, str]]:
    """Run every job, at most ``workers`` at a time, each once its dependencies are done or skipped.

    Returns job id -> (status, detail); also written to ``status_file`` after every job (merged into
    the records there with ``merge``, as a run of part of the grid does).

    Raises:
        RunInterrupted: on Ctrl-C or SIGTERM (:func:`sigterm_as_interrupt`), after stopping the running
            commands (:meth:`Commands.stop`) and recording their jobs as interrupted.
    """
    if workers < 1:
        raise ValueError(f"--jobs must be >= 1, got {workers}")
    status: dict[str, tuple[str, str]] = {}
    pending = list(jobs)
    running: dict[Future, Job] = {}
    commands = Commands()
    bar = tqdm(total=len(jobs), desc="experiment", unit="job", disable=None if progress else True)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            _schedule(pending, running, status, pool, commands, workers, bar, status_file, merge)
        except KeyboardInterrupt as interrupt:
            with _ignoring_signals():
                commands.stop()
                for future, job in running.items():  # every job running when the signal came
                    try:
                        status[job.id] = future.result()
                    except Exception as error:
                        status[job.id] = (FAILED, f"{type(error).__name__}: {error}")
                    if status[job.id][0] not in (DONE, SKIPPED, INTERRUPTED):  # ended by the signal, whatever it said
                        status[job.id] = (INTERRUPTED, _interrupted_detail(job))
                write_status(status, status_file, merge)
                bar.close()
            stopped = [job.id for job in running.values() if status[job.id][0] == INTERRUPTED]
            raise RunInterrupted(stopped, status_file,
                                 "SIGTERM" if isinstance(interrupt, Terminated) else "SIGINT") from None
    bar.close()
    write_status(status, status_file, merge)
    return status


def _schedule(
    pending: list[Job], running: dict[Future, Job], status: dict[str, tuple[str, str]], pool: ThreadPoolExecutor,
    commands: Commands, workers: int, bar: Any, status_file: Path, merge: bool,
) -> None:
    """:func:`run_jobs`' loop: start what can start, record what ended, until nothing is left."""
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
                running[pool.submit(run_job, job, None, commands)] = job
        if not running:
            for job in pending:  # only possible with a dependency outside the grid
                status[job.id] = (BLOCKED, "depends on a job that is not in the grid: " + ", ".join(job.depends))
            pending.clear()
            continue
        finished, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in finished:
            job = running[future]
            try:
                status[job.id] = future.result()
            except Exception as error:  # a job that cannot even start is a failed job, not a crash
                status[job.id] = (FAILED, f"{type(error).__name__}: {error}")
            if status[job.id][0] == FAILED:
                logger.error("%s failed: %s", job.id, status[job.id][1])
            elif status[job.id][0] == DONE:
                logger.info("%s: %s", job.id, status[job.id][1])
            del running[future]
            bar.update(1)
            write_status(status, status_file, merge)


def summary_lines(jobs: list[Job], status: dict[str, tuple[str, str]]) -> list[str]:
    counts = {s: sum(1 for v in status.values() if v[0] == s) for s in (DONE, SKIPPED, FAILED, BLOCKED)}
    lines = [f"{len(jobs)} job(s): {counts[DONE]} run, {counts[SKIPPED]} already done, {counts[FAILED]} failed, "
             f"{counts[BLOCKED]} not started (a dependency failed)"]
    lines += [f"  {s.upper()} {job_id}: {d}" for job_id, (s, d) in status.items() if s in (FAILED, BLOCKED)]
    return lines


def run_experiment(
    experiment: Experiment, workers: int = 1, progress: bool = True, only: Sequence[str] = (),
) -> dict[str, tuple[str, str]]:
    """Prepare and run the grid (or, with ``only``, those jobs and what they depend on); returns each job's status.

    Raises:
        RunInterrupted: on Ctrl-C or SIGTERM, once the running jobs are stopped and recorded.
    """
    prepared = prepare(experiment)
    prepared.paths.output.mkdir(parents=True, exist_ok=True)
    jobs = select_jobs(prepared.jobs, only, experiment.source) if only else prepared.jobs
    logger.info("%d job(s)%s in %s (logs in %s)", len(jobs), f" of {len(prepared.jobs)}" if only else "",
                prepared.paths.output, prepared.paths.logs)
    with sigterm_as_interrupt():
        status = run_jobs(jobs, workers, prepared.paths.output / STATUS_FILE, progress, merge=bool(only))
    for line in summary_lines(jobs, status):
        logger.info("%s", line)
    return status

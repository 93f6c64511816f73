"""The grid as shell: a plain list of commands (one job a line) or a SLURM job-array script.

``commands`` renders the jobs of :func:`nnunet_ssl.experiment.grid.build_grid` as nnU-Net's own
commands, one a line, and spells :func:`nnunet_ssl.experiment.grid.decide` as ``if [ -f ... ]``
tests, so a shell loop over the lines skips, validates, continues or starts each job exactly as
``nnunet-ssl experiment run`` does, and writes the same files (results, predictions,
``logs/<job id>.log``). A line starts its command only when the jobs it depends on are done (their
files exist): a prediction never runs after a failed training, a training never without its export.

``slurm`` is a job-array script whose tasks call back into the runner
(``nnunet-ssl experiment run FILE --job ID ...``), one task a training with the export it needs and
its predictions, so a cluster run decides, checks (a prediction cut short is redone), records
(``jobs.json``) and stops (SIGTERM at the time limit: the jobs are recorded as interrupted) exactly
as a local run. Its resources and setup lines come from the experiment file's ``slurm:`` section
(:mod:`nnunet_ssl.experiment.cluster`).
"""
from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from nnunet_ssl.experiment.cluster import SlurmSettings
from nnunet_ssl.experiment.grid import Job
from nnunet_ssl.experiment.spec import Experiment

FORMATS = ("commands", "slurm")


def _command(job: Job, argv: Sequence[str]) -> str:
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in job.env)
    return (env + " " if env else "") + shlex.join(argv)


def _all_exist(paths: Sequence[Path]) -> str:
    return " && ".join(f"[ -f {shlex.quote(str(p))} ]" for p in paths)


def job_line(job: Job, dependencies: Sequence[Job] = ()) -> str:
    """One job as one POSIX shell line, output appended to its log.

    Args:
        job: The job.
        dependencies: The jobs of ``job.depends``: the line starts nothing (and ends with status 1)
            until their ``done`` files all exist.
    """
    branches = [f"if {_all_exist(job.done)}; then echo {shlex.quote(job.id + ': already done')}"]
    needed = [p for dependency in dependencies for p in dependency.done]
    if needed:
        names = ", ".join(d.id for d in dependencies)
        branches.append(f"elif ! {{ {_all_exist(needed)}; }}; then "
                        f"echo {shlex.quote(f'{job.id}: not started, {names} is not done')}; false")
    if job.validate is not None and job.finished is not None:
        branches.append(f"elif [ -f {shlex.quote(str(job.finished))} ]; then {_command(job, job.validate)}")
    if job.resume is not None and job.partial is not None:
        branches.append(f"elif [ -f {shlex.quote(str(job.partial))} ]; then {_command(job, job.resume)}")
    branches.append(f"else {_command(job, job.command)}; fi")
    return "{ " + "; ".join(branches) + "; } >> " + shlex.quote(str(job.log)) + " 2>&1"


def _nnunet_folders() -> list[str]:
    """``export`` lines for nnU-Net's raw and preprocessed folders as set now (the runner reads both)."""
    lines = []
    for variable in ("nnUNet_raw", "nnUNet_preprocessed"):
        value = os.environ.get(variable)
        if value:
            lines.append(f"export {variable}={shlex.quote(str(Path(value).resolve()))}")
    return lines


NOT_ON_PATH = ("nnunet-ssl is not on PATH{where}: activate the environment it is installed in{how}")


def preamble(experiment_file: Path, output: Path) -> list[str]:
    """The commands format's first lines: nnU-Net's folders as now, the trainer folder, the log folder.

    A shell without ``nnunet-ssl`` on PATH stops here with a message, instead of running every line
    with an empty ``nnUNet_extTrainer``.
    """
    missing = NOT_ON_PATH.format(where="", how=" before running these lines")
    return [
        *_nnunet_folders(),
        f'nnunet_ssl_trainers="$(nnunet-ssl ext-path)" || {{ echo {shlex.quote(missing)} >&2; exit 127; }}',
        'export nnUNet_extTrainer="$nnunet_ssl_trainers${nnUNet_extTrainer:+:$nnUNet_extTrainer}"',
        f"mkdir -p {shlex.quote(str(output / 'logs'))}",
    ]


def commands_script(jobs: list[Job], experiment_file: Path, output: Path) -> str:
    """Every job, one a line, in dependency order (run them in order, e.g. ``bash FILE``)."""
    by_id = {job.id: job for job in jobs}
    header = [
        f"# nnunet-ssl experiment {experiment_file}: {len(jobs)} job(s), one a line, in dependency order.",
        "# Each line skips a finished job, starts nothing while a job it depends on is not done (exit status 1),",
        "# validates (--val) or continues (--c) an unfinished one, and appends to its log in logs/. A file that",
        "# exists counts as done here; `nnunet-ssl experiment run` also redoes a prediction that was cut short.",
        "# Folds are those nnunet-ssl split made in nnUNet_preprocessed (splits_final.json).",
    ]
    lines = [job_line(job, [by_id[d] for d in job.depends if d in by_id]) for job in jobs]
    return "\n".join(header + preamble(experiment_file, output) + lines) + "\n"


def array_tasks(jobs: list[Job]) -> list[list[Job]]:
    """Jobs grouped into array tasks: each training with its dependencies before and its predictions after.

    An export shared by several trainings runs in each of their tasks when missing (it writes its
    file atomically, and the ``done`` test skips it once present).
    """
    by_id = {job.id: job for job in jobs}
    tasks: list[list[Job]] = []
    for job in jobs:
        if job.kind != "train":
            continue
        before = [by_id[d] for d in job.depends]
        after = [j for j in jobs if job.id in j.depends]
        tasks.append(before + [job] + after)
    orphans = [j for j in jobs if j.kind == "export" and not any(j in t for t in tasks)]
    tasks += [[j] for j in orphans]
    return tasks


def default_setup() -> tuple[str, ...]:
    """Setup lines when the file gives none: the folder of the running ``nnunet-ssl`` first on PATH.

    That is the environment the script was emitted from (a virtual environment or conda env on a
    shared file system); without an ``nnunet-ssl`` beside this Python, nothing.
    """
    folder = Path(sys.executable).parent
    if (folder / "nnunet-ssl").is_file():
        return (f"export PATH={shlex.quote(str(folder))}:\"$PATH\"  # the environment emit ran in "
                "(set slurm.setup in the experiment file to change it)",)
    return ()


def sbatch_lines(experiment: Experiment, tasks: int) -> list[str]:
    """The ``#SBATCH`` lines: the array, the log files in ``logs/`` and the ``slurm:`` section's resources."""
    slurm: SlurmSettings = experiment.slurm
    lines = [
        f"#SBATCH --job-name=nnunet-ssl-{experiment.source.stem}",
        f"#SBATCH --array=0-{max(tasks - 1, 0)}",
        f"#SBATCH --output={experiment.output / 'logs'}/slurm-%A_%a.out",
    ]
    for option, value in (("partition", slurm.partition), ("account", slurm.account), ("time", slurm.time),
                          ("gres", slurm.gres(experiment.device)), ("cpus-per-task", slurm.cpus),
                          ("mem", slurm.memory)):
        if value is not None:
            lines.append(f"#SBATCH --{option}={value}")
    return lines + [f"#SBATCH {option}" for option in slurm.options]


def slurm_script(jobs: list[Job], experiment: Experiment, setup: Sequence[str] | None = None) -> str:
    """A SLURM job-array script: one array task per training, run by ``nnunet-ssl experiment run --job``.

    Args:
        jobs: The grid.
        experiment: Its experiment (file, output folder, device, ``slurm:`` section).
        setup: Setup lines when the file's ``slurm.setup`` is not given (default: :func:`default_setup`).
    """
    tasks = array_tasks(jobs)
    slurm = experiment.slurm
    lines = slurm.setup if slurm.setup is not None else (default_setup() if setup is None else tuple(setup))
    missing = NOT_ON_PATH.format(where=" on this node", how=": give the lines that do so as slurm.setup in "
                                 f"{experiment.source}, then emit again")
    script = [
        "#!/bin/bash",
        f"# nnunet-ssl experiment {experiment.source}: {len(tasks)} array task(s) for {len(jobs)} job(s).",
        "# Each task runs one training with the export it needs and its predictions through the same runner as",
        "# `nnunet-ssl experiment run` (skip, continue, check, record in jobs.json). Submit with: sbatch THIS_FILE",
        "# Resources and setup come from the experiment file's slurm: section; emit again after changing it.",
        *sbatch_lines(experiment, len(tasks)),
        "set -eo pipefail",
        *lines,
        "set -u  # after the setup lines: module and conda scripts often read unset variables",
        *_nnunet_folders(),
        f"command -v nnunet-ssl > /dev/null || {{ echo {shlex.quote(missing)} >&2; exit 127; }}",
        'case "${SLURM_ARRAY_TASK_ID:?not set: submit this script with sbatch}" in',
    ]
    for index, task in enumerate(tasks):
        ids = " ".join(f"--job {shlex.quote(job.id)}" for job in task)
        script.append(f"  {index}) jobs=({ids}) ;;")
    script += [
        f'  *) echo "no array task $SLURM_ARRAY_TASK_ID in this script (0-{max(len(tasks) - 1, 0)})" >&2; exit 1 ;;',
        "esac",
        f'exec nnunet-ssl experiment run {shlex.quote(str(experiment.source))} --no-progress "${{jobs[@]}}"',
    ]
    return "\n".join(script) + "\n"


def render(jobs: list[Job], experiment: Experiment, fmt: str) -> str:
    """The grid in one of :data:`FORMATS`."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "commands":
        return commands_script(jobs, experiment.source, experiment.output)
    return slurm_script(jobs, experiment)

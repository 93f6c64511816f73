"""The grid as shell: a plain list of commands (one job a line) or a SLURM job-array script.

Both render the jobs of :func:`nnunet_ssl.experiment.grid.build_grid` and spell
:func:`nnunet_ssl.experiment.grid.decide` as ``if [ -f ... ]`` tests, so a shell loop over the lines
skips, validates, continues or starts each job exactly as ``nnunet-ssl experiment run`` does, and
writes the same files (results, predictions, ``logs/<job id>.log``).
"""
from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from pathlib import Path

from nnunet_ssl.experiment.grid import Job

FORMATS = ("commands", "slurm")


def _command(job: Job, argv: Sequence[str]) -> str:
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in job.env)
    return (env + " " if env else "") + shlex.join(argv)


def job_line(job: Job) -> str:
    """One job as one POSIX shell line, output appended to its log."""
    done = " && ".join(f"[ -f {shlex.quote(str(p))} ]" for p in job.done)
    branches = [f"if {done}; then echo {shlex.quote(job.id + ': already done')}"]
    if job.validate is not None and job.finished is not None:
        branches.append(f"elif [ -f {shlex.quote(str(job.finished))} ]; then {_command(job, job.validate)}")
    if job.resume is not None and job.partial is not None:
        branches.append(f"elif [ -f {shlex.quote(str(job.partial))} ]; then {_command(job, job.resume)}")
    branches.append(f"else {_command(job, job.command)}; fi")
    return "{ " + "; ".join(branches) + "; } >> " + shlex.quote(str(job.log)) + " 2>&1"


def preamble(experiment_file: Path, output: Path) -> list[str]:
    """Lines shared by both formats: nnU-Net's folders as now, the trainer folder, the log folder."""
    lines = []
    for variable in ("nnUNet_raw", "nnUNet_preprocessed"):
        value = os.environ.get(variable)
        if value:
            lines.append(f"export {variable}={shlex.quote(str(Path(value).resolve()))}")
    lines.append('export nnUNet_extTrainer="$(nnunet-ssl ext-path)${nnUNet_extTrainer:+:$nnUNet_extTrainer}"')
    lines.append(f"mkdir -p {shlex.quote(str(output / 'logs'))}")
    return lines


def commands_script(jobs: list[Job], experiment_file: Path, output: Path) -> str:
    """Every job, one a line, in dependency order (run them in order, e.g. ``bash FILE``)."""
    header = [
        f"# nnunet-ssl experiment {experiment_file}: {len(jobs)} job(s), one a line, in dependency order.",
        "# Each line skips a finished job, validates (--val) or continues (--c) an unfinished one, and appends",
        "# to its log in logs/. Folds are those nnunet-ssl split made in nnUNet_preprocessed (splits_final.json).",
    ]
    return "\n".join(header + preamble(experiment_file, output) + [job_line(j) for j in jobs]) + "\n"


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


def slurm_script(jobs: list[Job], experiment_file: Path, output: Path) -> str:
    """A SLURM job-array script: one array task per training (with its export and prediction)."""
    tasks = array_tasks(jobs)
    lines = [
        "#!/bin/bash",
        f"# nnunet-ssl experiment {experiment_file}: {len(tasks)} array task(s) for {len(jobs)} job(s).",
        "# Submit with: sbatch THIS_FILE   (add your partition / account lines below)",
        "#SBATCH --job-name=nnunet-ssl-experiment",
        f"#SBATCH --array=0-{max(len(tasks) - 1, 0)}",
        "#SBATCH --gres=gpu:1",
        "#SBATCH --cpus-per-task=8",
        f"#SBATCH --output={output / 'logs'}/slurm-%A_%a.out",
        "set -u",
        *preamble(experiment_file, output),
        'case "$SLURM_ARRAY_TASK_ID" in',
    ]
    for index, task in enumerate(tasks):
        lines.append(f"  {index})  # {task[-1].setting or task[0].id} {' '.join(j.id for j in task if j.kind == 'train')}")
        lines += [f"    {job_line(job)} || exit $?" for job in task]
        lines.append("    ;;")
    lines += ['  *) echo "no task $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;', "esac"]
    return "\n".join(lines) + "\n"


def render(jobs: list[Job], experiment_file: Path, output: Path, fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    return (commands_script if fmt == "commands" else slurm_script)(jobs, experiment_file, output)

"""The experiment file's ``slurm:`` section: what the emitted job-array script asks SLURM for, and its setup.

::

    slurm:
      partition: gpu                  # --partition (default: the cluster's)
      account: my_lab                 # --account
      time: "2-00:00:00"              # --time, quoted: minutes, or [days-]hours:minutes:seconds as SLURM reads it
      gpus: 1                         # --gres=gpu:N, or a typed request like "a100:1"; device cuda only
      cpus: 8                         # --cpus-per-task (default 8: nnU-Net's augmentation workers)
      memory: 64G                     # --mem: megabytes, or a number with K, M, G or T
      options: ["--qos=normal"]       # further #SBATCH lines, as written
      setup:                          # shell lines run before nnunet-ssl, e.g. the environment
        - module load cuda/12.1
        - source /path/to/.venv/bin/activate

Without ``setup``, the script puts the folder of the ``nnunet-ssl`` that emitted it first on
``PATH`` (the environment you emitted from); with it, exactly those lines run. A ``device: cpu``
(or ``mps``) experiment asks for no GPU, and refuses ``gpus``.

Messages here name the field (``slurm.time``); :mod:`nnunet_ssl.experiment.spec` adds the file.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

#: SLURM's --time forms: minutes, minutes:seconds, hours:minutes:seconds, days-hours[:minutes[:seconds]].
TIME_PATTERN = re.compile(r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}")
MEMORY_PATTERN = re.compile(r"\d+[KMGT]?")
GPUS_PATTERN = re.compile(r"([A-Za-z0-9_.-]+:)?[1-9]\d*")
#: Default --cpus-per-task: nnU-Net's data augmentation runs in worker processes.
DEFAULT_CPUS = 8


class SlurmSettingsError(ValueError):
    """A ``slurm:`` field that SLURM would not take; the message names the field."""


@dataclass(frozen=True)
class SlurmSettings:
    """The ``slurm:`` section (see the module docstring); None: the cluster's default / nothing asked.

    Attributes:
        gpus: The ``--gres=gpu:`` value; None: 1 for ``device: cuda``, none otherwise.
        setup: Shell lines before ``nnunet-ssl`` runs; None: the emitting environment's bin folder on PATH.
    """

    partition: str | None = None
    account: str | None = None
    time: str | None = None
    gpus: str | None = None
    cpus: int = DEFAULT_CPUS
    memory: str | None = None
    options: tuple[str, ...] = ()
    setup: tuple[str, ...] | None = None

    def gres(self, device: str) -> str | None:
        """The ``--gres`` value for the experiment's device (None: no GPU asked for)."""
        if not device.startswith("cuda"):
            return None
        return f"gpu:{self.gpus or 1}"


def _word(value: Any, name: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip() or any(
        c.isspace() for c in str(value)
    ):
        raise SlurmSettingsError(f"slurm.{name} must be one word (no spaces), got {value!r}")
    return str(value)


def _lines(value: Any, name: str, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = value.splitlines()
    if not isinstance(value, list) or not all(isinstance(v, str) and "\n" not in v for v in value):
        raise SlurmSettingsError(f"slurm.{name} must be a list of {what}, got {value!r}")
    return tuple(v for v in value if v.strip())


def slurm_settings(value: Any, device: str) -> SlurmSettings:
    """Validate the ``slurm:`` section of an experiment whose trainings run on ``device``.

    Raises:
        SlurmSettingsError: naming the field, e.g. a GPU asked for with ``device: cpu``.
    """
    if value is None:
        return SlurmSettings()
    if not isinstance(value, Mapping):
        raise SlurmSettingsError(f"slurm must be a mapping (partition, account, time, gpus, cpus, memory, options, "
                                 f"setup), got {value!r}")
    known = [f.name for f in fields(SlurmSettings)]
    unknown = sorted(set(map(str, value)) - set(known))
    if unknown:
        raise SlurmSettingsError(f"unknown field(s) {', '.join('slurm.' + u for u in unknown)}; known: "
                                 f"{', '.join('slurm.' + k for k in known)}")
    found: dict[str, Any] = {}
    for name in ("partition", "account"):
        if value.get(name) is not None:
            found[name] = _word(value[name], name)
    if value.get("time") is not None:
        if not isinstance(value["time"], str):  # YAML 1.1 reads an unquoted 12:00:00 as 43200 (base 60)
            raise SlurmSettingsError(f"slurm.time must be quoted text such as \"12:00:00\" or \"720\" (minutes), got "
                                     f"{value['time']!r}; YAML reads an unquoted 12:00:00 as the number 43200")
        time = _word(value["time"], "time")
        if not TIME_PATTERN.fullmatch(time):
            raise SlurmSettingsError(f"slurm.time must be minutes or [days-]hours:minutes:seconds as SLURM reads it "
                                     f"(e.g. 720, \"12:00:00\", \"2-00:00:00\"), got {value['time']!r}")
        found["time"] = time
    if value.get("memory") is not None:
        memory = _word(value["memory"], "memory")
        if not MEMORY_PATTERN.fullmatch(memory):
            raise SlurmSettingsError(f"slurm.memory must be megabytes or a number with K, M, G or T (e.g. 64G), "
                                     f"got {value['memory']!r}")
        found["memory"] = memory
    if value.get("cpus") is not None:
        cpus = value["cpus"]
        if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
            raise SlurmSettingsError(f"slurm.cpus must be one integer >= 1, got {cpus!r}")
        found["cpus"] = cpus
    if value.get("gpus") is not None:
        gpus = _word(value["gpus"], "gpus")
        if not device.startswith("cuda"):
            raise SlurmSettingsError(f"slurm.gpus is {gpus}, but device is {device}: the trainings would not use a "
                                     "GPU. Remove slurm.gpus, or set device: cuda")
        if not GPUS_PATTERN.fullmatch(gpus):
            raise SlurmSettingsError(f"slurm.gpus must be a count >= 1 or TYPE:COUNT (e.g. 1, \"a100:1\"), got "
                                     f"{value['gpus']!r}; for no GPU set device: cpu")
        found["gpus"] = gpus
    if value.get("options") is not None:
        options = _lines(value["options"], "options", "#SBATCH options")
        bad = [o for o in options if not o.startswith("-")]
        if bad:
            raise SlurmSettingsError(f"slurm.options are #SBATCH options such as \"--qos=normal\", got {bad[0]!r}")
        found["options"] = options
    if "setup" in value:
        found["setup"] = () if value["setup"] is None else _lines(value["setup"], "setup", "shell lines")
    return SlurmSettings(**found)

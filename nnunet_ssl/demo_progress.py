"""Demo helpers: nnU-Net's epoch progress as one line per epoch, the plan stage's progress, the closing time line,
and the demo's choice of structures."""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

logger = logging.getLogger("nnunet_ssl.demo")

#: Phantom structures folded into another one when only some are kept (lesions lie in the liver).
MERGED_INTO = {"lesion": "liver"}

_TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(?:\.\d+)?: ")
#: A progress bar line as tqdm writes it (nnU-Net's fingerprint and preprocessing, the plugin's MR measurement):
#: ``Preprocessing cases:  38%|███▊      | 3/8 [00:09<00:15,  3.1s/it]``.
_PROGRESS_BAR = re.compile(r"^(?P<what>[^|]+?):\s+\d+%\|[^|]*\|\s*(?P<done>\d+)/(?P<total>\d+)\b")
#: The plan command's own steps (its logger), echoed as they come.
_PLAN_STEP = "nnunet_ssl.plans.plan_command: "
#: A progress line inside an epoch, e.g. ``Epoch 3: 10/30 training iterations (15 s), loss -0.4120`` (0-based epoch).
_IN_EPOCH = re.compile(r"^Epoch (\d+): (\d+/\d+ training iterations .*)$")
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|nan")


class EpochProgress:
    """Turns ``nnUNetv2_train``'s log lines into one progress line per epoch.

    nnU-Net prints, per epoch, ``Epoch k`` (0-based), ``train_loss x``, ``val_loss y``,
    ``Pseudo dice [...]`` and ``Epoch time: t s``; the last one completes a line such as
    ``epoch 3/16: train loss -0.412, val loss -0.388, pseudo-Dice liver 0.71 spleen 0.12 (21 s)``. The CPU
    trials' lines inside an epoch are echoed as they come (``epoch 3/16: 10/30 training iterations (15 s), ...``).
    """

    def __init__(self, epochs: int | None, structures: Sequence[str]) -> None:
        self.epochs = epochs
        self.structures = list(structures)
        self.epoch: int | None = None
        self.losses: dict[str, float] = {}
        self.dice: list[float] = []
        self.lines: list[str] = []

    def feed(self, line: str) -> None:
        text = _TIMESTAMP.sub("", line.strip())
        within = _IN_EPOCH.match(text)
        if within:  # the CPU trials' progress inside an epoch (trainers' InEpochProgress)
            logger.info("    %s: %s", self.title(int(within.group(1))), within.group(2))
        elif text.startswith("Epoch ") and text[6:].strip().isdigit():
            self.epoch, self.losses, self.dice = int(text[6:]), {}, []
        elif text.startswith(("train_loss", "val_loss")):
            key, _, value = text.partition(" ")
            self.losses[key] = _first_number(value)
        elif text.startswith("Pseudo dice"):
            cleaned = re.sub(r"np\.float\d+\(", "", text[len("Pseudo dice"):]).replace(")", "")
            self.dice = [float(v) for v in _NUMBER.findall(cleaned)]
        elif text.startswith("Epoch time:") and self.epoch is not None:
            self.emit(self.epoch, _first_number(text[len("Epoch time:"):]))

    def title(self, epoch: int) -> str:
        """``epoch 3/16`` for the (0-based) ``epoch`` 2 of 16; without the total when it is not known."""
        return f"epoch {epoch + 1}" + (f"/{self.epochs}" if self.epochs else "")

    def emit(self, epoch: int, seconds: float) -> None:
        """Log the line of (0-based) ``epoch`` from the values read since its ``Epoch k`` line."""
        dice = self.dice
        names = self.structures if len(self.structures) == len(dice) else [f"label {i + 1}" for i in range(len(dice))]
        parts = [f"train loss {self.losses.get('train_loss', float('nan')):.3f}",
                 f"val loss {self.losses.get('val_loss', float('nan')):.3f}"]
        if dice:
            parts.append("pseudo-Dice " + " ".join(f"{n} {d:.2f}" for n, d in zip(names, dice, strict=True)))
        line = f"{self.title(epoch)}: {', '.join(parts)} ({seconds:.0f} s)"
        self.lines.append(line)
        logger.info("    %s", line)


class PlanProgress:
    """Echoes ``nnunet-ssl plan``'s progress on the console: its steps, and one line per case of each progress bar.

    The demo runs ``plan`` with its output in a log file; what reaches the console is, e.g.,
    ``extracting the dataset fingerprint of Dataset501_Phantom`` and ``Preprocessing cases 3/8``. The bars
    come as lines because the demo reads the output with universal newlines (tqdm's ``\\r`` ends a line);
    a bar that redraws the same count is echoed once.
    """

    def __init__(self) -> None:
        self.shown: set[tuple[str, int]] = set()

    def __call__(self, line: str) -> None:
        if _PLAN_STEP in line:
            logger.info("    %s", line[line.index(_PLAN_STEP) + len(_PLAN_STEP):])
            return
        match = _PROGRESS_BAR.match(line.strip())
        if match is None:
            return
        what, done = match.group("what").strip(), int(match.group("done"))
        if (what, done) not in self.shown and done > 0:
            self.shown.add((what, done))
            logger.info("    %s %d/%s", what, done, match.group("total"))


def duration_text(seconds: float) -> str:
    """A duration as a person reads it: ``9 s`` under a minute, ``38.0 min`` under two hours, else ``2.5 h``."""
    if seconds < 59.5:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def finished_line(this_run_seconds: float, work_seconds: float, reused: int, stages: int,
                  reused_seconds: float) -> str:
    """The demo's closing time line: this run's time, and when it reused earlier work, that work's time too.

    A re-run skips the stages whose outputs exist, so its own time (seconds) says nothing about what
    the demo costs; the work's time (summed over the stages, as each last did its work) says that.

    Args:
        this_run_seconds: Wall time of this invocation.
        work_seconds: Time of every stage's work, this run's and the earlier runs' it reused.
        reused: Stages skipped in this run because an earlier run did their work.
        stages: Every stage of the demo.
        reused_seconds: Recorded time of the reused stages' work (0 when none was recorded).
    """
    line = f"demo finished in {duration_text(this_run_seconds)}"
    if reused == 0:
        return line
    earlier = f"it reused the work of {reused} of {stages} stages from earlier runs"
    if reused_seconds > 0:
        earlier += f", which took {duration_text(reused_seconds)}; all the demo's work took {duration_text(work_seconds)}"
    else:
        earlier += "; their time was not recorded"
    return f"{line} ({earlier})"


def _first_number(text: str) -> float:
    match = _NUMBER.search(text)
    return float(match.group()) if match else float("nan")


def keep_structures(dataset_dir: Path, keep: Sequence[str]) -> list[str]:
    """Restrict an nnU-Net raw dataset's labels to ``keep`` (renumbered 1..K in label order), in place.

    Structures in :data:`MERGED_INTO` join their host when it is kept; the others become background.
    Idempotent: a dataset already restricted to ``keep`` is left alone (dataset.json is written last).

    Returns:
        The kept structure names in label order.
    """
    dataset_json_file = dataset_dir / "dataset.json"
    dataset_json = json.loads(dataset_json_file.read_text(encoding="utf-8"))
    labels: dict[str, int] = dataset_json["labels"]
    unknown = [name for name in keep if name not in labels]
    if unknown:
        raise ValueError(f"structures {unknown} are not in {dataset_json_file} (it has {sorted(labels)})")
    kept = [name for name, _ in sorted(labels.items(), key=lambda item: item[1]) if name in keep]
    new_labels = {"background": 0, **{name: i + 1 for i, name in enumerate(kept)}}
    if labels == new_labels:
        return kept
    lookup = np.zeros(max(labels.values()) + 1, dtype=np.uint8)
    for name, value in labels.items():
        target = name if name in kept else MERGED_INTO.get(name)
        lookup[value] = new_labels.get(target, 0) if target else 0
    for folder in ("labelsTr", "labelsTs"):
        for path in sorted((dataset_dir / folder).glob(f"*{dataset_json.get('file_ending', '.nii.gz')}")):
            image = sitk.ReadImage(str(path))
            remapped = sitk.GetImageFromArray(lookup[sitk.GetArrayFromImage(image)])
            remapped.CopyInformation(image)
            sitk.WriteImage(remapped, str(path), useCompression=True)
    dataset_json["labels"] = new_labels
    dataset_json_file.write_text(json.dumps(dataset_json, indent=2), encoding="utf-8")
    return kept

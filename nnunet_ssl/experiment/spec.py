"""The experiment file: one dataset, its arms (scratch and pretrained methods) and settings, as validated data.

An experiment file is YAML (or JSON)::

    dataset: 501                      # nnU-Net dataset id or name (preprocessed with these plans)
    plans: nnUNetSwinPlans
    configuration: 3d_fullres
    preset: smit                      # picks each arm's named trainer: smit, smit128, smit_s, smit_p (paper
                                      # schedule), or tiny (the CPU trial: scratch and smit arms only)
    seed: 0                           # NNUNET_SSL_SEED of every training
    device: cuda                      # nnUNetv2_train / nnUNetv2_predict -device
    output: experiment_out            # relative to the experiment file
    epochs: {full: 1000, few_shot: 3000, data_limited: 1000}   # optional overrides, one integer each (NNUNET_SSL_EPOCHS)
    env: {nnUNet_n_proc_DA: "4"}      # extra environment of every command (optional)
    arms:
      - name: scratch
      - name: smit
        method: smit
        weights: weights/smit.pt      # a file from `nnunet-ssl export`, or
      - name: simmim
        method: simmim
        pretraining_run: runs/simmim  # a `nnunet-ssl pretrain` folder, exported for these plans
        trainer: MySimMIMTrainer      # optional: any Swin trainer by name (yours: in nnUNet_extTrainer)
      - name: tiny_scratch
        preset: tiny                  # optional per arm: its own preset (picks its named trainer) and plans;
        plans: nnUNetSwinTinyPlans    # every plans of the dataset share its split files, hence the same folds
    settings:
      full: {folds: [0, 1, 2, 3, 4]}  # nnU-Net's cross-validation folds
      few_shot: {shots: [5, 10, 20], seeds: [0, 1, 2]}
      data_limited: {sizes: [20, 40], seeds: [0]}
    test_set: imagesTs                # the raw dataset's imagesTs/labelsTs, or {images: DIR, labels: DIR}
    slurm: {partition: gpu, time: "2-00:00:00", setup: ["source .venv/bin/activate"]}   # optional: the
                                      # SLURM script's resources and setup (nnunet_ssl.experiment.cluster)

Every field is checked when the file is read; an error names the file and the field.

An arm's trainer is the named trainer (``nnunet-ssl trainers``) of its method and the file's ``preset``,
or the arm's ``trainer``; there is no other way to build a trainer name.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from nnunet_ssl.experiment.cluster import SlurmSettings, SlurmSettingsError, slurm_settings

#: Setting kinds, in table order.
SETTING_KINDS = ("full", "few_shot", "data_limited")
#: ``export --from`` choices.
EXPORT_SOURCES = ("default", "teacher", "student")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class ExperimentError(ValueError):
    """An experiment file that cannot be run; the message names the file and the field."""


@dataclass(frozen=True)
class Arm:
    """One row of the tables: training from scratch, or from one method's pretrained encoder.

    Attributes:
        name: Row label and folder name.
        method: SSL method (None: from scratch).
        weights: A ``-pretrained_weights`` file (``nnunet-ssl export``).
        pretraining_run: A pretraining run folder, exported for the experiment's plans.
        export_from: ``nnunet-ssl export --from`` for a pretraining run.
        trainer: Explicit trainer class name (default: the named trainer of the method and the arm's preset).
        plans: This arm's plans (default: the file's ``plans``), e.g. ResEnc plans beside Swin plans of the
            same dataset; every plans of a dataset share its split files, so the arms see the same folds.
        preset: This arm's preset, which picks its named trainer (default: the file's ``preset``).
    """

    name: str
    method: str | None = None
    weights: Path | None = None
    pretraining_run: Path | None = None
    export_from: str = "default"
    trainer: str | None = None
    plans: str | None = None
    preset: str | None = None

    @property
    def pretrained(self) -> bool:
        return self.method is not None


@dataclass(frozen=True)
class SubsetSetting:
    """Few-shot (``shots``) or data-limited (``sizes``) folds made by ``nnunet-ssl split``."""

    sizes: tuple[int, ...]
    seeds: tuple[int, ...] = (0,)
    val_cases: int | None = None
    val_from_fold: int | None = None


@dataclass(frozen=True)
class TestSetSpec:
    images: Path
    labels: Path


@dataclass(frozen=True)
class Epochs:
    """Epoch overrides per setting kind (None: the trainer's recipe)."""

    full: int | None = None
    few_shot: int | None = None
    data_limited: int | None = None

    def for_kind(self, kind: str) -> int | None:
        return getattr(self, kind)


@dataclass(frozen=True)
class Experiment:
    """A validated experiment file (see the module docstring)."""

    source: Path
    dataset: str
    arms: tuple[Arm, ...]
    output: Path
    plans: str = "nnUNetPlans"
    configuration: str = "3d_fullres"
    preset: str = "smit"
    seed: int = 0
    device: str = "cuda"
    full_folds: tuple[int, ...] = ()
    few_shot: SubsetSetting | None = None
    data_limited: SubsetSetting | None = None
    test_set: TestSetSpec | str | None = None
    epochs: Epochs = field(default_factory=Epochs)
    env: tuple[tuple[str, str], ...] = ()
    slurm: SlurmSettings = field(default_factory=SlurmSettings)

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    @property
    def scratch_arm(self) -> Arm | None:
        return next((a for a in self.arms if not a.pretrained), None)


# ---------------------------------------------------------------------------- reading and checking
def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment file.

    Raises:
        ExperimentError: naming the file and the field for anything that cannot be run (a file that is
            not UTF-8 text included).
        FileNotFoundError: when the file does not exist.
        IsADirectoryError: when the path is a folder.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"experiment file {path} is a folder; give the YAML or JSON file")
    if not path.is_file():
        raise FileNotFoundError(f"experiment file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ExperimentError(
            f"{path}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start}); "
            "save the experiment file as UTF-8"
        ) from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as error:  # yaml.YAMLError / JSONDecodeError: both say where
        raise ExperimentError(f"{path}: not valid YAML/JSON ({error})") from error
    return experiment_from_dict(data, path)


def experiment_from_dict(data: Any, source: Path) -> Experiment:
    """Validate the parsed content of an experiment file (``source`` anchors relative paths)."""
    where = str(source)
    if not isinstance(data, Mapping):
        raise ExperimentError(f"{where}: expected a mapping of fields at the top level")
    known = {"dataset", "plans", "configuration", "preset", "seed", "device", "output", "epochs",
             "env", "arms", "settings", "test_set", "slurm"}
    if "trainer_variant" in data:
        raise ExperimentError(
            f"{where}: trainer_variant is no longer read (it appended a suffix to trainer names). For the CPU trial "
            "schedule set preset: tiny (SwinScratchTrainer_tiny_16epochs, SwinSMITTrainer_tiny_16epochs); for any "
            "other trainer name it in the arm (trainer: NAME); `nnunet-ssl trainers` lists the named trainers"
        )
    _no_unknown(data, known, where, "")
    base = source.resolve().parent

    def path_of(value: Any, name: str) -> Path:
        if not isinstance(value, str) or not value:
            raise ExperimentError(f"{where}: {name} must be a path, got {_shown(value)}")
        candidate = Path(value).expanduser()
        return candidate if candidate.is_absolute() else base / candidate

    if "dataset" not in data:
        raise ExperimentError(f"{where}: dataset is required (an nnU-Net dataset id or name)")
    dataset = data["dataset"]
    if isinstance(dataset, bool) or not isinstance(dataset, (int, str)) or str(dataset).strip() == "":
        raise ExperimentError(f"{where}: dataset must be an id or a name, got {_shown(dataset)}")
    if isinstance(dataset, int) and dataset < 1:
        raise ExperimentError(f"{where}: dataset must be a positive nnU-Net dataset id or a name, got {dataset}")
    strings = {}
    for key, default in (("plans", "nnUNetPlans"), ("configuration", "3d_fullres"), ("preset", "smit"),
                         ("device", "cuda")):
        value = data.get(key, default)
        if not isinstance(value, str) or not value:
            raise ExperimentError(f"{where}: {key} must be a string, got {_shown(value)}")
        strings[key] = value
    if strings["device"].split(":")[0] not in ("cuda", "cpu", "mps"):
        raise ExperimentError(f"{where}: device must be cuda, cpu or mps, got {strings['device']!r}")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ExperimentError(f"{where}: seed must be an integer in [0, 2**32), got {_shown(seed)}")

    arms = _arms(data.get("arms"), where, path_of)
    full_folds, few_shot, data_limited = _settings(data.get("settings"), where)
    test_set = _test_set(data.get("test_set"), where, path_of)
    epochs = _epochs(data.get("epochs"), where)
    env = _env(data.get("env"), where)
    output = path_of(data.get("output", f"{source.stem}_out"), "output")
    try:
        slurm = slurm_settings(data.get("slurm"), strings["device"])
    except SlurmSettingsError as error:
        raise ExperimentError(f"{where}: {error}") from None
    experiment = Experiment(
        source=source.resolve(), dataset=str(dataset), arms=arms, output=output, seed=seed, full_folds=full_folds,
        few_shot=few_shot, data_limited=data_limited, test_set=test_set, epochs=epochs, env=env, slurm=slurm,
        **strings,
    )
    _check_trainers(experiment, where)
    return experiment


def _no_unknown(data: Mapping, known: set[str], where: str, prefix: str) -> None:
    unknown = sorted(set(data) - known, key=str)
    if unknown:
        raise ExperimentError(
            f"{where}: unknown field(s) {', '.join(prefix + str(u) for u in unknown)}; known: "
            f"{', '.join(prefix + k for k in sorted(known))}"
        )


def _shown(value: Any) -> str:
    """``value`` for a message, with its YAML kind when that is the problem (``[10, 20] (a list)``)."""
    kinds = {bool: "true/false", list: "a list", dict: "a mapping", float: "a number with a fraction",
             type(None): "empty"}
    kind = next((label for cls, label in kinds.items() if type(value) is cls), None)
    if kind is None and isinstance(value, Mapping):
        kind = "a mapping"
    return f"{value!r} ({kind})" if kind else repr(value)


def _int(value: Any, where: str, name: str, minimum: int) -> int:
    """One integer ``>= minimum`` (not a bool, a float or a list)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ExperimentError(f"{where}: {name} must be one integer >= {minimum}, got {_shown(value)}")
    return value


def _positive_ints(value: Any, where: str, name: str, minimum: int = 1) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value
    ):
        raise ExperimentError(
            f"{where}: {name} must be a non-empty list of integers >= {minimum}, got {_shown(value)}"
        )
    if len(set(value)) != len(value):
        raise ExperimentError(f"{where}: {name} lists a value twice: {value}")
    return tuple(value)


def _arms(value: Any, where: str, path_of: Any) -> tuple[Arm, ...]:
    from nnunet_ssl.pretraining.methods import METHODS

    if not isinstance(value, list) or not value:
        raise ExperimentError(f"{where}: arms must be a non-empty list (e.g. [{{name: scratch}}, {{name: smit, ...}}])")
    arms: list[Arm] = []
    for index, entry in enumerate(value):
        label = f"arms[{index}]"
        if not isinstance(entry, Mapping):
            raise ExperimentError(f"{where}: {label} must be a mapping with at least a name")
        _no_unknown(entry, {f.name for f in fields(Arm)}, where, f"{label}.")
        name = entry.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise ExperimentError(f"{where}: {label}.name must be a folder-safe name (letters, digits, _.-), got {name!r}")
        if any(a.name == name for a in arms):
            raise ExperimentError(f"{where}: {label}.name {name!r} is used twice")
        method = entry.get("method")
        if method is not None and (not isinstance(method, str) or method not in METHODS):
            raise ExperimentError(
                f"{where}: {label}.method {_shown(method)} is not a method; known: {', '.join(sorted(METHODS))}"
            )
        weights = path_of(entry["weights"], f"{label}.weights") if entry.get("weights") is not None else None
        run = path_of(entry["pretraining_run"], f"{label}.pretraining_run") if entry.get("pretraining_run") is not None else None
        if method is None and (weights or run):
            raise ExperimentError(f"{where}: {label} ({name}) gives weights but no method; say which method made them")
        if method is not None and (weights is None) == (run is None):
            raise ExperimentError(f"{where}: {label} ({name}) needs exactly one of weights (a file from nnunet-ssl export) "
                                  "or pretraining_run (a nnunet-ssl pretrain folder)")
        if weights is not None and weights.is_dir():
            raise ExperimentError(
                f"{where}: {label}.weights {weights} is a folder, not a file; give the .pt file that "
                "`nnunet-ssl export` wrote (or the folder as pretraining_run, if it is a pretraining run)"
            )
        if weights is not None and not weights.is_file():
            raise ExperimentError(f"{where}: {label}.weights {weights} does not exist")
        if run is not None and not run.exists():
            raise ExperimentError(f"{where}: {label}.pretraining_run {run} does not exist")
        if run is not None and not run.is_dir():
            raise ExperimentError(
                f"{where}: {label}.pretraining_run {run} is a file, not a folder; give the `nnunet-ssl pretrain` "
                "folder (or the file as weights, if `nnunet-ssl export` wrote it)"
            )
        export_from = entry.get("export_from", "default")
        if export_from not in EXPORT_SOURCES:
            raise ExperimentError(
                f"{where}: {label}.export_from must be one of {EXPORT_SOURCES}, got {_shown(export_from)}"
            )
        trainer = entry.get("trainer")
        if trainer is not None and not isinstance(trainer, str):
            raise ExperimentError(f"{where}: {label}.trainer must be a trainer class name, got {_shown(trainer)}")
        plans, preset = entry.get("plans"), entry.get("preset")
        for key, text in (("plans", plans), ("preset", preset)):
            if text is not None and (not isinstance(text, str) or not NAME_PATTERN.fullmatch(text)):
                raise ExperimentError(f"{where}: {label}.{key} must be a name (letters, digits, _.-), got {_shown(text)}")
        arms.append(Arm(name, method, weights, run, export_from, trainer, plans, preset))
    return tuple(arms)


def _subset(value: Any, where: str, kind: str, size_key: str) -> SubsetSetting:
    label = f"settings.{kind}"
    if not isinstance(value, Mapping):
        raise ExperimentError(f"{where}: {label} must be a mapping with {size_key} and seeds")
    _no_unknown(value, {size_key, "seeds", "val_cases", "val_from_fold"}, where, f"{label}.")
    if size_key not in value:
        raise ExperimentError(f"{where}: {label}.{size_key} is required")
    sizes = _positive_ints(value[size_key], where, f"{label}.{size_key}")
    seeds = _positive_ints(value.get("seeds", [0]), where, f"{label}.seeds", minimum=0)
    val_cases, val_from_fold = value.get("val_cases"), value.get("val_from_fold")
    if val_cases is not None and val_from_fold is not None:
        raise ExperimentError(f"{where}: {label}: give val_cases or val_from_fold, not both")
    if val_cases is not None:
        val_cases = _int(val_cases, where, f"{label}.val_cases", minimum=1)
    if val_from_fold is not None:
        val_from_fold = _int(val_from_fold, where, f"{label}.val_from_fold", minimum=0)
    return SubsetSetting(sizes, seeds, val_cases, val_from_fold)


def _settings(value: Any, where: str) -> tuple[tuple[int, ...], SubsetSetting | None, SubsetSetting | None]:
    if not isinstance(value, Mapping) or not value:
        raise ExperimentError(f"{where}: settings must name at least one of {', '.join(SETTING_KINDS)}")
    _no_unknown(value, set(SETTING_KINDS), where, "settings.")
    folds: tuple[int, ...] = ()
    if "full" in value:
        full = value["full"]
        if full is True or full is None:
            full = {}
        if not isinstance(full, Mapping):
            raise ExperimentError(f"{where}: settings.full must be a mapping (e.g. {{folds: [0, 1, 2, 3, 4]}})")
        _no_unknown(full, {"folds"}, where, "settings.full.")
        folds = _positive_ints(full.get("folds", [0, 1, 2, 3, 4]), where, "settings.full.folds", minimum=0)
        if any(f > 4 for f in folds):
            raise ExperimentError(f"{where}: settings.full.folds are nnU-Net's folds 0-4, got {list(folds)}")
    few = _subset(value["few_shot"], where, "few_shot", "shots") if "few_shot" in value else None
    limited = _subset(value["data_limited"], where, "data_limited", "sizes") if "data_limited" in value else None
    return folds, few, limited


def _test_set(value: Any, where: str, path_of: Any) -> TestSetSpec | str | None:
    if value is None:
        return None
    if value == "imagesTs":
        return "imagesTs"
    if not isinstance(value, Mapping) or set(value) != {"images", "labels"}:
        raise ExperimentError(
            f"{where}: test_set must be 'imagesTs' or {{images: DIR, labels: DIR}}, got {_shown(value)}"
        )
    spec = TestSetSpec(path_of(value["images"], "test_set.images"), path_of(value["labels"], "test_set.labels"))
    for name, folder in (("images", spec.images), ("labels", spec.labels)):
        if not folder.is_dir():
            raise ExperimentError(f"{where}: test_set.{name} {folder} is not a folder")
    return spec


def _epochs(value: Any, where: str) -> Epochs:
    if value is None:
        return Epochs()
    if not isinstance(value, Mapping):
        raise ExperimentError(f"{where}: epochs must be a mapping like {{full: 1000, few_shot: 3000}}")
    _no_unknown(value, set(SETTING_KINDS), where, "epochs.")
    return Epochs(**{
        key: None if epochs is None else _int(epochs, where, f"epochs.{key}", minimum=1)
        for key, epochs in value.items()
    })


def _env(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k) for k in value
    ):
        raise ExperimentError(f"{where}: env must map variable names to values, got {value!r}")
    reserved = {"nnUNet_results", "NNUNET_SSL_SEED", "NNUNET_SSL_EPOCHS", "nnUNet_extTrainer"} & set(value)
    if reserved:
        raise ExperimentError(f"{where}: env sets {sorted(reserved)}, which the experiment sets per job")
    for key, variable in value.items():
        if isinstance(variable, bool) or not isinstance(variable, (str, int, float)):
            raise ExperimentError(
                f"{where}: env.{key} must be a string or a number, got {_shown(variable)}"
                + ("; quote it (e.g. \"true\" or \"1\")" if isinstance(variable, bool) else "")
            )
    return tuple((k, str(v)) for k, v in value.items())


def arm_plans(experiment: Experiment, arm: Arm) -> str:
    """The plans identifier an arm trains with: its own ``plans``; else the file's, when the arm's preset is of the
    file's preset's network family; else the plans ``nnunet-ssl plan --family F`` writes for the arm's family
    (e.g. ``nnUNetResEncSSLPlans`` for a ``resenc_l`` arm in a Swin experiment)."""
    from nnunet_ssl.networks.family import family_of_preset

    if arm.plans:
        return arm.plans
    try:
        family = family_of_preset(arm.preset or experiment.preset)
        same = family is family_of_preset(experiment.preset)
    except ValueError:  # an unknown preset: trainer_name names the problem
        return experiment.plans
    return experiment.plans if same else family.ssl_plans


def experiment_plans(experiment: Experiment) -> list[str]:
    """Every plans identifier the arms use, in arm order, each once."""
    return list(dict.fromkeys(arm_plans(experiment, arm) for arm in experiment.arms))


def trainer_name(experiment: Experiment, arm: Arm) -> str:
    """The nnU-Net trainer of an arm: its explicit ``trainer``, else the named trainer of its method and preset.

    The named trainers are ``nnunet_ssl.trainers.named.ALL_TRAINERS`` (one per method and preset: a Swin
    trainer's network preset, a ResEnc trainer's schedule preset), so new methods need no change here. An
    explicit trainer may also be one of the user's own, found in ``nnUNet_extTrainer``'s folders as
    ``nnUNetv2_train`` will find it.

    Raises:
        ExperimentError: when there is no such trainer, or it is for another method.
    """
    from nnunet_ssl.trainers.base import PluginTrainerBase
    from nnunet_ssl.trainers.named import ALL_TRAINERS, UnknownTrainerError, find_trainer, trainer_preset

    method = arm.method or "scratch"
    if arm.trainer is not None:
        try:
            trainer = find_trainer(arm.trainer, kind=PluginTrainerBase)
        except UnknownTrainerError as error:
            raise ExperimentError(f"{experiment.source}: arm {arm.name}: trainer: {error}") from None
        if trainer.method != arm.method:
            raise ExperimentError(
                f"{experiment.source}: arm {arm.name}: trainer {arm.trainer} is for {trainer.method or 'scratch'}, "
                f"the arm's method is {method}"
            )
        return arm.trainer
    preset = arm.preset or experiment.preset
    names = [name for name, cls in ALL_TRAINERS.items() if cls.method == arm.method and trainer_preset(cls) == preset]
    if len(names) == 1:
        return names[0]
    presets = sorted({trainer_preset(cls) for cls in ALL_TRAINERS.values() if cls.method == arm.method})
    of_preset = [f"{name} ({cls.method or 'scratch'})" for name, cls in ALL_TRAINERS.items()
                 if trainer_preset(cls) == preset]
    raise ExperimentError(
        f"{experiment.source}: arm {arm.name}: {len(names)} named trainers for method {method} with preset "
        f"{preset} ({', '.join(names) or 'none'}). Named trainers of method {method} have preset "
        f"{', '.join(presets) or 'none'}; of preset {preset}: {', '.join(of_preset) or 'none'}. Change "
        "the preset (the file's, or the arm's preset:), or name the arm's trainer (trainer: NAME; a trainer of your "
        "own: docs/trainers.md)"
    )


def _check_trainers(experiment: Experiment, where: str) -> None:
    """Every arm resolves to one trainer (raises ExperimentError naming the arm otherwise)."""
    for arm in experiment.arms:
        trainer_name(experiment, arm)

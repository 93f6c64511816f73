"""Build the exact network a trainer will build for a preprocessed nnU-Net dataset."""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from nnunet_ssl.networks.family import family_of, family_of_preset, shown_differences
from nnunet_ssl.nnunet_paths import preprocessed_dataset_folder
from nnunet_ssl.weights.format import WeightsError, build_weights_file


@dataclass(frozen=True)
class DatasetTarget:
    """What a weights file must fit: channels and heads of a dataset under given plans.

    ``architecture`` is the configuration's ``architecture`` entry of the plans (class name, kwargs), which
    families built from plans (ResEnc) must match; None when unknown.
    """

    dataset_name: str
    plans_file: Path
    configuration: str
    in_channels: int
    num_classes: int
    architecture: dict[str, Any] | None = None


def resolve_target(dataset: str, configuration: str = "3d_fullres", plans_name: str = "nnUNetPlans") -> DatasetTarget:
    """Read a dataset's plans and dataset.json from ``nnUNet_preprocessed``.

    Raises:
        FileNotFoundError: naming the missing file and the command that creates it.
    """
    folder = preprocessed_dataset_folder(dataset)
    plans_file = folder / f"{plans_name}.json"
    if not plans_file.is_file():
        others = sorted((p.stem for p in folder.glob("*.json") if _is_plans_file(p)), key=lambda n: (n != "nnUNetSwinPlans", n))
        if others:
            raise FileNotFoundError(
                f"{plans_file} does not exist, but {folder} has plans {', '.join(f'{o}.json' for o in others)}: "
                f"pass `-p {others[0]}` (the plans you will train with, e.g. "
                f"`nnunet-ssl export RUN_DIR -d {dataset} -p {others[0]} --out FILE`)"
            )
        raise FileNotFoundError(
            f"{plans_file} does not exist; run `nnunet-ssl plan -d {dataset}` (or `nnUNetv2_plan_and_preprocess -d "
            f"{dataset}`) first"
        )
    return target_from_plans_file(plans_file, configuration)


def _is_plans_file(path: Path) -> bool:
    """A JSON file in a preprocessed folder that holds nnU-Net plans (not dataset.json, splits or fingerprints)."""
    if path.name in ("dataset.json", "dataset_fingerprint.json", "splits_final.json", "splits_manifest.json"):
        return False
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and "configurations" in content and content.get("plans_name") == path.stem


def target_from_plans_file(plans_file: Path, configuration: str = "3d_fullres") -> DatasetTarget:
    """Read a plans file and the dataset.json beside it (as nnU-Net's preprocessed folder holds them)."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_file = Path(plans_file)
    dataset_json_file = plans_file.parent / "dataset.json"
    for required in (plans_file, dataset_json_file):
        if not required.is_file():
            raise FileNotFoundError(f"{required} does not exist (a plans file needs its dataset.json beside it)")
    plans = json.loads(plans_file.read_text(encoding="utf-8"))
    dataset_json = json.loads(dataset_json_file.read_text(encoding="utf-8"))
    if configuration not in plans.get("configurations", {}):
        raise ValueError(f"{plans_file} has no configuration {configuration!r}; it has {sorted(plans['configurations'])}")
    manager = PlansManager(plans)
    config = manager.get_configuration(configuration)
    return DatasetTarget(
        dataset_name=manager.dataset_name,
        plans_file=plans_file,
        configuration=configuration,
        in_channels=determine_num_input_channels(manager, config, dataset_json),
        num_classes=manager.get_label_manager(dataset_json).num_segmentation_heads,
        architecture=config.configuration.get("architecture"),
    )


def network_for_target(trainer_class: type[Any], target: DatasetTarget) -> nn.Module:
    """The network ``trainer_class`` builds for ``target``'s plans, on the meta device (shapes only, no memory).

    Built as nnU-Net's trainer builds it, from the plans and the dataset.json beside them, so that a trainer
    whose network comes from the plans' architecture (ResEnc) gets the plans' network.
    """
    from nnunet_ssl.weights.preflight import network_shape_for

    plans = json.loads(target.plans_file.read_text(encoding="utf-8"))
    dataset_json = json.loads((target.plans_file.parent / "dataset.json").read_text(encoding="utf-8"))
    return network_shape_for(trainer_class, plans, target.configuration, dataset_json)


def build_weights_for_target(
    encoder_state: Mapping[str, Tensor],
    preset_name: str,
    target: DatasetTarget,
    method: str,
    **metadata: Any,
) -> dict[str, Any]:
    """A ``-pretrained_weights`` payload fitting ``target``'s channels and classes (see :func:`build_weights_file`).

    Raises:
        WeightsError: For a family built from the plans (ResEnc), when the plans' architecture is not the
            pretrained one; the message lists the differences and the command that plans a matching one.
    """
    record = metadata.get("record")
    family = family_of(record) if record is not None else family_of_preset(preset_name)
    if record is None:
        record = family.record(preset_name)
    differences = family.plans_differences(record, target.architecture)
    if differences:
        plan = family.plan_command({**record, "preset": record.get("preset") or preset_name}, target.dataset_name)
        raise WeightsError(
            f"{target.plans_file} ({target.configuration}) plans another {family.name} network than the pretrained "
            f"one ({family.describe(record)}): {shown_differences(differences, 4)}. Fix: plan the dataset with "
            f"{plan or 'plans with the pretrained architecture'} and export for those plans (-p {family.ssl_plans})"
        )
    return build_weights_file(
        encoder_state, preset_name, target.in_channels, target.num_classes, method=method, **metadata
    )

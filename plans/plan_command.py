"""``nnunet-ssl plan``: fingerprint (if needed), plan with :class:`SwinPlanner`, preprocess.

All through nnU-Net's API, so the preprocessed data and the plans file are nnU-Net's own and
``nnUNetv2_train ... -p <plans_name>`` and ``nnUNetv2_predict ... -p <plans_name>`` use them.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

from nnunet_ssl.nnunet_paths import dataset_name, preprocessed_dataset_folder
from nnunet_ssl.plans.planner import (
    CONFIGURATION,
    SwinPlanner,
    SwinPlanSettings,
    coarsening_hint,
    summarize_plans,
)

logger = logging.getLogger(__name__)


def check_plans_file_is_ours(plans_file: Path) -> None:
    """Refuse to overwrite a plans file that this planner did not write."""
    if not plans_file.is_file():
        return
    try:
        plans = json.loads(plans_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{plans_file} exists and is not valid JSON ({error}); move it away first") from error
    if plans.get("experiment_planner_used") != SwinPlanner.__name__:
        raise FileExistsError(
            f"{plans_file} exists and was written by {plans.get('experiment_planner_used')!r}, not `nnunet-ssl plan`; "
            "choose another --plans-name (nothing was changed)"
        )


def plan_and_preprocess(dataset: str, settings: SwinPlanSettings, num_processes: int = 2,
                        verify: bool = False) -> dict:
    """Plan ``dataset`` with the paper's settings and preprocess its ``3d_fullres`` data.

    Returns the plans dict as saved (``$nnUNet_preprocessed/<Dataset>/<plans_name>.json``).
    """
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset, preprocess_dataset
    from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id

    name = dataset_name(dataset)
    dataset_id = convert_dataset_name_to_id(name)
    folder = preprocessed_dataset_folder(name)
    plans_file = folder / f"{settings.plans_name}.json"
    check_plans_file_is_ours(plans_file)

    if (folder / "dataset_fingerprint.json").is_file() and not verify:
        logger.info("reusing the dataset fingerprint in %s", folder)
    else:
        logger.info("extracting the dataset fingerprint of %s", name)
        extract_fingerprint_dataset(dataset_id, num_processes=num_processes, check_dataset_integrity=verify,
                                    clean=False, verbose=False)
    logger.info("planning %s with %s", name, SwinPlanner.__name__)
    planner = SwinPlanner(name, settings)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        planner.plan_experiment()  # nnU-Net prints its own intermediate configurations, before our patch and batch
    logger.debug("nnU-Net's planner printed (before the Swin settings were applied):\n%s", printed.getvalue())
    logger.info("preprocessing %s (%s) into %s", name, CONFIGURATION, folder)
    preprocess_dataset(dataset_id, settings.plans_name, [CONFIGURATION], [num_processes])
    plans = json.loads(plans_file.read_text(encoding="utf-8"))
    logger.info("%s", summarize_plans(plans, settings))
    fingerprint = json.loads((folder / "dataset_fingerprint.json").read_text(encoding="utf-8"))
    hint = coarsening_hint(fingerprint.get("spacings", []), settings, str(dataset_id))
    if hint:
        logger.warning("%s", hint)
    logger.info("%s", training_hint(dataset_id, settings))
    return plans


def trainers_of_preset(preset: str) -> list[str]:
    """Named trainers that build ``preset``, the SMIT trainer first."""
    from nnunet_ssl.trainers.named import TRAINERS

    names = [name for name, cls in TRAINERS.items() if cls.preset_name == preset]
    return sorted(names, key=lambda n: (TRAINERS[n].method != "smit", n.endswith("_2epochs"), n))


def training_hint(dataset_id: int, settings: SwinPlanSettings) -> str:
    """The closing line of ``nnunet-ssl plan``: the nnUNetv2_train command with a trainer of the planned preset."""
    trainers = trainers_of_preset(settings.preset)
    if not trainers:
        return (f"no named trainer builds preset {settings.preset!r}; `nnunet-ssl trainers` lists the trainers "
                "and their presets")
    others = f" (other trainers of preset {settings.preset}: `nnunet-ssl trainers`)" if len(trainers) > 1 else ""
    return (f"train with: `nnUNetv2_train {dataset_id} {CONFIGURATION} FOLD -tr {trainers[0]} -p {settings.plans_name}`"
            f"{others}")

"""``nnunet-ssl plan``: fingerprint (if needed), plan with :class:`SwinPlanner` or :class:`ResEncSSLPlanner`, preprocess.

All through nnU-Net's API, so the preprocessed data and the plans file are nnU-Net's own and
``nnUNetv2_train ... -p <plans_name>`` and ``nnUNetv2_predict ... -p <plans_name>`` use them. The
settings' type chooses the family: :class:`SwinPlanSettings` (``--family swin``, the default) or
:class:`ResEncPlanSettings` (``--family resenc``).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

from nnunet_ssl.case_ids import check_case_id, check_file_ending
from nnunet_ssl.nnunet_paths import dataset_name, preprocessed_dataset_folder, raw_dataset_folder
from nnunet_ssl.plans.planner import (
    CONFIGURATION,
    SwinPlanner,
    SwinPlanSettings,
    coarsening_hint,
    summarize_plans,
)
from nnunet_ssl.plans.resenc_planner import ResEncPlanSettings, ResEncSSLPlanner, summarize_resenc_plans

logger = logging.getLogger(__name__)


def check_plans_file_is_ours(plans_file: Path, planner: type = SwinPlanner) -> None:
    """Refuse to overwrite a plans file that ``planner`` did not write (another family's, or nnU-Net's)."""
    if not plans_file.is_file():
        return
    try:
        plans = json.loads(plans_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{plans_file} exists and is not valid JSON ({error}); move it away first") from error
    if plans.get("experiment_planner_used") != planner.__name__:
        raise FileExistsError(
            f"{plans_file} exists and was written by {plans.get('experiment_planner_used')!r}, not `nnunet-ssl plan` "
            f"with {planner.__name__}; choose another --plans-name (nothing was changed)"
        )


def raw_case_identifiers(raw_folder: Path) -> list[str]:
    """The training case identifiers nnU-Net will write files for, each checked to be a plain file name.

    Derived as nnU-Net 2.8's ``get_filenames_of_train_images_and_targets`` does, without opening an
    image: the keys of ``dataset.json``'s ``"dataset"`` mapping when it has one, else the ``imagesTr``
    file names without ``_XXXX<file_ending>``. Preprocessing writes ``<data folder>/<identifier>.b2nd``
    and ``gt_segmentations/<identifier><file_ending>``, so ``"../../x"`` would write outside the dataset.

    Raises:
        FileNotFoundError: when ``dataset.json`` does not exist.
        ValueError: when it is not a JSON object; CaseIdError when an identifier or the file ending is unsafe.
    """
    from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder

    path = raw_folder / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; `nnunet-ssl plan` plans the raw dataset in nnUNet_raw")
    try:
        dataset_json = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from error
    if not isinstance(dataset_json, dict):
        raise ValueError(f"{path} is not a JSON object")
    file_ending = check_file_ending(dataset_json.get("file_ending"), path)
    if "dataset" in dataset_json:
        cases = dataset_json["dataset"]
        if not isinstance(cases, dict):
            raise ValueError(f"{path}: 'dataset' must map case identifiers to their files")
        return [check_case_id(case, path, "a key of 'dataset'") for case in cases]
    images = raw_folder / "imagesTr"
    if not images.is_dir():
        raise FileNotFoundError(f"{images} does not exist (and {path} has no 'dataset' mapping)")
    identifiers = [str(i) for i in get_identifiers_from_splitted_dataset_folder(str(images), file_ending)]
    return [check_case_id(case, images) for case in identifiers]


def plan_and_preprocess(dataset: str, settings: SwinPlanSettings | ResEncPlanSettings, num_processes: int = 2,
                        verify: bool = False) -> dict:
    """Plan ``dataset`` with the settings' family and preprocess its ``3d_fullres`` data.

    Returns the plans dict as saved (``$nnUNet_preprocessed/<Dataset>/<plans_name>.json``).

    Raises:
        PlanRefusal: (ResEnc) the data cannot hold the smallest patch at 1 mm; nothing was preprocessed.
    """
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset, preprocess_dataset
    from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id

    name = dataset_name(dataset)
    dataset_id = convert_dataset_name_to_id(name)
    folder = preprocessed_dataset_folder(name)
    plans_file = folder / f"{settings.plans_name}.json"
    planner_class: type[SwinPlanner] | type[ResEncSSLPlanner] = \
        ResEncSSLPlanner if isinstance(settings, ResEncPlanSettings) else SwinPlanner
    check_plans_file_is_ours(plans_file, planner_class)
    # nnU-Net's planning copies this dataset.json next to the plans, and preprocessing names its files
    # after these identifiers: refuse unsafe ones before anything is written
    raw_case_identifiers(raw_dataset_folder(name))

    if (folder / "dataset_fingerprint.json").is_file() and not verify:
        logger.info("reusing the dataset fingerprint in %s", folder)
    else:
        logger.info("extracting the dataset fingerprint of %s", name)
        extract_fingerprint_dataset(dataset_id, num_processes=num_processes, check_dataset_integrity=verify,
                                    clean=False, verbose=False)
    logger.info("planning %s with %s", name, planner_class.__name__)
    planner = ResEncSSLPlanner(name, settings) if isinstance(settings, ResEncPlanSettings) else SwinPlanner(name, settings)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        planner.plan_experiment()  # nnU-Net prints its own intermediate configurations, before our settings
    logger.debug("nnU-Net's planner printed (before the plugin's settings were applied):\n%s", printed.getvalue())
    logger.info("preprocessing %s (%s) into %s", name, CONFIGURATION, folder)
    preprocess_dataset(dataset_id, settings.plans_name, [CONFIGURATION], [num_processes])
    plans = json.loads(plans_file.read_text(encoding="utf-8"))
    if isinstance(settings, ResEncPlanSettings):
        logger.info("%s", summarize_resenc_plans(plans))
        return plans
    logger.info("%s", summarize_plans(plans, settings))
    fingerprint = json.loads((folder / "dataset_fingerprint.json").read_text(encoding="utf-8"))
    hint = coarsening_hint(fingerprint.get("spacings", []), settings, str(dataset_id))
    if hint:
        logger.warning("%s", hint)
    return plans

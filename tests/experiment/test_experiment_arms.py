"""Arms with their own plans and preset: one grid can compare networks planned differently on the same folds."""
from __future__ import annotations

from pathlib import Path

import pytest
from test_experiment import MANIFEST, write_experiment

from nnunet_ssl.experiment.grid import build_grid, experiment_paths, setting_folds
from nnunet_ssl.experiment.spec import ExperimentError, experiment_plans, load_experiment, trainer_name


def test_an_arm_trains_with_its_own_plans_and_preset(tmp_path: Path) -> None:
    arms = [{"name": "scratch"},
            {"name": "tiny_scratch", "preset": "tiny", "plans": "nnUNetOtherPlans"},
            {"name": "simmim", "method": "simmim", "pretraining_run": "runs/simmim", "plans": "nnUNetOtherPlans"}]
    experiment = load_experiment(write_experiment(tmp_path, arms=arms))
    assert experiment_plans(experiment) == ["nnUNetPlans", "nnUNetOtherPlans"]
    assert [trainer_name(experiment, arm) for arm in experiment.arms] == [
        "SwinScratchTrainer", "SwinScratchTrainer_tiny_16epochs", "SwinSimMIMTrainer"]
    paths = experiment_paths(experiment, "Dataset777_Fake")
    jobs = build_grid(experiment, paths, setting_folds(experiment, MANIFEST), None, ".nii.gz")
    by_id = {job.id: job for job in jobs}

    def plans_argument(command: tuple[str, ...]) -> str:
        return command[command.index("-p") + 1]

    assert plans_argument(by_id["train-scratch-full-fold0"].command) == "nnUNetPlans"
    tiny = by_id["train-tiny_scratch-full-fold0"]
    assert plans_argument(tiny.command) == "nnUNetOtherPlans"
    assert tiny.finished == (paths.results_root("tiny_scratch") / "Dataset777_Fake"
                             / "SwinScratchTrainer_tiny_16epochs__nnUNetOtherPlans__3d_fullres" / "fold_0" / "checkpoint_final.pth")
    assert plans_argument(by_id["export-simmim"].command) == "nnUNetOtherPlans"  # exported for the plans it trains with
    folds = {(j.setting, j.fold) for j in jobs if j.kind == "train" and j.arm == "scratch"}
    assert folds == {(j.setting, j.fold) for j in jobs if j.kind == "train" and j.arm == "tiny_scratch"}


@pytest.mark.parametrize(("arm", "message"), [
    ({"name": "a", "plans": "../escape"}, r"arms\[0\]\.plans must be a name"),
    ({"name": "a", "preset": ["tiny"]}, r"arms\[0\]\.preset must be a name"),
    ({"name": "a", "preset": "nosuch"}, "arm a: 0 named trainers for method scratch with preset nosuch"),
])
def test_bad_arm_plans_or_preset_are_refused_naming_the_field(tmp_path: Path, arm: dict, message: str) -> None:
    with pytest.raises(ExperimentError, match=message):
        load_experiment(write_experiment(tmp_path, arms=[arm]))


def test_arms_of_both_families_get_their_trainers_and_plans(tmp_path: Path) -> None:
    """A Swin experiment with ResEnc arms: the arm's preset picks the ResEnc trainer of its schedule and, without
    plans of its own, the plans `nnunet-ssl plan --family resenc` writes."""
    (tmp_path / "spark3d.pt").write_bytes(b"weights")
    arms = [{"name": "swin_scratch"}, {"name": "smit", "method": "smit", "weights": "smit.pt"},
            {"name": "resenc_scratch", "preset": "resenc_l"},
            {"name": "spark3d", "method": "spark3d", "weights": "spark3d.pt", "preset": "resenc_l"},
            {"name": "spark3d_cpu", "method": "spark3d", "weights": "spark3d.pt", "preset": "resenc_tiny",
             "plans": "MyTinyPlans"},
            {"name": "dyn", "trainer": "ResEncScratchTrainer", "preset": "resenc_l", "plans": "nnUNetResEncUNetLPlans"}]
    experiment = load_experiment(write_experiment(tmp_path, arms=arms, plans="nnUNetSwinPlans"))
    assert [trainer_name(experiment, arm) for arm in experiment.arms] == [
        "SwinScratchTrainer", "SwinSMITTrainer", "ResEncScratchTrainer", "ResEncSpark3DTrainer",
        "ResEncSpark3DTrainer_16epochs", "ResEncScratchTrainer"]
    assert experiment_plans(experiment) == ["nnUNetSwinPlans", "nnUNetResEncSSLPlans", "MyTinyPlans",
                                            "nnUNetResEncUNetLPlans"]
    wrong = [{"name": "x", "method": "spark3d", "weights": "spark3d.pt", "trainer": "SwinSMITTrainer"}]
    with pytest.raises(ExperimentError, match="trainer SwinSMITTrainer is for smit, the arm's method is spark3d"):
        load_experiment(write_experiment(tmp_path, arms=wrong))


def test_prepare_names_the_arms_whose_plans_are_missing_and_the_split_field(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from test_splits import fake_preprocessed_dataset

    from nnunet_ssl.experiment.runner import prepare

    preprocessed = tmp_path / "preprocessed"
    fake_preprocessed_dataset(preprocessed)
    monkeypatch.setenv("nnUNet_preprocessed", str(preprocessed))
    arms = [{"name": "scratch"}, {"name": "resenc_scratch", "preset": "resenc_l"}]
    with pytest.raises(ExperimentError, match=r"plans 'nnUNetResEncSSLPlans' \(arms resenc_scratch\).*--family resenc"):
        prepare(load_experiment(write_experiment(tmp_path, arms=arms)))
    too_many = {"few_shot": {"shots": [50]}}
    with pytest.raises(ExperimentError, match=r"exp.yaml: settings.few_shot: .*50"):
        prepare(load_experiment(write_experiment(tmp_path, arms=[{"name": "scratch"}], settings=too_many)))


def test_cka_rows_of_both_families_get_one_table_each() -> None:
    from types import SimpleNamespace

    from nnunet_ssl.analysis.tables import cka_markdown
    from nnunet_ssl.experiment.report import CKARow

    swin = [f"stage{s}.block2" for s in range(1, 5)]
    resenc = ["stage1.block1", "stage2.block3", "stage3.block4", "stage4.block6", "stage5.block6", "stage6.block6"]
    rows = [CKARow("smit", "few_shot5", swin, [1.0, 0.9, 0.8, 0.7], 3),
            CKARow("spark3d", "few_shot5", resenc, [1.0, 0.95, 0.9, 0.85, 0.8, 0.75], 3)]
    text = cka_markdown(SimpleNamespace(cka=rows, cka_note=""))
    headers = [line for line in text.splitlines() if line.startswith("| arm")]
    assert headers == ["| arm | setting | " + " | ".join(swin) + " | runs |",
                       "| arm | setting | " + " | ".join(resenc) + " | runs |"]
    assert "| spark3d | few_shot5 | 1.000 | 0.950 | 0.900 | 0.850 | 0.800 | 0.750 | 3 |" in text

"""nnunet-ssl experiment without nnU-Net runs: the file's validation, the grid, its shell forms, the tables' statistics."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from test_splits import fake_preprocessed_dataset

from nnunet_ssl.analysis.curves import epochs_to_fraction
from nnunet_ssl.analysis.stats import holm
from nnunet_ssl.experiment.emit import array_tasks, job_line, render
from nnunet_ssl.experiment.grid import (
    FRESH,
    RESUME,
    SKIP,
    VALIDATE,
    SettingFolds,
    build_grid,
    decide,
    experiment_paths,
    setting_folds,
)
from nnunet_ssl.experiment.runner import BLOCKED, DONE, FAILED, run_jobs
from nnunet_ssl.experiment.spec import (
    ExperimentError,
    experiment_from_dict,
    experiment_plans,
    load_experiment,
    trainer_name,
)
from nnunet_ssl.splits import FoldEntry


def write_experiment(tmp_path: Path, **changes) -> Path:
    (tmp_path / "smit.pt").write_bytes(b"weights")
    (tmp_path / "runs" / "simmim").mkdir(parents=True, exist_ok=True)
    data = {
        "dataset": 777, "plans": "nnUNetPlans", "device": "cpu", "seed": 3,
        "arms": [{"name": "scratch"}, {"name": "smit", "method": "smit", "weights": "smit.pt"},
                 {"name": "simmim", "method": "simmim", "pretraining_run": "runs/simmim"}],
        "settings": {"few_shot": {"shots": [3, 5], "seeds": [0, 1]}, "full": {"folds": [0, 1]}},
        "epochs": {"few_shot": 4},
        "env": {"nnUNet_n_proc_DA": 1},
    }
    data.update(changes)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_valid_file_and_relative_paths(tmp_path: Path) -> None:
    experiment = load_experiment(write_experiment(tmp_path))
    assert experiment.dataset == "777" and experiment.seed == 3
    assert experiment.arm("smit").weights == tmp_path / "smit.pt"
    assert experiment.arm("simmim").pretraining_run == tmp_path / "runs" / "simmim"
    assert experiment.output == tmp_path / "exp_out"
    assert experiment.few_shot.sizes == (3, 5) and experiment.full_folds == (0, 1)
    assert experiment.env == (("nnUNet_n_proc_DA", "1"),)


@pytest.mark.parametrize(("change", "message"), [
    ({"dataset": None}, "dataset"),
    ({"arms": []}, "arms"),
    ({"arms": [{"name": "a b"}]}, r"arms\[0\].name"),
    ({"arms": [{"name": "x"}, {"name": "x"}]}, "used twice"),
    ({"arms": [{"name": "m", "method": "nosuch", "weights": "smit.pt"}]}, r"arms\[0\].method 'nosuch'"),
    ({"arms": [{"name": "m", "method": "smit"}]}, "exactly one of weights"),
    ({"arms": [{"name": "m", "method": "smit", "weights": "absent.pt"}]}, r"arms\[0\].weights .* does not exist"),
    ({"arms": [{"name": "m", "weights": "smit.pt"}]}, "no method"),
    ({"arms": [{"name": "m", "colour": "red"}]}, r"arms\[0\].colour"),
    ({"settings": {}}, "settings must name"),
    ({"settings": {"few_shot": {"shots": [0]}}}, "settings.few_shot.shots"),
    ({"settings": {"few_shot": {"seeds": [0]}}}, r"settings.few_shot.shots is required"),
    ({"settings": {"full": {"folds": [7]}}}, "settings.full.folds"),
    ({"settings": {"few_shot": {"shots": [3]}, "fewshot": {}}}, "settings.fewshot"),
    ({"test_set": {"images": "nowhere"}}, "test_set"),
    ({"test_set": {"images": "nowhere", "labels": "nowhere"}}, "test_set.images"),
    ({"epochs": {"full": 0}}, "epochs.full"),
    ({"seed": -1}, "seed"),
    ({"device": "tpu"}, "device"),
    ({"trainer_variant": "_tiny_2epochs"}, "trainer_variant is no longer read.*preset: tiny"),
    ({"preset": "tiny"}, r"arm simmim: 0 named trainers for method simmim with preset tiny.*have preset smit; of preset "
                         r"tiny: SwinScratchTrainer_tiny_16epochs \(scratch\), SwinSMITTrainer_tiny_16epochs \(smit\)"),
    ({"arms": [{"name": "s", "trainer": "SwinScratchTrainer_nosuch"}]}, r"arm s: trainer: no trainer 'SwinScratchTrainer_nosuch'"),
    ({"arms": [{"name": "s", "trainer": "SwinSMITTrainer"}]}, r"trainer SwinSMITTrainer is for smit, the arm's method is scratch"),
    ({"env": {"NNUNET_SSL_SEED": 1}}, "env sets"),
    ({"learning_rate": 1}, "unknown field"),
])
def test_bad_fields_are_named(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(ExperimentError, match=message) as error:
        load_experiment(write_experiment(tmp_path, **change))
    assert "exp.yaml" in str(error.value)


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("arms: [unclosed\n", encoding="utf-8")
    with pytest.raises(ExperimentError, match="bad.yaml"):
        load_experiment(tmp_path / "bad.yaml")
    with pytest.raises(FileNotFoundError):
        load_experiment(tmp_path / "absent.yaml")


def test_new_methods_need_no_code_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An arm's trainer is looked up by method in the trainer registry; methods come from METHODS."""
    from nnunet_ssl.pretraining import methods

    monkeypatch.setitem(methods.METHODS, "dino", methods.METHODS["smit"])
    experiment = experiment_from_dict(
        {"dataset": 1, "arms": [{"name": "dino", "method": "dino", "weights": "smit.pt"}], "settings": {"full": {}}},
        write_experiment(tmp_path),
    )
    from nnunet_ssl.experiment.spec import trainer_name

    assert trainer_name(experiment, experiment.arm("dino")) == "SwinDINOTrainer"


def test_arm_trainers_from_the_preset_or_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """preset: tiny gives the CPU-trial trainers; a trainer of one's own is named in the arm and found in
    nnUNet_extTrainer's folders, as nnUNetv2_train will find it."""
    from nnunet_ssl.experiment.spec import trainer_name

    arms = [{"name": "scratch"}, {"name": "smit", "method": "smit", "weights": "smit.pt"}]
    tiny = load_experiment(write_experiment(tmp_path, preset="tiny", arms=arms))
    assert [trainer_name(tiny, arm) for arm in tiny.arms] == ["SwinScratchTrainer_tiny_16epochs",
                                                             "SwinSMITTrainer_tiny_16epochs"]
    own = [{"name": "scratch", "trainer": "SwinScratchTrainer_tiny_2epochs"},
           {"name": "smit", "method": "smit", "weights": "smit.pt", "trainer": "SwinSMITTrainer_tiny_2epochs"}]
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)  # the tests' own trainers are not named trainers
    with pytest.raises(ExperimentError, match=r"arm scratch: trainer: no trainer 'SwinScratchTrainer_tiny_2epochs'"):
        load_experiment(write_experiment(tmp_path, arms=own))


def test_arm_trainer_of_ones_own_through_nnunet_ext_trainer(tmp_path: Path, test_trainers: None) -> None:
    from nnunet_ssl.experiment.spec import trainer_name

    own = [{"name": "scratch", "trainer": "SwinScratchTrainer_tiny_2epochs"},
           {"name": "smit", "method": "smit", "weights": "smit.pt", "trainer": "SwinSMITTrainer_tiny_2epochs"}]
    experiment = load_experiment(write_experiment(tmp_path, arms=own))
    assert [trainer_name(experiment, arm) for arm in experiment.arms] == ["SwinScratchTrainer_tiny_2epochs",
                                                                         "SwinSMITTrainer_tiny_2epochs"]
    wrong = [{"name": "smit", "method": "smit", "weights": "smit.pt", "trainer": "SwinDINOTrainer_tiny_2epochs"}]
    with pytest.raises(ExperimentError, match="trainer SwinDINOTrainer_tiny_2epochs is for dino, the arm's method is smit"):
        load_experiment(write_experiment(tmp_path, arms=wrong))


MANIFEST = [FoldEntry(5 + i, "few_shot", size, seed, [], []) for i, (size, seed) in
            enumerate([(3, 0), (5, 0), (3, 1), (5, 1)])]


def grid(tmp_path: Path, **changes):
    experiment = load_experiment(write_experiment(tmp_path, **changes))
    paths = experiment_paths(experiment, "Dataset777_Fake")
    settings = setting_folds(experiment, MANIFEST)
    return experiment, paths, settings, build_grid(experiment, paths, settings, None, ".nii.gz")


def test_grid_jobs_and_dependencies(tmp_path: Path) -> None:
    experiment, paths, settings, jobs = grid(tmp_path)
    assert [(s.label, s.folds) for s in settings] == [("full", {0: 0, 1: 1}), ("few_shot3", {5: 0, 7: 1}),
                                                       ("few_shot5", {6: 0, 8: 1})]
    assert [j.id for j in jobs if j.kind == "export"] == ["export-simmim"]
    trains = [j for j in jobs if j.kind == "train"]
    assert len(trains) == 3 * (2 + 2 + 2) and len({j.id for j in jobs}) == len(jobs)
    smit = next(j for j in trains if j.id == "train-smit-few_shot3-fold7")
    assert smit.command[:4] == ("nnUNetv2_train", "777", "3d_fullres", "7")
    assert smit.command[-2:] == ("-pretrained_weights", str(tmp_path / "smit.pt"))
    assert dict(smit.env) == {"nnUNet_results": str(paths.results_root("smit")), "NNUNET_SSL_SEED": "3",
                              "NNUNET_SSL_EPOCHS": "4", "nnUNet_n_proc_DA": "1"}
    simmim = next(j for j in trains if j.id == "train-simmim-full-fold0")
    assert simmim.depends == ("export-simmim",) and "NNUNET_SSL_EPOCHS" not in dict(simmim.env)
    assert simmim.command[-1] == str(paths.weights("simmim"))
    position = {j.id: i for i, j in enumerate(jobs)}
    assert all(position[d] < position[j.id] for j in jobs for d in j.depends)
    with pytest.raises(ExperimentError, match="seed 2"):
        setting_folds(load_experiment(write_experiment(
            tmp_path, settings={"few_shot": {"shots": [3], "seeds": [2]}})), MANIFEST)


def test_decide_and_shell_agree_on_every_state(tmp_path: Path) -> None:
    """The runner's decision and the emitted line's if-chain pick the same command in every file state."""
    _, _, _, jobs = grid(tmp_path)
    job = next(j for j in jobs if j.id == "train-smit-full-fold1")
    fold = job.finished.parent
    states = {
        FRESH: [],
        RESUME: ["checkpoint_latest.pth"],
        VALIDATE: ["checkpoint_latest.pth", "checkpoint_final.pth"],
        SKIP: ["checkpoint_final.pth", "validation/summary.json"],
    }
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("nnUNetv2_train", "nnUNetv2_predict", "nnunet-ssl"):  # stand-ins that print their arguments
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*"\n', encoding="utf-8")
        (bin_dir / tool).chmod(0o755)
    for expected, files in states.items():
        for name in ("checkpoint_latest.pth", "checkpoint_final.pth", "validation/summary.json"):
            (fold / name).unlink(missing_ok=True)
        for name in files:
            (fold / name).parent.mkdir(parents=True, exist_ok=True)
            (fold / name).write_bytes(b"")
        action, argv = decide(job)
        assert action == expected
        job.log.parent.mkdir(parents=True, exist_ok=True)
        job.log.unlink(missing_ok=True)
        subprocess.run(["sh", "-c", job_line(job)], check=True, env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
        logged = job.log.read_text(encoding="utf-8").strip()
        assert logged == (f"{job.id}: already done" if argv is None else " ".join(argv)), expected


def test_emitted_formats_cover_the_same_jobs(tmp_path: Path) -> None:
    experiment, _, _, jobs = grid(tmp_path)
    by_id = {j.id: j for j in jobs}
    commands = render(jobs, experiment, "commands")
    lines = [line for line in commands.splitlines() if line.startswith("{ ")]
    assert lines == [job_line(j, [by_id[d] for d in j.depends]) for j in jobs]
    slurm = render(jobs, experiment, "slurm")
    tasks = array_tasks(jobs)
    assert f"#SBATCH --array=0-{len(tasks) - 1}" in slurm
    assert len(tasks) == sum(j.kind == "train" for j in jobs)
    for index, task in enumerate(tasks):  # each task names its jobs for the runner
        assert f"  {index}) jobs=({' '.join('--job ' + j.id for j in task)}) ;;" in slurm
    assert {j.id for task in tasks for j in task} == set(by_id)
    assert all(task[0].kind == "export" for task in tasks if any(j.arm == "simmim" for j in task))
    subprocess.run(["bash", "-n"], input=slurm, text=True, check=True)  # valid bash
    subprocess.run(["sh", "-n"], input=commands, text=True, check=True)


def test_runner_records_failures_and_blocks_dependents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nnunet_ssl.experiment.grid import Job

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ok").write_text('#!/bin/sh\ntouch "$1"\n', encoding="utf-8")
    (bin_dir / "fail").write_text("#!/bin/sh\necho broken >&2\nexit 3\n", encoding="utf-8")
    for tool in ("ok", "fail"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    logs = tmp_path / "logs"
    jobs = [
        Job("a", "train", "x", (), ("ok", str(tmp_path / "a.done")), (tmp_path / "a.done",), logs / "a.log"),
        Job("b", "train", "x", (), ("fail",), (tmp_path / "b.done",), logs / "b.log"),
        Job("c", "predict", "x", (), ("ok", str(tmp_path / "c.done")), (tmp_path / "c.done",), logs / "c.log",
            depends=("b",)),
        Job("d", "predict", "x", (), ("ok", str(tmp_path / "d.done")), (tmp_path / "d.done",), logs / "d.log",
            depends=("a",)),
    ]
    status = run_jobs(jobs, 2, tmp_path / "jobs.json", progress=False)
    assert {k: v[0] for k, v in status.items()} == {"a": DONE, "b": FAILED, "c": BLOCKED, "d": DONE}
    assert "exit 3" in status["b"][1] and "broken" in (logs / "b.log").read_text(encoding="utf-8")
    assert json.loads((tmp_path / "jobs.json").read_text(encoding="utf-8"))["c"]["status"] == BLOCKED
    again = run_jobs(jobs, 1, tmp_path / "jobs.json", progress=False)
    assert again["a"][0] == "skipped" and again["d"][0] == "skipped"


def test_holm_by_hand() -> None:
    # sorted 0.01, 0.02, 0.04 with m = 3: 0.03, max(0.03, 0.04) = 0.04, max(0.04, 0.04) = 0.04
    assert holm([0.04, 0.01, None, 0.02]) == pytest.approx([0.04, 0.03, None, 0.04])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


def test_epochs_to_ninety_percent() -> None:
    assert epochs_to_fraction([0.1, 0.5, 0.7, 0.8, 0.8]) == 4  # 90 % of 0.8 = 0.72: first reached at epoch 4
    assert epochs_to_fraction([0.1, 0.75, 0.7, 0.8]) == 2
    assert epochs_to_fraction([0.2, float("nan"), 0.9, 1.0]) == 3
    assert epochs_to_fraction([0.1, 0.0]) is None and epochs_to_fraction([]) is None


def test_setting_folds_labels() -> None:
    assert SettingFolds("few_shot", 5, {5: 0}).label == "few_shot5"
    assert SettingFolds("full", None, {0: 0}).title.startswith("full data")


def test_splits_made_by_prepare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """experiment run/emit make the few-shot folds with nnunet-ssl split's code and use their indices."""
    from nnunet_ssl.experiment.runner import prepare

    root = tmp_path / "pre"
    folder = fake_preprocessed_dataset(root)
    (folder / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1}, "file_ending": ".nii.gz"}), encoding="utf-8")
    monkeypatch.setenv("nnUNet_preprocessed", str(root))
    monkeypatch.delenv("nnUNet_raw", raising=False)
    path = write_experiment(tmp_path, dataset="Dataset777_Fake",
                            settings={"few_shot": {"shots": [3], "seeds": [0, 1]}, "full": {"folds": [0]}})
    prepared = prepare(load_experiment(path))
    manifest = json.loads((folder / "splits_manifest.json").read_text(encoding="utf-8"))
    assert [(f["fold"], f["size"], f["seed"]) for f in manifest["folds"]] == [(5, 3, 0), (6, 3, 1)]
    assert [s.folds for s in prepared.settings] == [{0: 0}, {5: 0, 6: 1}]
    assert prepare(load_experiment(path)).jobs == prepared.jobs  # idempotent
    bad = write_experiment(tmp_path, dataset="Dataset777_Fake", plans="OtherPlans")
    with pytest.raises(ExperimentError, match="OtherPlans"):
        prepare(load_experiment(bad))


def _fake_fold(fold_dir: Path, cases: list[str], dice: dict[str, tuple[float, float]], ema: list[float]) -> None:
    """A finished nnU-Net fold: checkpoint_final.pth with a training log, validation/summary.json."""
    import torch

    (fold_dir / "validation").mkdir(parents=True)
    torch.save({"logging": {"ema_fg_dice": ema, "mean_fg_dice": ema}}, fold_dir / "checkpoint_final.pth")
    per_case = [{"reference_file": f"/gt/{c}.nii.gz", "prediction_file": f"/p/{c}.nii.gz",
                 "metrics": {"1": {"Dice": dice[c][0]}, "2": {"Dice": dice[c][1]}}} for c in cases]
    (fold_dir / "validation" / "summary.json").write_text(json.dumps({"metric_per_case": per_case}), encoding="utf-8")


def test_report_tables_by_hand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two arms, full fold 0 and 3-shot x 2 seeds with one SMIT seed missing: means, sd, gap, Wilcoxon, Holm."""
    import numpy as np
    from scipy.stats import wilcoxon

    from nnunet_ssl.experiment.report import make_experiment_report
    from nnunet_ssl.experiment.runner import prepare

    root = tmp_path / "pre"
    folder = fake_preprocessed_dataset(root)
    (folder / "dataset.json").write_text(json.dumps(
        {"labels": {"background": 0, "liver": 1, "spleen": 2}, "file_ending": ".nii.gz"}), encoding="utf-8")
    monkeypatch.setenv("nnUNet_preprocessed", str(root))
    monkeypatch.delenv("nnUNet_raw", raising=False)
    path = write_experiment(tmp_path, dataset="Dataset777_Fake", preset="tiny", arms=[
        {"name": "scratch"}, {"name": "smit", "method": "smit", "weights": "smit.pt"}],
        settings={"full": {"folds": [0]}, "few_shot": {"shots": [3], "seeds": [0, 1]}})
    experiment = load_experiment(path)
    prepared = prepare(experiment)
    val = json.loads((folder / "splits_final.json").read_text(encoding="utf-8"))[0]["val"]
    index = {c: i for i, c in enumerate(sorted(val))}

    def dice(arm: str, fold: int, case: str) -> tuple[float, float]:
        i = index[case]
        smit = arm == "smit"
        return (0.5 + 0.01 * i + (0.1 + 0.003 * i * i if smit else 0) + (0.02 if fold == 6 else 0),
                0.4 + 0.005 * i + (0.05 if smit else 0))

    folds = {"full": 0, "seed0": 5, "seed1": 6}
    assert prepared.settings[1].folds == {5: 0, 6: 1}
    for arm in ("scratch", "smit"):
        trainer = "SwinScratchTrainer_tiny_16epochs" if arm == "scratch" else "SwinSMITTrainer_tiny_16epochs"
        for fold in folds.values():
            if (arm, fold) == ("smit", 6):
                continue  # never trained: must be listed, not averaged in
            _fake_fold(prepared.paths.fold_dir(arm, trainer, fold), val, {c: dice(arm, fold, c) for c in val},
                       [0.1, 0.5, 0.6] if arm == "scratch" else [0.3, 0.6, 0.6])

    report = make_experiment_report(experiment, cka=False)
    few = report.tables[1]
    assert few.setting.label == "few_shot3" and few.best == "smit"

    def run_mean(arm: str, fold: int) -> float:  # mean over structures of the mean over cases
        values = np.array([dice(arm, fold, c) for c in val])
        return float(values.mean(axis=0).mean())

    scratch, smit = few.arm("scratch"), few.arm("smit")
    scratch_runs = [run_mean("scratch", 5), run_mean("scratch", 6)]
    assert scratch.spread["overall"].mean == pytest.approx(np.mean(scratch_runs))
    assert scratch.spread["overall"].std == pytest.approx(np.std(scratch_runs, ddof=1))
    assert smit.spread["overall"].n == 1 and smit.spread["overall"].mean == pytest.approx(run_mean("smit", 5))
    assert scratch.gap_to_best["overall"] == pytest.approx(
        100 * (np.mean(scratch_runs) - run_mean("smit", 5)) / run_mean("smit", 5))
    # paired per case: smit's fold 5 vs scratch's mean over folds 5 and 6, overall = mean of the 2 structures
    differences = [np.mean(dice("smit", 5, c)) - np.mean([np.mean(dice("scratch", f, c)) for f in (5, 6)])
                   for c in sorted(val)]
    expected_p = wilcoxon(np.round(differences, 12)).pvalue
    assert scratch.p_best_holm["overall"] == pytest.approx(expected_p)  # one test in the family: Holm = raw
    assert smit.p_scratch_holm["overall"] == pytest.approx(expected_p)
    assert scratch.epochs_to_converge.mean == 3 and smit.epochs_to_converge.mean == 2
    text = report.markdown
    assert "smit ★" in text and "1/2" in text and "smit fold 6: missing" in text
    rows = list(__import__("csv").DictReader(open(prepared.paths.report / "tables.csv", encoding="utf-8")))
    overall = {(r["setting"], r["size"], r["arm"]): r for r in rows if r["structure"] == "overall"}
    assert float(overall[("few_shot", "3", "scratch")]["p_vs_best_holm"]) == pytest.approx(expected_p)
    assert overall[("full", "", "smit")]["best"] == "True"
    assert (prepared.paths.report / "few_shot.png").stat().st_size > 0
    assert "CKA not computed" in text
    # the transfer tables of the same runs, as nnunet-ssl report writes them, vs the scratch arm
    assert "## Mean Dice" in text and "scratch (reference)" in text
    stats_rows = list(__import__("csv").DictReader(open(prepared.paths.report / "stats.csv", encoding="utf-8")))
    few_overall = next(r for r in stats_rows if (r["setting"], r["trainer"], r["structure"]) == ("few_shot", "smit", "overall"))
    assert few_overall["reference"] == "scratch" and float(few_overall["p_value"]) == pytest.approx(expected_p)
    cases = list(__import__("csv").DictReader(open(prepared.paths.report / "dice_per_case.csv", encoding="utf-8")))
    assert {(r["trainer"], r["fold"]) for r in cases} == {("scratch", "0"), ("scratch", "5"), ("scratch", "6"),
                                                         ("smit", "0"), ("smit", "5")}
    for name in ("summary.csv", "few_shot.csv", "curves.csv", "curves.png", "losses.png"):
        assert f"`{name}`" in text or f"({name})" in text, name
        assert (prepared.paths.report / name).is_file(), name


def test_readme_experiment_file_is_valid(tmp_path: Path) -> None:
    """docs/experiment.md's complete experiment file for the few-shot protocol passes validation as written."""
    readme = (Path(__file__).resolve().parents[2] / "docs" / "experiment.md").read_text(encoding="utf-8")
    block = readme.split("# fewshot.yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "smit_501.pt").write_bytes(b"")
    (tmp_path / "runs" / "simmim").mkdir(parents=True)
    (tmp_path / "runs" / "spark3d").mkdir(parents=True)
    experiment = experiment_from_dict(yaml.safe_load(block), tmp_path / "fewshot.yaml")
    assert [a.name for a in experiment.arms] == ["scratch", "smit", "simmim", "resenc_scratch", "spark3d"]
    assert [trainer_name(experiment, a) for a in experiment.arms] == [
        "SwinScratchTrainer", "SwinSMITTrainer", "SwinSimMIMTrainer", "ResEncScratchTrainer", "ResEncSpark3DTrainer"]
    assert experiment_plans(experiment) == ["nnUNetSwinPlans", "nnUNetResEncSSLPlans"]
    assert experiment.few_shot.sizes == (5, 10, 20) and experiment.few_shot.seeds == (0, 1, 2)
    assert experiment.full_folds == (0, 1, 2, 3, 4) and experiment.epochs.few_shot is None  # the recipe's


def test_report_cka_few_shot_vs_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The report's feature-reuse table: an arm whose few-shot and full-data encoders are equal scores 1 per stage."""
    import numpy as np
    import SimpleITK as sitk
    import torch
    from test_cka_helpers import nnunet_plans as _plans

    from nnunet_ssl.experiment.report import make_experiment_report
    from nnunet_ssl.experiment.runner import prepare
    from nnunet_ssl.networks import PRESETS, SwinEncoder
    from nnunet_ssl.weights import build_weights_file

    root = tmp_path / "pre"
    folder = fake_preprocessed_dataset(root)
    dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1, "b": 2},
                    "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(dataset_json), encoding="utf-8")
    images = tmp_path / "raw" / "Dataset777_Fake" / "imagesTr"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        image = sitk.GetImageFromArray((rng.standard_normal((40, 48, 48)) * 100).astype(np.float32))
        sitk.WriteImage(image, str(images / f"case_{i:03d}_0000.nii.gz"))
    monkeypatch.setenv("nnUNet_preprocessed", str(root))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    path = write_experiment(tmp_path, dataset="Dataset777_Fake", preset="tiny", arms=[{"name": "scratch"}],
                            settings={"full": {"folds": [0]}, "few_shot": {"shots": [3], "seeds": [0]}})
    experiment = load_experiment(path)
    prepared = prepare(experiment)
    torch.manual_seed(1)
    payload = build_weights_file(SwinEncoder(PRESETS["tiny"]).state_dict(), "tiny", 1, 3, method="smit")
    splits = json.loads((folder / "splits_final.json").read_text(encoding="utf-8"))
    for fold in (0, 5):
        fold_dir = prepared.paths.fold_dir("scratch", "SwinScratchTrainer_tiny_16epochs", fold)
        _fake_fold(fold_dir, splits[fold]["val"], {c: (0.5, 0.5) for c in splits[fold]["val"]}, [0.2, 0.4])
        torch.save({"network_weights": payload["network_weights"], "trainer_name": "SwinScratchTrainer_tiny_16epochs",
                    "init_args": {"configuration": "3d_fullres"}, "logging": {"ema_fg_dice": [0.2, 0.4]}},
                   fold_dir / "checkpoint_final.pth")
        (fold_dir.parent / "plans.json").write_text(json.dumps(_plans(64)), encoding="utf-8")
        (fold_dir.parent / "dataset.json").write_text(json.dumps(dataset_json), encoding="utf-8")
    report = make_experiment_report(experiment, cka=True)
    assert len(report.cka) == 1
    row = report.cka[0]
    assert (row.arm, row.setting, row.pairs) == ("scratch", "few_shot3", 1)
    assert row.layers == [f"stage{s}.block2" for s in range(1, 5)]
    assert row.values == pytest.approx([1.0] * 4, abs=1e-6)
    assert "stage1.block2" in (prepared.paths.report / "cka.csv").read_text(encoding="utf-8")

"""End to end: `nnunet-ssl experiment run` on phantoms (interrupted once, resumed), the same grid as emitted
shell commands, and `experiment report` checked against nnU-Net's own evaluation.

The grid is the smallest example file, ``examples/cpu_smoke.yaml`` (2 arms: scratch; SMIT from a
pretraining run at ``runs/smit_tiny``, exported from its student by the grid), run as written except
for what the suite's budget changes (:data:`BUDGET`): nnU-Net's default plans instead of
``nnunet-ssl plan``'s, the tests' 2-epoch tiny trainers cut to 1 epoch (``epochs: {few_shot: 1}``)
instead of the 16-epoch CPU trial, 3 shots x 2 seeds instead of 5 shots x 1 seed (two folds per arm for
the interruption below), a 2-step pretraining run and a 1-case test set. The emitted commands are not re-run on a fresh
output folder (that would train everything twice): a plain shell loop runs them over the finished
output after one training was set back to ``checkpoint_latest.pth`` and one prediction was deleted,
and must skip every finished job, continue that training with ``--c`` and predict that case again,
leaving the same files as ``experiment run``.

Cost: 4 one-epoch trainings with validation (one continued with ``--c``), 5 one-case predictions, a 2-step
pretraining and one preprocessing: 286 s alone on 2 quiet cores (2026-11-29), 370 s beside the other
xdist worker in a fresh clone (2026-11-30). nnU-Net's evaluation runs in this process (its ``compute_metrics`` per case), not as
`nnUNetv2_evaluate_folder` commands, to spare 4 interpreter and worker-pool starts.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from nnunet_runner import BIN, NnUNet

from nnunet_ssl.data.phantoms import PhantomConfig

pytestmark = pytest.mark.e2e

#: The tests' own trainers (short_trainers), named in the arms and found through nnUNet_extTrainer.
SCRATCH = "SwinScratchTrainer_tiny_2epochs"
SMIT = "SwinSMITTrainer_tiny_2epochs"
LABELS = {"liver": 1, "spleen": 2, "kidney": 3, "lesion": 4}
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cpu_smoke.yaml"
#: Where the example expects its pretraining run, relative to the experiment file.
PRETRAINING_RUN = "runs/smit_tiny"
#: What the suite's budget changes in the example (see the module docstring); the rest runs as written.
BUDGET = {
    "plans": "nnUNetPlans", "output": "out", "epochs": {"few_shot": 1},
    "env": {"nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "1"},
    "settings": {"few_shot": {"shots": [3], "seeds": [0, 1]}},
    "arm_trainers": {"scratch": SCRATCH, "smit": SMIT},
}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> tuple[NnUNet, Path]:
    root = tmp_path_factory.mktemp("experiment")
    runner = NnUNet.with_phantoms(root, PhantomConfig(num_train=5, num_test=1, num_unlabeled=2, shape=(40, 64, 64)))
    runner.env["PATH"] = f"{BIN}{os.pathsep}{runner.env.get('PATH', '')}"
    runner.run(
        "nnunet-ssl", "pretrain", "--method", "smit", "--data", str(root / "unlabeled"), "--out", str(root / PRETRAINING_RUN),
        "--preset", "tiny", "--crop-size", "64", "--batch-size", "1", "--workers", "0", "--max-steps", "2",
        "--no-progress", "--set", "out_dim=64", "head_hidden_dim=64", "head_bottleneck_dim=32",
    )
    spec = budget_version(yaml.safe_load(EXAMPLE.read_text(encoding="utf-8")))
    path = root / "exp.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return runner, path


def budget_version(example: dict) -> dict:
    """The example with :data:`BUDGET` applied; every other key, and each arm's own keys, as the example has them."""
    assert [arm["name"] for arm in example["arms"]] == ["scratch", "smit"]
    assert example["arms"][1]["pretraining_run"] == PRETRAINING_RUN
    spec = {**example, **{key: value for key, value in BUDGET.items() if key != "arm_trainers"}}
    spec["arms"] = [{**arm, "trainer": BUDGET["arm_trainers"][arm["name"]]} for arm in example["arms"]]
    return spec


def test_the_budget_version_keeps_what_the_example_says() -> None:
    """What the run below proves about the example: only the budget's keys differ (and each arm gains its trainer)."""
    example = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    spec = budget_version(example)
    changed = sorted(key for key in spec if spec[key] != example.get(key))
    assert changed == sorted(["arms", *(key for key in BUDGET if key != "arm_trainers")])
    for arm, original in zip(spec["arms"], example["arms"], strict=True):
        assert {k: v for k, v in arm.items() if k != "trainer"} == original
    assert example["arms"][1]["export_from"] == "student" and example["preset"] == "tiny"


def _relative_files(folder: Path) -> set[str]:
    """Files nnU-Net and the grid leave, without the per-start training logs and the job logs."""
    return {
        str(p.relative_to(folder)) for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith("training_log_") and "logs" not in p.relative_to(folder).parts
        and p.name != "jobs.json" and "report" not in p.relative_to(folder).parts
    }


def _fold_dirs(out: Path) -> dict[tuple[str, int], Path]:
    return {
        (arm, fold): out / "results" / arm / "Dataset501_Phantom" / f"{trainer}__nnUNetPlans__3d_fullres" / f"fold_{fold}"
        for arm, trainer in (("scratch", SCRATCH), ("smit", SMIT)) for fold in (5, 6)
    }


def interrupt_run(nnunet: NnUNet, path: Path, deadline_s: float = 3600) -> None:
    """`experiment run`, killed with its nnU-Net children once the second training has started."""
    out = path.parent / "out"
    command = [str(BIN / "nnunet-ssl"), "experiment", "run", str(path), "--no-progress"]
    process = subprocess.Popen(command, env=nnunet.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    second = out / "logs" / "train-smit-few_shot3-fold5.log"
    deadline = time.monotonic() + deadline_s
    try:
        while not second.is_file() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert second.is_file(), "the second training never started"
    fold_dirs = _fold_dirs(out)
    assert (fold_dirs["scratch", 5] / "validation" / "summary.json").is_file()
    assert not (fold_dirs["smit", 5] / "checkpoint_final.pth").exists()


def resume_emit_report(nnunet: NnUNet, path: Path) -> None:
    """Resume the interrupted run, replay the emitted commands, and check the report against nnU-Net."""
    out = path.parent / "out"
    fold_dirs = _fold_dirs(out)

    # 2. resumed: the finished jobs are skipped, the rest run
    resumed = nnunet.run("nnunet-ssl", "experiment", "run", str(path), "--no-progress", timeout=3600)
    status = json.loads((out / "jobs.json").read_text(encoding="utf-8"))
    assert status["train-scratch-few_shot3-fold5"]["status"] == "skipped"
    assert status["predict-scratch-few_shot3-fold5"]["status"] == "skipped"
    assert status["export-smit"]["status"] == "skipped"  # exported before the interruption
    assert {v["status"] for k, v in status.items()} <= {"done", "skipped"}, status
    assert "9 job(s): " in resumed.stderr and " 0 failed" in resumed.stderr
    assert all((d / "validation" / "summary.json").is_file() for d in fold_dirs.values())
    log = (fold_dirs["smit", 6] / next(iter(sorted(p.name for p in fold_dirs["smit", 6].glob("training_log_*.txt")))))
    text = log.read_text(encoding="utf-8")
    assert "NNUNET_SSL_SEED=0" in text and "NNUNET_SSL_EPOCHS=1" in text and "Pretrained weights loaded" in text
    layout = _relative_files(out)

    # 3. the emitted commands, run by a plain shell loop, agree with `run` on every job
    jobs_sh = path.parent / "jobs.sh"
    nnunet.run("nnunet-ssl", "experiment", "emit", str(path), "--format", "commands", "--out", str(jobs_sh))
    lines = jobs_sh.read_text(encoding="utf-8").splitlines()
    assert sum(line.startswith("{ ") for line in lines) == len(status)
    scratch6 = fold_dirs["scratch", 6]
    os.replace(scratch6 / "checkpoint_final.pth", scratch6 / "checkpoint_latest.pth")  # an interrupted training
    (scratch6 / "validation" / "summary.json").unlink()
    prediction = next((out / "predictions" / "smit" / "fold_6").glob("*.nii.gz"))
    prediction.unlink()
    logs_before = set(scratch6.glob("training_log_*.txt"))
    loop = f'while IFS= read -r line; do eval "$line" || exit 1; done < {jobs_sh}'
    subprocess.run(["bash", "-c", loop], env=nnunet.env, check=True, timeout=2400)
    assert _relative_files(out) == layout
    assert "train-scratch-few_shot3-fold5: already done" in (out / "logs" / "train-scratch-few_shot3-fold5.log").read_text(encoding="utf-8")
    new_logs = set(scratch6.glob("training_log_*.txt")) - logs_before
    assert len(new_logs) == 1  # one nnUNetv2_train start, continued (--c) at epoch 1 of 1: no epoch trained again
    assert " Epoch 0" not in new_logs.pop().read_text(encoding="utf-8")
    assert prediction.is_file()

    # 4. the report, checked against nnU-Net's own evaluation of the same predictions
    nnunet.run("nnunet-ssl", "experiment", "report", str(path), "--no-cka")
    report = out / "report"
    assert "few-shot, 3 training cases" in (report / "report.md").read_text(encoding="utf-8")
    with open(report / "runs.csv", encoding="utf-8") as handle:
        runs = list(csv.DictReader(handle))
    labels = Path(nnunet.env["nnUNet_raw"]) / "Dataset501_Phantom" / "labelsTs"
    run_means = {}
    for arm in ("scratch", "smit"):
        for fold in (5, 6):
            nnunet_means = mean_dice_by_nnunet(labels, out / "predictions" / arm / f"fold_{fold}", nnunet.preprocessed)
            ours = {r["structure"]: r["mean_dice"] for r in runs if r["arm"] == arm and r["fold"] == str(fold)}
            finite = []
            for name, label in LABELS.items():
                expected = nnunet_means[label]
                if expected is None or expected != expected:
                    assert ours[name] == ""  # NaN: structure in neither prediction nor reference
                else:
                    assert float(ours[name]) == pytest.approx(expected, abs=1e-9)
                    finite.append(expected)
            run_means[arm, fold] = sum(finite) / len(finite)
            assert float(ours["overall"]) == pytest.approx(run_means[arm, fold])
    with open(report / "tables.csv", encoding="utf-8") as handle:
        tables = {r["arm"]: r for r in csv.DictReader(handle) if r["structure"] == "overall"}
    for arm in ("scratch", "smit"):
        assert float(tables[arm]["mean"]) == pytest.approx((run_means[arm, 5] + run_means[arm, 6]) / 2)
        assert tables[arm]["n_runs"] == "2"


def mean_dice_by_nnunet(labels: Path, predictions: Path, preprocessed: Path, plans: str = "nnUNetPlans") -> dict[int, float]:
    """Per-label mean Dice over the cases of ``predictions`` as `nnUNetv2_evaluate_folder` computes it: nnU-Net's own
    ``compute_metrics`` per case, then the NaN-ignoring mean, in this process (no command and worker pool to start)."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    dataset_json = json.loads((preprocessed / "dataset.json").read_text(encoding="utf-8"))
    ending = dataset_json["file_ending"]
    cases = sorted(predictions.glob(f"*{ending}"))
    assert cases, f"no predictions in {predictions}"
    reader = determine_reader_writer_from_dataset_json(dataset_json, str(cases[0]))()
    label_manager = PlansManager(str(preprocessed / f"{plans}.json")).get_label_manager(dataset_json)
    per_case = [compute_metrics(str(labels / case.name), str(case), reader, label_manager.foreground_labels)
                for case in cases]
    with warnings.catch_warnings():  # a label in neither prediction nor reference is NaN in every case
        warnings.simplefilter("ignore", RuntimeWarning)
        return {int(label): float(np.nanmean([c["metrics"][label]["Dice"] for c in per_case]))
                for label in label_manager.foreground_labels}


def test_run_interrupted_resumed_emitted_and_reported(experiment: tuple[NnUNet, Path]) -> None:
    nnunet, path = experiment
    interrupt_run(nnunet, path)
    resume_emit_report(nnunet, path)

"""The emitted scripts run on the first try: the SLURM array under a fake sbatch environment, the commands' order.

Issue 20: the SLURM script pointed --output into a logs/ folder nothing had made, always asked for a
GPU, set up no environment, had no ``set -e``, and repeated the runner's logic in shell; in the
commands format a failed training did not stop its prediction.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from test_splits import fake_preprocessed_dataset

from nnunet_ssl.cli import main
from nnunet_ssl.experiment.emit import array_tasks, render, slurm_script
from nnunet_ssl.experiment.runner import INTERRUPTED, prepare, select_jobs, write_status
from nnunet_ssl.experiment.spec import ExperimentError, load_experiment

SYSTEM_PATH = "/usr/bin:/bin"


@pytest.fixture
def dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A preprocessed Dataset777_Fake in nnUNet_preprocessed (no raw folder)."""
    folder = fake_preprocessed_dataset(tmp_path / "pre")
    (folder / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1}, "file_ending": ".nii.gz"}),
                                         encoding="utf-8")
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    monkeypatch.delenv("nnUNet_raw", raising=False)
    return folder


def experiment_file(tmp_path: Path, **changes: object) -> Path:
    (tmp_path / "smit.pt").write_bytes(b"weights")
    (tmp_path / "runs" / "simmim").mkdir(parents=True, exist_ok=True)
    data: dict[str, object] = {
        "dataset": "Dataset777_Fake", "plans": "nnUNetPlans", "device": "cpu",
        "arms": [{"name": "scratch"}, {"name": "simmim", "method": "simmim", "pretraining_run": "runs/simmim"}],
        "settings": {"few_shot": {"shots": [3], "seeds": [0]}, "full": {"folds": [0]}},
    }
    data.update(changes)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def fake_tool(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + body, encoding="utf-8")
    path.chmod(0o755)
    return path


def sbatch_options(script: str) -> dict[str, str]:
    return dict(line[len("#SBATCH --"):].split("=", 1) for line in script.splitlines() if line.startswith("#SBATCH --"))


def test_slurm_section_is_checked_and_named(tmp_path: Path) -> None:
    experiment = load_experiment(experiment_file(tmp_path, slurm={
        "partition": "gpu", "account": "lab", "time": "2-00:00:00", "cpus": 4, "memory": "64G",
        "options": ["--qos=normal"], "setup": ["module load cuda", "source /x/.venv/bin/activate"]}, device="cuda"))
    slurm = experiment.slurm
    assert (slurm.partition, slurm.account, slurm.time, slurm.cpus, slurm.memory) == ("gpu", "lab", "2-00:00:00", 4,
                                                                                      "64G")
    assert slurm.setup == ("module load cuda", "source /x/.venv/bin/activate") and slurm.gres("cuda") == "gpu:1"
    assert load_experiment(experiment_file(tmp_path)).slurm.setup is None  # not given: the default PATH line
    for change, message in [
        ({"slurm": {"gpus": 1}}, "slurm.gpus is 1, but device is cpu"),
        ({"slurm": {"time": 720}}, "slurm.time must be quoted"),
        ({"slurm": {"memory": "64GB"}}, "slurm.memory"),
        ({"slurm": {"cpu": 4}}, "unknown field.*slurm.cpu"),
        ({"slurm": {"partition": "a b"}}, "slurm.partition must be one word"),
        ({"slurm": {"options": ["qos=x"]}}, "slurm.options"),
        ({"slurm": {"gpus": 0}, "device": "cuda"}, "slurm.gpus must be a count"),
    ]:
        with pytest.raises(ExperimentError, match=message) as caught:
            load_experiment(experiment_file(tmp_path, **change))
        assert str(tmp_path / "exp.yaml") in str(caught.value)


def test_slurm_resources_from_the_file_and_no_gpu_for_cpu(tmp_path: Path, dataset: Path) -> None:
    cpu = load_experiment(experiment_file(tmp_path, slurm={"partition": "short", "time": "30", "cpus": 2,
                                                           "memory": "8000", "setup": []}))
    jobs = prepare(cpu).jobs
    options = sbatch_options(slurm_script(jobs, cpu))
    assert "gres" not in options and not any("gpu" in v for v in options.values())
    assert {k: options[k] for k in ("partition", "time", "cpus-per-task", "mem")} == {
        "partition": "short", "time": "30", "cpus-per-task": "2", "mem": "8000"}
    assert options["output"] == f"{cpu.output / 'logs'}/slurm-%A_%a.out"
    assert options["array"] == f"0-{len(array_tasks(jobs)) - 1}" == "0-3"  # 2 arms x (full fold 0, 3-shot fold 5)
    cuda = load_experiment(experiment_file(tmp_path, device="cuda", slurm={"gpus": "a100:2", "options": ["--qos=hi"]}))
    script = slurm_script(jobs, cuda)
    assert sbatch_options(script)["gres"] == "gpu:a100:2" and "#SBATCH --qos=hi" in script
    assert sbatch_options(slurm_script(jobs, load_experiment(experiment_file(tmp_path, device="cuda"))))["gres"] == "gpu:1"


def test_emitted_slurm_script_runs_under_a_fake_sbatch_environment(tmp_path: Path, dataset: Path) -> None:
    """emit makes logs/; the script passes bash -n; each array task execs the runner with its jobs, after setup."""
    fake = tmp_path / "fakebin"
    record = tmp_path / "argv.txt"
    fake_tool(fake, "nnunet-ssl", f'printf "%s\\n" "$@" > {record}\necho "setup=$SETUP_RAN" >> {record}\n'
              'exit "${FAKE_EXIT:-0}"\n')
    path = experiment_file(tmp_path, slurm={"setup": [f"export PATH={fake}:$PATH", "export SETUP_RAN=yes"]})
    script_file = tmp_path / "jobs.sbatch"
    assert not (tmp_path / "exp_out" / "logs").exists()
    assert main(["experiment", "emit", str(path), "--format", "slurm", "--out", str(script_file)]) == 0
    assert (tmp_path / "exp_out" / "logs").is_dir()  # SLURM opens --output there before the script runs
    script = script_file.read_text(encoding="utf-8")
    subprocess.run(["bash", "-n", str(script_file)], check=True)
    assert "set -eo pipefail" in script and "set -u" in script
    experiment = load_experiment(path)
    tasks = array_tasks(prepare(experiment).jobs)

    def submit(task: str | None, **extra: str) -> subprocess.CompletedProcess[str]:
        env = {"PATH": SYSTEM_PATH, "HOME": str(tmp_path), "SLURM_JOB_ID": "41", **extra}
        if task is not None:
            env |= {"SLURM_ARRAY_JOB_ID": "41", "SLURM_ARRAY_TASK_ID": task}
        record.unlink(missing_ok=True)
        return subprocess.run(["bash", str(script_file)], env=env, capture_output=True, text=True, cwd=tmp_path)

    done = submit("1")
    assert done.returncode == 0, done.stderr
    expected = ["experiment", "run", str(experiment.source), "--no-progress"]
    expected += [arg for job in tasks[1] for arg in ("--job", job.id)]
    assert tasks[1][0].id == "export-simmim"  # the simmim arm's training needs its export first
    assert record.read_text(encoding="utf-8").splitlines() == [*expected, "setup=yes"]
    failed = submit("0", FAKE_EXIT="3")  # the runner's exit status is the task's
    assert failed.returncode == 3
    outside = submit("9")
    assert outside.returncode == 1 and "no array task 9" in outside.stderr and not record.exists()
    unset = submit(None)
    assert unset.returncode != 0 and "submit this script with sbatch" in unset.stderr and not record.exists()


def test_slurm_script_stops_when_setup_fails_or_nnunet_ssl_is_missing(tmp_path: Path, dataset: Path) -> None:
    """set -e: a failing setup line ends the task; without nnunet-ssl on PATH the task says so, not 'carries on'."""
    env = {"PATH": SYSTEM_PATH, "SLURM_ARRAY_TASK_ID": "0"}
    for setup, code, message in [
        (["source /nonexistent/.venv/bin/activate", "echo after-setup"], 1, "/nonexistent"),
        (["true"], 127, "nnunet-ssl is not on PATH on this node"),
    ]:
        experiment = load_experiment(experiment_file(tmp_path, slurm={"setup": setup}))
        result = subprocess.run(["bash", "-c", slurm_script(prepare(experiment).jobs, experiment)], env=env,
                                capture_output=True, text=True)
        assert result.returncode == code and message in result.stderr, result.stderr
        assert "after-setup" not in result.stdout


def test_default_setup_puts_the_emitting_environment_on_path(tmp_path: Path, dataset: Path) -> None:
    import sys

    experiment = load_experiment(experiment_file(tmp_path))
    script = slurm_script(prepare(experiment).jobs, experiment)
    bin_dir = Path(sys.executable).parent
    if (bin_dir / "nnunet-ssl").is_file():
        assert f"export PATH={bin_dir}:\"$PATH\"" in script
    given = slurm_script(prepare(experiment).jobs, experiment, setup=["module load x"])
    assert "\nmodule load x\n" in given and "export PATH=" not in given


def test_commands_format_runs_a_prediction_only_after_its_training(tmp_path: Path, dataset: Path) -> None:
    """A failed training leaves its prediction line unstarted (status 1); a training that succeeds lets it run."""
    images = tmp_path / "imagesTs"
    (tmp_path / "labelsTs").mkdir()
    images.mkdir()
    (images / "t1_0000.nii.gz").write_bytes(b"")
    experiment = load_experiment(experiment_file(
        tmp_path, arms=[{"name": "scratch"}], settings={"full": {"folds": [0]}},
        test_set={"images": str(images), "labels": str(tmp_path / "labelsTs")}))
    jobs = prepare(experiment).jobs
    train, predict = jobs
    script = render(jobs, experiment, "commands")
    fake = tmp_path / "fakebin"
    calls = tmp_path / "calls.txt"
    fake_tool(fake, "nnunet-ssl", f"echo {tmp_path / 'trainers'}\n")
    fold = train.finished.parent
    fake_tool(fake, "nnUNetv2_train", f'echo train >> {calls}\n[ "$TRAIN_OK" = 1 ] || exit 2\n'
              f"mkdir -p {fold}/validation && touch {fold}/checkpoint_final.pth {fold}/validation/summary.json\n")
    fake_tool(fake, "nnUNetv2_predict", f"echo predict >> {calls}\nmkdir -p {predict.done[0].parent} && "
              f"touch {predict.done[0]}\n")
    lines = [line for line in script.splitlines() if line.startswith("{ ")]
    env = {"PATH": f"{fake}:{SYSTEM_PATH}", "TRAIN_OK": "0"}
    prefix = "\n".join(line for line in script.splitlines() if not line.startswith("{ ")) + "\n"
    results = [subprocess.run(["sh", "-c", prefix + line], env=env).returncode for line in lines]
    assert results == [2, 1] and calls.read_text(encoding="utf-8").split() == ["train"]
    assert "predict-scratch-full-fold0: not started, train-scratch-full-fold0 is not done" in \
        predict.log.read_text(encoding="utf-8")
    env["TRAIN_OK"] = "1"
    assert subprocess.run(["sh", "-c", script], env=env).returncode == 0
    assert calls.read_text(encoding="utf-8").split() == ["train", "train", "predict"] and predict.done[0].is_file()


def test_commands_preamble_stops_without_nnunet_ssl(tmp_path: Path, dataset: Path) -> None:
    experiment = load_experiment(experiment_file(tmp_path))
    script = render(prepare(experiment).jobs, experiment, "commands")
    result = subprocess.run(["sh", "-c", script], env={"PATH": SYSTEM_PATH}, capture_output=True, text=True)
    assert result.returncode == 127 and "nnunet-ssl is not on PATH" in result.stderr
    assert not list((tmp_path / "exp_out" / "logs").glob("*.log"))  # no job line ran


def test_job_selection_takes_dependencies_and_names_unknown_ids(tmp_path: Path, dataset: Path) -> None:
    experiment = load_experiment(experiment_file(tmp_path))
    jobs = prepare(experiment).jobs
    chosen = select_jobs(jobs, ["train-simmim-full-fold0"], experiment.source)
    assert [j.id for j in chosen] == ["export-simmim", "train-simmim-full-fold0"]
    with pytest.raises(ExperimentError, match="no job 'train-x'.*emit it again"):
        select_jobs(jobs, ["train-x"], experiment.source)
    assert main(["experiment", "emit", str(experiment.source), "--job", "train-x"]) == 1


def test_array_tasks_merge_their_records(tmp_path: Path) -> None:
    """Tasks writing jobs.json one after another keep each other's records (merge), a whole run replaces them."""
    status_file = tmp_path / "jobs.json"
    write_status({"a": ("done", "fresh in 1 s")}, status_file, merge=True)
    write_status({"b": (INTERRUPTED, "after 3 s")}, status_file, merge=True)
    write_status({"a": ("failed", "exit 2")}, status_file, merge=True)
    assert json.loads(status_file.read_text(encoding="utf-8")) == {
        "a": {"status": "failed", "detail": "exit 2"}, "b": {"status": INTERRUPTED, "detail": "after 3 s"}}
    write_status({"c": ("done", "")}, status_file)
    assert list(json.loads(status_file.read_text(encoding="utf-8"))) == ["c"]
    assert os.path.exists(str(status_file) + ".lock")


def test_readme_slurm_section_is_valid() -> None:
    """docs/experiment.md's slurm: block passes validation as written (and asks SLURM for what it says)."""
    import textwrap

    from nnunet_ssl.experiment.cluster import slurm_settings

    readme = (Path(__file__).resolve().parents[2] / "docs" / "experiment.md").read_text(encoding="utf-8")
    block = textwrap.dedent("  slurm:" + readme.split("```yaml\n  slurm:", 1)[1].split("```", 1)[0])
    slurm = slurm_settings(yaml.safe_load(block)["slurm"], "cuda")
    assert (slurm.time, slurm.gres("cuda"), slurm.cpus, slurm.memory) == ("2-00:00:00", "gpu:1", 8, "64G")
    assert slurm.setup == ("module load cuda/12.1", "source /path/to/.venv/bin/activate")

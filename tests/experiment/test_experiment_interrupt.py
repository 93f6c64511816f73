"""Ctrl-C and SIGTERM: one line, the running job recorded as interrupted, exit 130 (143), the command stopped.

Issue 20: Ctrl-C printed raw KeyboardInterrupt tracebacks from the runner and the training, and the
interrupted job was not recorded in jobs.json. The commands here are fakes that sleep, so the
tests take the time of one CLI start, not of a training.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from test_splits import fake_preprocessed_dataset

from nnunet_ssl.experiment.grid import Job
from nnunet_ssl.experiment.runner import INTERRUPTED, RunInterrupted, run_jobs, sigterm_as_interrupt

#: The CLI as ``nnunet-ssl``, except that the runner finds nnU-Net's commands beside a Python in FAKES
#: (it starts them from beside sys.executable, the environment's bin folder): here, fakes that sleep.
LAUNCHER = """import sys
sys.executable = sys.argv.pop(1) + "/python"
from nnunet_ssl.cli import main
sys.exit(main(sys.argv[1:]))
"""


def wait_for(path: Path, seconds: float, process: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"ended before {path} appeared: {process.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear in {seconds} s")
        time.sleep(0.05)


def default_interrupt_signals() -> None:
    """SIGINT and SIGTERM delivered and handled by default, whatever state the test process is in.

    A child inherits ignored signals and the signal mask of the thread that starts it: in one of
    several xdist runs of the unit suite both tests here waited as if SIGINT never arrived (the CLI's
    for 60 s, the sleeper's until the runner killed it 20 s later), a state no test of the suite was
    found to leave behind. Starting from the defaults keeps these tests about the runner.
    """
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def sleeper(folder: Path, name: str, marker: Path) -> Path:
    """A command that says it started, then sleeps (exec: the signal reaches the sleep itself)."""
    folder.mkdir(parents=True, exist_ok=True)
    tool = folder / name
    tool.write_text(f"#!/bin/sh\necho started > {marker}\nexec sleep 60\n", encoding="utf-8")
    tool.chmod(0o755)
    return tool


def test_ctrl_c_through_the_cli_ends_in_one_line_and_records_the_job(tmp_path: Path) -> None:
    """SIGINT to the CLI's process group (what Ctrl-C in a terminal sends) while a training runs."""
    fakes, marker = tmp_path / "fakes", tmp_path / "started"
    sleeper(fakes, "nnUNetv2_train", marker)
    folder = fake_preprocessed_dataset(tmp_path / "pre")
    (folder / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1}, "file_ending": ".nii.gz"}),
                                         encoding="utf-8")
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(yaml.safe_dump({"dataset": "Dataset777_Fake", "plans": "nnUNetPlans", "device": "cpu",
                                          "arms": [{"name": "scratch"}], "settings": {"full": {"folds": [0]}}}),
                          encoding="utf-8")
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER, encoding="utf-8")
    env = {**os.environ, "nnUNet_preprocessed": str(tmp_path / "pre"), "OMP_NUM_THREADS": "1"}
    env.pop("nnUNet_raw", None)
    process = subprocess.Popen(
        [sys.executable, str(launcher), str(fakes), "experiment", "run", str(experiment), "--no-progress"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=default_interrupt_signals,  # noqa: PLW1509 (one child, started from the test's thread)
    )
    try:
        wait_for(marker, 120, process)
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    job = "train-scratch-full-fold0"
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    lines = stderr.strip().splitlines()
    assert [line for line in lines if "interrupt" in line] == [lines[-1]]
    assert lines[-1].startswith("ERROR nnunet_ssl: interrupted (Ctrl-C): 1 running job(s) stopped")
    assert job in lines[-1] and f"nnunet-ssl experiment run {experiment}" in lines[-1]
    record = json.loads((tmp_path / "exp_out" / "jobs.json").read_text(encoding="utf-8"))
    assert record[job]["status"] == INTERRUPTED and "starts it again" in record[job]["detail"]
    assert "interrupted after" in (tmp_path / "exp_out" / "logs" / f"{job}.log").read_text(encoding="utf-8")


def test_sigterm_stops_a_command_that_did_not_get_it(tmp_path: Path) -> None:
    """SLURM's time limit (or kill PID) signals the runner alone: it forwards SIGINT to the command and records it."""
    marker = tmp_path / "started"
    tool = sleeper(tmp_path / "bin", "sleeper", marker)
    job = Job("train-x", "train", "x", (), (str(tool),), (tmp_path / "never",), tmp_path / "logs" / "train-x.log")

    def terminate_once_started() -> None:
        wait_for(marker, 30)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})  # the sleeper inherits it
    interrupt_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    try:
        with sigterm_as_interrupt():
            thread = threading.Thread(target=terminate_once_started, daemon=True)
            thread.start()
            with pytest.raises(RunInterrupted) as caught:
                run_jobs([job], 1, tmp_path / "jobs.json", progress=False)
        thread.join()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        if interrupt_handler is not None:
            signal.signal(signal.SIGINT, interrupt_handler)
    assert time.monotonic() - started < 30  # the sleep (60 s) was stopped, not waited for
    interrupt = caught.value
    assert (interrupt.signal_name, interrupt.exit_code, interrupt.jobs) == ("SIGTERM", 143, ["train-x"])
    assert json.loads((tmp_path / "jobs.json").read_text(encoding="utf-8"))["train-x"]["status"] == INTERRUPTED
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is the run's only

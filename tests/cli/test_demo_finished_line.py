"""The demo's closing time line: a re-run that skipped stages says its own time and the reused work's time."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from nnunet_ssl.demo import Demo, DemoConfig
from nnunet_ssl.demo_progress import duration_text, finished_line


@pytest.mark.parametrize(("seconds", "text"), [(9.2, "9 s"), (59.4, "59 s"), (60.0, "1.0 min"), (2280.0, "38.0 min"),
                                               (7199.0, "120.0 min"), (9000.0, "2.5 h")])
def test_duration_text(seconds: float, text: str) -> None:
    assert duration_text(seconds) == text


def test_finished_line_says_both_times_when_work_was_reused() -> None:
    assert finished_line(2280.0, 2280.0, 0, 11, 0.0) == "demo finished in 38.0 min"
    assert finished_line(9.0, 2285.0, 9, 11, 2279.0) == (
        "demo finished in 9 s (it reused the work of 9 of 11 stages from earlier runs, which took 38.0 min; "
        "all the demo's work took 38.1 min)"
    )
    assert finished_line(9.0, 6.0, 2, 11, 0.0) == (
        "demo finished in 9 s (it reused the work of 2 of 11 stages from earlier runs; their time was not recorded)"
    )


class StubDemo(Demo):
    """The demo's run loop over stand-in stages: two reused (recorded earlier), one that works now."""

    JOBS = 0

    def __init__(self, config: DemoConfig) -> None:
        super().__init__(config)
        self.lines: list[str] = []

    def stages(self) -> list[tuple[str, Callable[[], bool | None]]]:
        return [("phantoms", lambda: False), ("pretrain", lambda: False)]

    def closing_stages(self) -> list[tuple[str, Callable[[], bool | None]]]:
        return [("report", lambda: None)]

    @property
    def prepared(self) -> Any:
        return SimpleNamespace(jobs=[])

    def summarize(self, seconds: float, this_run_seconds: float, line: str | None = None) -> None:
        assert line is not None
        self.lines.append(line)


def test_rerun_line_from_the_demo_run_loop(tmp_path: Path) -> None:
    demo = StubDemo(DemoConfig(work_dir=tmp_path))
    demo.logs.mkdir(parents=True)
    demo.stage_times_file.write_text(json.dumps({"phantoms": 60.0, "pretrain": 2220.0, "report": 3.0}), encoding="utf-8")
    demo.run()
    assert demo.reused == ["phantoms", "pretrain"]
    (line,) = demo.lines
    assert line.startswith("demo finished in 0 s (it reused the work of 2 of 3 stages from earlier runs, "
                           "which took 38.0 min; all the demo's work took 38.0 min)")
    times = json.loads(demo.stage_times_file.read_text(encoding="utf-8"))
    assert times["pretrain"] == 2220.0 and times["report"] < 3.0  # reused times kept, the report's is this run's


def test_the_demo_echoes_the_pretraining_progress_lines(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from nnunet_ssl.demo import show_pretraining_progress

    with caplog.at_level(logging.INFO, logger="nnunet_ssl.demo"):
        show_pretraining_progress("INFO nnunet_ssl.pretraining.engine: pretraining step 3/30 (10%): loss 0.5000, "
                                  "lr 1.00e-03, 1.00 volumes/s, 0.9 min left")
        show_pretraining_progress("INFO nnunet_ssl.pretraining.data.cache: cached 4 volumes")
    assert [r.getMessage() for r in caplog.records] == [
        "    pretraining step 3/30 (10%): loss 0.5000, lr 1.00e-03, 1.00 volumes/s, 0.9 min left"]


def test_the_demo_echoes_the_plan_steps_and_one_line_per_case(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from nnunet_ssl.demo_progress import PlanProgress

    show = PlanProgress()
    lines = [
        "INFO nnunet_ssl.plans.plan_command: extracting the dataset fingerprint of Dataset501_Phantom",
        "Using <class 'nnunetv2.imageio.simpleitk_reader_writer.SimpleITKIO'> as reader/writer",
        "Extracting dataset fingerprint:   0%|          | 0/8 [00:00<?, ?it/s]",
        "Extracting dataset fingerprint:  12%|█▎        | 1/8 [00:05<00:37,  5.35s/it]",
        "Extracting dataset fingerprint:  12%|█▎        | 1/8 [00:05<00:37,  5.35s/it]",  # redrawn: shown once
        "Extracting dataset fingerprint: 100%|██████████| 8/8 [00:09<00:00,  1.10s/it]",
        "{'data_identifier': 'nnUNetSwinPlans_3d_fullres', 'batch_size': 2}",
        "Measuring MR normalisation (channel 0):  50%|█████     | 4/8 [00:02<00:02,  1.9it/s]",
        "Preprocessing cases:  38%|███▊      | 3/8 [00:09<00:15,  3.1s/it]",
        "INFO root: copying labelsTr/Phantom_000.nii.gz -> gt_segmentations",
    ]
    with caplog.at_level(logging.INFO, logger="nnunet_ssl.demo"):
        for line in lines:
            show(line)
    assert [r.getMessage() for r in caplog.records] == [
        "    extracting the dataset fingerprint of Dataset501_Phantom",
        "    Extracting dataset fingerprint 1/8",
        "    Extracting dataset fingerprint 8/8",
        "    Measuring MR normalisation (channel 0) 4/8",
        "    Preprocessing cases 3/8",
    ]

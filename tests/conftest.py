"""Share the cores between pytest-xdist workers (``make test`` runs two) and start the long files first.

Each worker's torch threads, and those of the nnU-Net commands it starts, take their share of the
cores instead of every process taking all. ``--dist loadfile`` keeps each file (and its module-scoped
nnU-Net datasets) on one worker; sending the long files out first (end-to-end, then unit), longest
first, leaves the many short files to fill both workers at the end instead of one long file running
alone.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

#: The long files, longest first: the end-to-end files (by their durations in a two-worker run on 2 cores,
#: 2026-11-29; the pretraining runs, split from the engine's tests later, about 3 minutes, go last), then
#: the unit files of more than 8 s of CPU (46, 34, 17, 15, 14 and 9 s, 2026-12-05), so that
#: ``make test-fast`` does not end with one of them running alone.
LONGEST_FIRST = ("test_e2e_methods.py", "test_e2e_experiment.py", "test_e2e_nnunet.py", "test_e2e_demo.py",
                 "test_e2e_plan_split.py", "test_resenc_finetune.py", "test_e2e_mr_plan.py", "test_e2e_spark3d.py", "test_e2e_pretraining.py",
                 "test_convert.py", "test_networks.py", "test_finetune_policy.py", "test_ssl_methods.py",
                 "test_ssl_pixel_methods.py", "test_ssl_dino_ibot.py")

#: The end-to-end tests' folder: every test in it, and no other, has the marker ``e2e``.
E2E_FOLDER = Path(__file__).resolve().parent / "e2e"


def pytest_configure(config: pytest.Config) -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # inherited by every subprocess of this worker
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order inside a file, and of the other files, is unchanged


def pytest_runtest_setup(item: pytest.Item) -> None:
    """`make test-fast` selects by the marker: a test in tests/e2e/ without it, or one with it elsewhere, fails."""
    if (item.get_closest_marker("e2e") is not None) != (E2E_FOLDER in item.path.parents):
        pytest.fail("end-to-end tests (marker e2e) belong in tests/e2e/, and only they", pytrace=False)


@pytest.fixture()
def test_trainers(monkeypatch: pytest.MonkeyPatch) -> None:
    """nnU-Net (and ``find_trainer``) find the tests' own trainers (``short_trainers``) in this test and its subprocesses."""
    from short_trainers import with_test_trainers

    for variable, value in with_test_trainers(os.environ).items():
        if os.environ.get(variable) != value:
            monkeypatch.setenv(variable, value)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four small CT-like volumes (a bright ellipsoid body in air), the data of the pretraining engine's tests
    (tests/pretraining/test_pretraining_engine.py, tests/e2e/test_e2e_pretraining.py)."""
    import numpy as np
    import SimpleITK as sitk

    folder = tmp_path_factory.mktemp("volumes")
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:40, :72, :72]
    for i in range(4):
        body = ((y - 36) / 30.0) ** 2 + ((x - 36) / (26.0 + i)) ** 2 < 1
        image = np.where(body, 40.0, -1000.0) + rng.normal(0, 20, body.shape)
        image[(z > 10) & (z < 30) & (((y - 40) / 8.0) ** 2 + ((x - 30) / 8.0) ** 2 < 1)] = 300.0
        itk = sitk.GetImageFromArray(image.astype(np.float32))
        itk.SetSpacing((1.5, 1.5, 2.0))
        sitk.WriteImage(itk, str(folder / f"vol_{i}.nii.gz"))
    return folder

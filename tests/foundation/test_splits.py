"""Few-shot / data-limited split files: nesting, determinism, no leaks, idempotence, backups, refusals."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from nnunet_ssl.cli import main
from nnunet_ssl.splits import (
    MANIFEST_FILE,
    SPLITS_FILE,
    SplitError,
    SplitRequest,
    apply_split_request,
    fold_table,
    nested_subsets,
    nnunet_default_splits,
    read_manifest,
)
from nnunet_ssl.trainers.recipe import FineTuneRecipe, should_stop_early

CASES = [f"case_{i:03d}" for i in range(30)]


def fake_preprocessed_dataset(root: Path, cases: list[str] = CASES) -> Path:
    """A preprocessed-dataset folder as nnU-Net lays it out (plans file + blosc2 data folder)."""
    folder = root / "Dataset777_Fake"
    data = folder / "nnUNetPlans_3d_fullres"
    data.mkdir(parents=True)
    (folder / "nnUNetPlans.json").write_text(
        json.dumps({"configurations": {"3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres"}}})
    , encoding="utf-8")
    for case in cases:
        for suffix in (".b2nd", "_seg.b2nd", ".pkl"):
            (data / f"{case}{suffix}").write_bytes(b"")
    return folder


def few_shot(shots=(5, 10, 20), seeds=(0, 1, 2), **kwargs) -> SplitRequest:
    return SplitRequest("few_shot", tuple(shots), tuple(seeds), **kwargs)


def test_default_folds_are_nnunets(tmp_path):
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    folder = fake_preprocessed_dataset(tmp_path)
    result = apply_split_request(folder, few_shot())
    splits = json.loads((folder / SPLITS_FILE).read_text(encoding="utf-8"))
    expected = generate_crossval_split(sorted(CASES), seed=12345, n_splits=5)
    assert result.created_default and result.backup is None
    assert [sorted(s["val"]) for s in splits[:5]] == [sorted(map(str, s["val"])) for s in expected]
    assert [f.fold for f in result.folds] == list(range(5, 14))


def test_nested_per_seed_fixed_validation_no_overlap(tmp_path):
    folder = fake_preprocessed_dataset(tmp_path)
    result = apply_split_request(folder, few_shot())
    splits = json.loads((folder / SPLITS_FILE).read_text(encoding="utf-8"))
    fold0_val = sorted(splits[0]["val"])
    for seed in (0, 1, 2):
        folds = sorted((f for f in result.folds if f.seed == seed), key=lambda f: f.size)
        assert [len(f.train) for f in folds] == [5, 10, 20]
        assert set(folds[0].train) < set(folds[1].train) < set(folds[2].train)
        for f in folds:
            assert sorted(f.val) == fold0_val  # default: nnU-Net's fold-0 validation set
            assert not set(f.train) & set(f.val)
            assert splits[f.fold] == {"train": f.train, "val": f.val}
    assert len({tuple(f.train) for f in result.folds if f.size == 5}) == 3  # seeds differ


def test_subsets_are_deterministic_per_seed():
    pool = CASES[:20]
    assert nested_subsets(pool, (5, 10), 3) == nested_subsets(list(reversed(pool)), (10, 5), 3)
    assert nested_subsets(pool, (5,), 3) != nested_subsets(pool, (5,), 4)


def test_rerun_is_idempotent_and_extensions_reuse_folds(tmp_path):
    folder = fake_preprocessed_dataset(tmp_path)
    first = apply_split_request(folder, few_shot())
    before = (folder / SPLITS_FILE).read_text(encoding="utf-8")
    again = apply_split_request(folder, few_shot())
    assert [f.fold for f in again.folds] == [f.fold for f in first.folds]
    assert again.new_folds == [] and again.backup is None
    assert (folder / SPLITS_FILE).read_text(encoding="utf-8") == before
    assert not list(folder.glob(f"{SPLITS_FILE}.bak-*"))

    # a new size and seed: old folds keep their index, new ones are appended and still nested
    more = apply_split_request(folder, few_shot(shots=(5, 10, 15, 20), seeds=(0, 3)))
    old = {(f.size, f.seed): f.fold for f in first.folds}
    for f in more.folds:
        if (f.size, f.seed) in old:
            assert f.fold == old[(f.size, f.seed)]
    assert sorted(f.fold for f in more.new_folds) == list(range(14, 14 + 5))
    seed0 = {f.size: set(f.train) for f in more.folds if f.seed == 0}
    assert seed0[10] < seed0[15] < seed0[20]
    backups = list(folder.glob(f"{SPLITS_FILE}.bak-*"))
    assert len(backups) == 1 and backups[0].read_text(encoding="utf-8") == before
    assert json.loads((folder / SPLITS_FILE).read_text(encoding="utf-8"))[:14] == json.loads(before)


def test_existing_user_folds_are_kept_and_validation_from_another_fold(tmp_path):
    folder = fake_preprocessed_dataset(tmp_path)
    own = [{"train": CASES[:25], "val": CASES[25:]}, {"train": CASES[5:], "val": CASES[:5]}]
    (folder / SPLITS_FILE).write_text(json.dumps(own), encoding="utf-8")
    result = apply_split_request(folder, few_shot(shots=(3,), seeds=(0,), val_from_fold=1))
    splits = json.loads((folder / SPLITS_FILE).read_text(encoding="utf-8"))
    assert splits[:2] == own and len(splits) == 3
    assert result.folds[0].fold == 2 and sorted(result.folds[0].val) == CASES[:5]


def test_val_cases_draw_fixed_set(tmp_path):
    folder = fake_preprocessed_dataset(tmp_path)
    a = apply_split_request(folder, few_shot(shots=(5,), seeds=(0, 1), val_cases=6))
    assert len({tuple(f.val) for f in a.folds}) == 1 and len(a.folds[0].val) == 6
    # data-limited folds with the same validation set go in the same file and manifest
    b = apply_split_request(folder, SplitRequest("data_limited", (20, 24), (0,), val_cases=6))
    assert b.folds[0].val == a.folds[0].val
    kinds = {(e.kind, e.size) for e in read_manifest(folder / MANIFEST_FILE)}
    assert kinds == {("few_shot", 5), ("data_limited", 20), ("data_limited", 24)}


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (few_shot(shots=(5, 25)), "only 24 remain"),
        (SplitRequest("few_shot", (5,), (0,), val_from_fold=9), "--val-from-fold 9"),
        (SplitRequest("few_shot", (5,), (0,), val_cases=30), "leaves no training cases"),
    ],
)
def test_refusals_change_nothing(tmp_path, request_, message):
    folder = fake_preprocessed_dataset(tmp_path)
    apply_split_request(folder, few_shot(shots=(5,), seeds=(0,)))
    before = {p.name: p.read_text(encoding="utf-8") for p in folder.glob("*.json")}
    with pytest.raises(SplitError, match=message):
        apply_split_request(folder, request_)
    assert {p.name: p.read_text(encoding="utf-8") for p in folder.glob("*.json")} == before


def test_refuses_unpreprocessed_corrupt_and_tampered(tmp_path):
    empty = tmp_path / "Dataset778_Empty"
    empty.mkdir()
    with pytest.raises(SplitError, match="no preprocessed data"):
        apply_split_request(empty, few_shot())

    folder = fake_preprocessed_dataset(tmp_path)
    (folder / SPLITS_FILE).write_text("[{", encoding="utf-8")
    with pytest.raises(SplitError, match="not valid JSON"):
        apply_split_request(folder, few_shot())

    (folder / SPLITS_FILE).unlink()
    apply_split_request(folder, few_shot(shots=(5,), seeds=(0,)))
    splits = json.loads((folder / SPLITS_FILE).read_text(encoding="utf-8"))
    (folder / SPLITS_FILE).write_text(json.dumps(splits[:5]), encoding="utf-8")  # someone dropped the appended fold
    with pytest.raises(SplitError, match="lists fold 5"):
        apply_split_request(folder, few_shot(shots=(5,), seeds=(0,)))


def test_request_validation():
    with pytest.raises(SplitError):
        SplitRequest("zero_shot", (5,), (0,))
    with pytest.raises(SplitError):
        SplitRequest("few_shot", (0,), (0,))
    with pytest.raises(SplitError):
        SplitRequest("few_shot", (5,), (0,), val_cases=3, val_from_fold=0)
    with pytest.raises(SplitError, match="at least 5"):
        nnunet_default_splits(["a", "b", "c"])


def test_cli_split_and_list(tmp_path, monkeypatch, capsys):
    fake_preprocessed_dataset(tmp_path)
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    assert main(["split", "-d", "Dataset777_Fake", "--shots", "5", "10", "--seeds", "0", "1"]) == 0
    table = capsys.readouterr().out
    assert "few_shot" in table and " 5 " in table
    assert main(["split", "-d", "Dataset777_Fake", "--list"]) == 0
    listed = capsys.readouterr().out
    assert fold_table(read_manifest(tmp_path / "Dataset777_Fake" / MANIFEST_FILE)) in listed
    assert main(["split", "-d", "Dataset777_Fake", "--shots", "50"]) == 1  # clear error, exit code 1


def test_few_shot_recipe_and_early_stopping_rule():
    recipe = FineTuneRecipe()
    few = recipe.for_few_shot()
    assert (recipe.num_epochs, few.num_epochs) == (1000, 3000)
    assert recipe.early_stopping_patience is None and few.early_stopping_patience == 300
    assert not should_stop_early([0.1, 0.2, 0.3], None)
    assert not should_stop_early([0.1, 0.5, 0.4], 2)  # best is 1 epoch old
    assert should_stop_early([0.1, 0.5, 0.4, 0.5], 2)  # a tie is not an improvement
    assert should_stop_early([0.5, float("nan"), float("nan")], 2)
    assert not should_stop_early([], 1)


@pytest.mark.parametrize("corrupt", ["splits_not_json", "splits_truncated", "manifest_not_json"])
def test_cli_list_fails_on_a_corrupt_split_file(tmp_path, monkeypatch, capsys, caplog, corrupt):
    folder = fake_preprocessed_dataset(tmp_path)
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    assert main(["split", "-d", "Dataset777_Fake", "--shots", "5", "--seeds", "0"]) == 0
    if corrupt == "splits_not_json":
        (folder / SPLITS_FILE).write_text("[{\"train\": [", encoding="utf-8")
    elif corrupt == "splits_truncated":  # valid JSON, but the appended fold is gone
        splits = json.loads((folder / SPLITS_FILE).read_text(encoding="utf-8"))
        (folder / SPLITS_FILE).write_text(json.dumps(splits[:5]), encoding="utf-8")
    else:
        (folder / MANIFEST_FILE).write_text("{", encoding="utf-8")
    capsys.readouterr()
    assert main(["split", "-d", "Dataset777_Fake", "--list"]) == 1
    assert "Dataset777_Fake" in caplog.text


def test_cli_help_shows_percent_signs(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "gap % and Wilcoxon" in out and "{'" not in out

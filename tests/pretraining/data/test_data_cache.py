"""Cache reuse, change detection, removal, and parallel preprocessing."""
from __future__ import annotations

import os

import numpy as np
import pytest
from test_data_helpers import by_name, config, crash_on_named_file, ct_volume, write

from nnunet_ssl.pretraining.data import build_cache, open_array
from nnunet_ssl.pretraining.data import cache as cache_module
from nnunet_ssl.pretraining.data.sources import scan_inputs, source_digest


@pytest.fixture()
def counted(monkeypatch):
    """Counts calls of the preprocessing step (by source file name)."""
    calls: list[str] = []
    real = cache_module.preprocess_source

    def counting(source, cfg):
        calls.append(os.path.basename(source.path))
        return real(source, cfg)

    monkeypatch.setattr(cache_module, "preprocess_source", counting)
    return calls


def _three_volumes(folder):
    return [write(ct_volume(seed=i), folder / f"v{i}.nii.gz") for i in range(3)]


def test_second_build_reuses_everything(tmp_path, counted):
    _three_volumes(tmp_path / "in")
    cfg = config([tmp_path / "in"], tmp_path / "cache")
    first = build_cache(cfg)
    assert sorted(counted) == ["v0.nii.gz", "v1.nii.gz", "v2.nii.gz"]
    mtimes = {e.cache_file: os.stat(first.array_path(e)).st_mtime_ns for e in first.usable()}
    counted.clear()
    second = build_cache(cfg)
    assert counted == []
    assert [e.to_json() for e in second.entries] == [e.to_json() for e in first.entries]
    assert {e.cache_file: os.stat(second.array_path(e)).st_mtime_ns for e in second.usable()} == mtimes


def test_changed_and_touched_sources_are_reprocessed(tmp_path, counted):
    paths = _three_volumes(tmp_path / "in")
    cfg = config([tmp_path / "in"], tmp_path / "cache")
    before = by_name(build_cache(cfg))
    old_values = open_array(os.path.join(cfg.cache_dir, before["v0.nii.gz"].cache_file))[...]
    counted.clear()
    write(ct_volume(seed=99), paths[0])  # new content
    st = os.stat(paths[1])
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched only
    after = by_name(build_cache(cfg))
    assert sorted(counted) == ["v0.nii.gz", "v1.nii.gz"]
    assert after["v0.nii.gz"].digest != before["v0.nii.gz"].digest
    new_values = open_array(os.path.join(cfg.cache_dir, after["v0.nii.gz"].cache_file))[...]
    assert not np.array_equal(old_values, new_values)
    assert after["v2.nii.gz"].digest == before["v2.nii.gz"].digest


def test_removed_sources_drop_out(tmp_path):
    paths = _three_volumes(tmp_path / "in")
    cfg = config([tmp_path / "in"], tmp_path / "cache")
    gone = by_name(build_cache(cfg))["v1.nii.gz"]
    os.remove(paths[1])
    manifest = build_cache(cfg)
    assert sorted(by_name(manifest)) == ["v0.nii.gz", "v2.nii.gz"]
    assert not os.path.exists(os.path.join(cfg.cache_dir, gone.cache_file))
    assert sorted(f for f in os.listdir(cfg.cache_dir) if f.endswith(".b2nd")) == sorted(
        e.cache_file for e in manifest.usable()
    )


def test_new_parameters_or_lost_arrays_trigger_reprocessing(tmp_path, counted):
    _three_volumes(tmp_path / "in")
    cfg = config([tmp_path / "in"], tmp_path / "cache")
    manifest = build_cache(cfg)
    os.remove(manifest.array_path(manifest.entries[0]))
    counted.clear()
    build_cache(cfg)
    assert counted == ["v0.nii.gz"]
    counted.clear()
    wider = config([tmp_path / "in"], tmp_path / "cache", ct_window=(-1000.0, 1000.0))
    build_cache(wider)
    assert len(counted) == 3
    counted.clear()
    # Crop geometry is not a preprocessing parameter: only the "padded" notes change.
    bigger = build_cache(config([tmp_path / "in"], tmp_path / "cache", ct_window=(-1000.0, 1000.0), crop_size=16, region_size=16))
    assert counted == [] and all(e.note is None for e in bigger.entries)


def test_parallel_preprocessing_matches_serial(tmp_path):
    _three_volumes(tmp_path / "in")
    (tmp_path / "in" / "bad.nii.gz").write_bytes(b"xx")
    serial = build_cache(config([tmp_path / "in"], tmp_path / "serial"))
    parallel = build_cache(config([tmp_path / "in"], tmp_path / "parallel", num_workers=2))
    assert [(e.key, e.status, e.reason, e.shape, e.digest) for e in serial.entries] == [
        (e.key, e.status, e.reason, e.shape, e.digest) for e in parallel.entries
    ]
    for a, b in zip(serial.usable(), parallel.usable(), strict=True):
        np.testing.assert_array_equal(open_array(serial.array_path(a))[...], open_array(parallel.array_path(b))[...])


def test_a_process_killed_by_a_reader_is_isolated(tmp_path):
    for i in range(2):
        write(ct_volume(seed=i), tmp_path / "in" / f"v{i}.nii.gz")
    write(ct_volume(seed=5), tmp_path / "in" / "crash.nii.gz")
    cfg = config([tmp_path / "in"], tmp_path / "cache", num_workers=2)
    os.makedirs(cfg.cache_dir)
    sources, _ = scan_inputs(cfg)
    done: list = []
    cache_module._run_jobs(
        [(s, source_digest(s)) for s in sources], cfg, cfg.cache_dir, done.append, worker=crash_on_named_file
    )
    entries = {os.path.basename(e.source): e for e in done}
    assert sorted(entries) == ["crash.nii.gz", "v0.nii.gz", "v1.nii.gz"]
    assert entries["crash.nii.gz"].status == "skipped" and entries["crash.nii.gz"].reason == "unreadable"
    assert "killed" in entries["crash.nii.gz"].detail
    assert entries["v0.nii.gz"].status == entries["v1.nii.gz"].status == "ok"

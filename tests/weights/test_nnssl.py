"""nnssl's checkpoint interchange: our ResEnc weights written in nnssl's form and read back bit for bit, checkpoints
shaped exactly as nnssl's trainers write them (ResEnc-L, SparK, DDP prefixes) read right, and every refusal.

The hand-written nnssl checkpoints follow nnssl 7044864 (facts listed in ``nnunet_ssl/weights/nnssl.py``):
``AbstractBaseTrainer.save_checkpoint`` (entries), ``AdaptationPlan.serialize`` (plan fields; tuples stay tuples
inside the torch file), ``_convert_numpy`` (a numpy array left in the plan becomes a tensor), ``add_adaptation_plan.py`` (the JSON
beside the file adds ``trainer_name``) and SparK's ``convert_to_spark_cnn`` (``conv`` and ``all_modules.0`` split).
ResEnc-L tensors are stride-0 views of one number per tensor: the right shapes at no memory or disk cost.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from torch import Tensor, nn

from nnunet_ssl.checkpoints import UnsafeCheckpointError
from nnunet_ssl.networks.family import FAMILIES
from nnunet_ssl.networks.resenc import RESENC_PRESETS, build_resenc_unet, preset_of_architecture
from nnunet_ssl.weights.nnssl import (
    DYNAMIC_KWARGS,
    KEYS_TO_IN_PROJ,
    NNSSL_RESENC_L_KWARGS,
    NnsslFormatError,
    check_architecture_matches,
    nnssl_pretrain_plan,
    read_nnssl_checkpoint,
    write_nnssl_checkpoint,
)

TINY = FAMILIES["resenc"].record("resenc_tiny")
LARGE = FAMILIES["resenc"].record("resenc_l")
PATCH = [64, 64, 64]


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, Tensor]:
    """A seeded resenc_tiny network's full state dict (1 input channel, 1 output: MAE-style reconstruction)."""
    torch.manual_seed(11)
    return build_resenc_unet(RESENC_PRESETS["resenc_tiny"], 1, 1, deep_supervision=False).state_dict()


def large_state() -> dict[str, Tensor]:
    """The keys and shapes of nnssl's ResEnc-L as its ``get_res_enc_l`` builds it (1 input, 1 output, no deep supervision);
    one distinct number per tensor, aliased keys sharing one tensor as a state dict does."""
    classes = {"conv_op": nn.Conv3d, "norm_op": nn.InstanceNorm3d, "nonlin": nn.LeakyReLU}
    with torch.device("meta"):  # not initialised: DNA's init on the meta device costs a second
        network = ResidualEncoderUNet(input_channels=1, num_classes=1, deep_supervision=False, **{**NNSSL_RESENC_L_KWARGS, **classes})
    shared: dict[int, Tensor] = {}
    return {
        key: shared.setdefault(id(value), torch.full((1,), float(len(shared))).expand(value.shape))
        for key, value in network.state_dict(keep_vars=True).items()
    }


def same_view(a: Tensor, b: Tensor) -> bool:
    """Two of :func:`large_state`'s tensors are equal: same shape, both one number seen everywhere, the same number
    (without reading 100M elements)."""
    zero = (0,) * b.dim()
    one_number = all(stride == 0 or size == 1 for stride, size in zip(a.stride(), a.shape, strict=True))
    return a.shape == b.shape and a.dtype == b.dtype and one_number and bool(a[zero] == b[zero])


def pretrain_plan(patch: list[int] | tuple[int, ...] = (160, 160, 160), spacing: Any = None) -> dict[str, Any]:
    """``Plan.serialize()`` as an nnssl trainer leaves it: one configuration, the trainer's patch size as a tuple."""
    return {
        "dataset_name": "Dataset745_OpenMind",
        "plans_name": "nnsslPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
        "image_reader_writer": "NibabelReaderWriter",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            "onemmiso": {
                "data_identifier": "nnsslPlans_onemmiso",
                "preprocessor_name": "DefaultPreprocessor",
                "spacing_style": "onemmiso",
                "normalization_schemes": ["ZScoreNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_mask": "resample_data_or_seg_to_shape",
                "resampling_fn_mask_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "spacing": [1, 1, 1] if spacing is None else spacing,
                "patch_size": tuple(patch),
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
    }


def adaptation_plan(architecture_plans: dict[str, Any], patch: tuple[int, ...] = (160, 160, 160), **changes: Any) -> dict[str, Any]:
    """``AdaptationPlan.serialize()`` as nnssl's MAE/SparK trainers fill it (tuples where ``asdict`` keeps them)."""
    return {
        "architecture_plans": architecture_plans,
        "pretrain_plan": pretrain_plan(patch),
        "pretrain_num_input_channels": 1,
        "recommended_downstream_patchsize": (160, 160, 160),
        "key_to_encoder": "encoder.stages",
        "key_to_stem": "encoder.stem",
        "keys_to_in_proj": ("encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"),
        "key_to_lpe": None,
        **changes,
    }


RESENC_L_PLANS = {"arch_class_name": "ResEncL", "arch_kwargs": None, "arch_kwargs_requiring_import": None}
TINY_PLANS = {
    "arch_class_name": "ResidualEncoderUNet",
    # DynamicArchitecturePlans.serialize of class objects: module + name
    "arch_kwargs": {
        **RESENC_PRESETS["resenc_tiny"].arch_kwargs(),
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "nonlin": "torch.nn.modules.activation.LeakyReLU",
    },
    "arch_kwargs_requiring_import": ["conv_op", "norm_op", "nonlin"],
}


def training_checkpoint(weights: dict[str, Tensor], plan: dict[str, Any] | None, trainer: str = "BaseMAETrainer") -> dict[str, Any]:
    """The dict ``AbstractBaseTrainer.save_checkpoint`` saves (SparK's leaves the plan out and adds ``spark_weights``)."""
    checkpoint: dict[str, Any] = {
        "network_weights": weights,
        "optimizer_state": {"state": {0: {"momentum_buffer": torch.zeros(3)}}, "param_groups": [{"lr": 0.01, "params": [0]}]},
        "grad_scaler_state": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000},
        "logging": {"train_losses": [0.9, 0.5], "val_losses": [0.8, 0.6], "lrs": [0.01, 0.009], "epoch_start_timestamps": [1.0, 2.0]},
        "_best_ema": 0.6,
        "current_epoch": 1000,
        "init_args": {"plan": pretrain_plan(), "configuration_name": "onemmiso", "fold": 0, "pretrain_json": {}, "device": torch.device("cpu")},
        "trainer_name": trainer,
    }
    if plan is None:
        checkpoint["spark_weights"] = {"mask_tokens.0": torch.zeros(1, 4, 1, 1, 1)}
    else:
        checkpoint["nnssl_adaptation_plan"] = plan
    return checkpoint


def as_json(value: Any) -> Any:
    return json.loads(json.dumps(value))


def write(tmp_path: Path, weights: dict[str, Tensor], record: dict[str, Any] = TINY, **kwargs: Any) -> tuple[Path, Path]:
    arguments: dict[str, Any] = {
        "pretrain_plan": nnssl_pretrain_plan(dataset_name="Dataset900_Tiny", patch_size=PATCH, spacing=[1, 1, 1]),
        "recommended_patch_size": PATCH,
        "in_channels": 1,
        **kwargs,
    }
    return write_nnssl_checkpoint(weights, record, tmp_path / "checkpoint_final.pth", **arguments)


def assert_one_line(error: pytest.ExceptionInfo[BaseException], path: Path) -> None:
    message = str(error.value)
    assert "\n" not in message and str(path) in message, message


# ---------------------------------------------------------------- facts


def test_nnssl_resenc_l_is_our_resenc_l_preset() -> None:
    """nnssl's ``get_res_enc_l`` kwargs (architecture_registry.py) are exactly our resenc_l, and its input projection
    keys are DNA's stem keys without ``.weight``."""
    architecture = {"network_class_name": LARGE["architecture"]["network_class_name"], "arch_kwargs": NNSSL_RESENC_L_KWARGS}
    assert preset_of_architecture(architecture) == "resenc_l"
    assert KEYS_TO_IN_PROJ == ("encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0")
    assert list(DYNAMIC_KWARGS) == list(RESENC_PRESETS["resenc_tiny"].arch_kwargs())  # the 14 DynamicArchitecturePlans fields


# ---------------------------------------------------------------- ours -> nnssl -> ours


def test_written_checkpoint_reads_back_bit_identical(tmp_path: Path, tiny_state: dict[str, Tensor]) -> None:
    checkpoint, plan_file = write(tmp_path, tiny_state)
    assert plan_file == tmp_path / "adaptation_plan.json"
    raw = torch.load(checkpoint, map_location="cpu", weights_only=True)  # what nnssl's fine-tuning calls
    assert set(raw) == {"network_weights", "nnssl_adaptation_plan", "created_by"}
    plan = raw["nnssl_adaptation_plan"]
    assert json.loads(plan_file.read_text(encoding="utf-8")) == plan
    assert plan["architecture_plans"] == {
        "arch_class_name": "ResidualEncoderUNet",
        "arch_kwargs": RESENC_PRESETS["resenc_tiny"].arch_kwargs(),
        "arch_kwargs_requiring_import": ["conv_op", "norm_op", "nonlin"],  # as get_kwargs_requiring_import lists them
    }
    assert (plan["pretrain_num_input_channels"], plan["recommended_downstream_patchsize"]) == (1, PATCH)
    assert (plan["key_to_encoder"], plan["key_to_stem"], plan["keys_to_in_proj"], plan["key_to_lpe"]) == (
        "encoder.stages", "encoder.stem", ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"], None
    )

    read = read_nnssl_checkpoint(checkpoint)
    assert read.record == TINY and read.preset == "resenc_tiny" and read.arch_class_name == "ResidualEncoderUNet"
    assert list(read.network_weights) == list(tiny_state)
    for key, value in tiny_state.items():
        assert read.network_weights[key].dtype == value.dtype and torch.equal(read.network_weights[key], value), key
    assert (read.in_channels, read.num_classes, read.recommended_patch_size) == (1, 1, (64, 64, 64))
    assert (read.pretrain_configuration, read.pretrain_spacing, read.pretrain_normalization, read.pretrain_patch_size) == (
        "onemmiso", (1.0, 1.0, 1.0), ("ZScoreNormalization",), (64, 64, 64)
    )
    assert read.plan_sources == (checkpoint, plan_file) and read.notes == ()
    assert read.adaptation_plan == plan


def test_written_resenc_l_is_named_as_nnssl_names_it(tmp_path: Path) -> None:
    weights = large_state()
    checkpoint, _ = write(tmp_path, weights, LARGE, recommended_patch_size=[160, 160, 160])
    plan = torch.load(checkpoint, weights_only=True)["nnssl_adaptation_plan"]
    assert plan["architecture_plans"] == RESENC_L_PLANS  # BaseMAETrainer / SparkMAETrainer: ArchitecturePlans("ResEncL")
    read = read_nnssl_checkpoint(checkpoint)
    assert read.record == LARGE and read.arch_class_name == "ResEncL"
    assert all(same_view(read.network_weights[k], v) for k, v in weights.items())


def test_a_topology_no_preset_has_round_trips_verbatim(tmp_path: Path) -> None:
    kwargs = {**RESENC_PRESETS["resenc_tiny"].arch_kwargs(), "features_per_stage": [2, 4, 8, 16, 20, 20], "nonlin": "torch.nn.ReLU"}
    record = {"family": "resenc", "preset": "", "architecture": {**TINY["architecture"], "arch_kwargs": kwargs}}
    torch.manual_seed(3)
    weights = FAMILIES["resenc"].build(record, 1, 2, False).state_dict()
    checkpoint, _ = write(tmp_path, weights, record)
    plans = torch.load(checkpoint, weights_only=True)["nnssl_adaptation_plan"]["architecture_plans"]
    assert plans["arch_class_name"] == "ResidualEncoderUNet" and plans["arch_kwargs"] == kwargs
    read = read_nnssl_checkpoint(checkpoint)
    assert read.record == record and read.preset == "" and read.num_classes == 2
    assert all(torch.equal(read.network_weights[k], v) for k, v in weights.items())
    assert check_architecture_matches(read.record, {"network_class_name": "ResidualEncoderUNet", "arch_kwargs": kwargs}) == []


def test_fine_tuning_loads_the_written_encoder_and_stem(tmp_path: Path, tiny_state: dict[str, Tensor]) -> None:
    """The loads of the fine-tuning branch (pretrainedTrainer.load_pretrained_weights): the keys under key_to_encoder and
    key_to_stem, prefix cut, load strictly into a fresh network's encoder.stages and encoder.stem, for 3 classes."""
    checkpoint, _ = write(tmp_path, tiny_state)
    saved = torch.load(checkpoint, weights_only=True)
    plan, weights = saved["nnssl_adaptation_plan"], saved["network_weights"]
    network = build_resenc_unet(RESENC_PRESETS["resenc_tiny"], 1, 3, deep_supervision=False)
    for key in (plan["key_to_encoder"], plan["key_to_stem"]):
        part = {k[len(key) + 1:]: v for k, v in weights.items() if k.startswith(key)}
        network.get_submodule(key).load_state_dict(part)  # strict
    ours = network.encoder.state_dict()
    assert all(torch.equal(v, tiny_state[f"encoder.{k}"]) for k, v in ours.items())
    for module in plan["keys_to_in_proj"]:  # the kernel fine-tuning repeats over more input channels
        assert torch.equal(weights[f"{module}.weight"], tiny_state["encoder.stem.convs.0.conv.weight"])


def test_nnssl_to_ours_to_nnssl_is_bit_identical(tmp_path: Path, tiny_state: dict[str, Tensor]) -> None:
    plan = adaptation_plan(TINY_PLANS, patch=(64, 64, 64), recommended_downstream_patchsize=(64, 64, 64))
    source = tmp_path / "nnssl" / "checkpoint_final.pth"
    source.parent.mkdir()
    torch.save(training_checkpoint(dict(tiny_state), plan), source)

    first = read_nnssl_checkpoint(source)
    assert first.record == TINY and first.trainer_name == "BaseMAETrainer"
    assert first.adaptation_plan == as_json(plan)
    checkpoint, _ = write_nnssl_checkpoint(
        first.network_weights, first.record, tmp_path / "ours" / "checkpoint_final.pth",
        pretrain_plan=first.adaptation_plan["pretrain_plan"], recommended_patch_size=first.recommended_patch_size or (),
        in_channels=first.in_channels,
    )
    again = torch.load(checkpoint, weights_only=True)
    # the plan as nnssl wrote it, but for the architecture's class spelling (our preset's), in JSON values
    expected = as_json(plan)
    expected["architecture_plans"]["arch_kwargs"] = RESENC_PRESETS["resenc_tiny"].arch_kwargs()
    assert again["nnssl_adaptation_plan"] == expected
    second = read_nnssl_checkpoint(checkpoint)
    assert second.record == first.record and list(second.network_weights) == list(tiny_state)
    for key, value in tiny_state.items():
        assert torch.equal(again["network_weights"][key], value) and torch.equal(second.network_weights[key], value), key


# ---------------------------------------------------------------- nnssl's own checkpoints


def test_reads_an_nnssl_resenc_l_checkpoint_with_its_json(tmp_path: Path) -> None:
    """A BaseMAETrainer checkpoint after add_adaptation_plan: plan inside (tuples, a spacing that _convert_numpy made a tensor)
    and adaptation_plan.json beside it (lists, plus trainer_name): they agree."""
    weights = large_state()
    plan = adaptation_plan(RESENC_L_PLANS)
    plan["pretrain_plan"]["configurations"] = {"median": {
        **plan["pretrain_plan"]["configurations"]["onemmiso"], "spacing_style": "median", "data_identifier": "nnsslPlans_median",
        "spacing": torch.tensor([1.5, 0.75, 0.75], dtype=torch.float64),
    }}
    checkpoint = tmp_path / "checkpoint_final.pth"
    torch.save(training_checkpoint(weights, plan), checkpoint)
    beside = {**as_json({**plan, "pretrain_plan": {**plan["pretrain_plan"], "configurations": {"median": {
        **plan["pretrain_plan"]["configurations"]["median"], "spacing": [1.5, 0.75, 0.75]}}}}), "trainer_name": "BaseMAETrainer"}
    (tmp_path / "adaptation_plan.json").write_text(json.dumps(beside), encoding="utf-8")

    read = read_nnssl_checkpoint(tmp_path)  # the folder, as the published models come
    assert read.source == checkpoint and read.plan_sources == (checkpoint, tmp_path / "adaptation_plan.json")
    assert read.record == LARGE and read.preset == "resenc_l" and read.arch_class_name == "ResEncL"
    assert (read.in_channels, read.num_classes, read.recommended_patch_size) == (1, 1, (160, 160, 160))
    assert (read.pretrain_configuration, read.pretrain_spacing, read.pretrain_normalization, read.pretrain_patch_size) == (
        "median", (1.5, 0.75, 0.75), ("ZScoreNormalization",), (160, 160, 160)
    )
    assert read.adaptation_plan["pretrain_plan"]["configurations"]["median"]["spacing"] == [1.5, 0.75, 0.75]
    assert read.trainer_name == "BaseMAETrainer" and read.notes == ()
    assert list(read.network_weights) == list(weights)
    assert all(same_view(read.network_weights[k], v) for k, v in weights.items())


def test_reads_a_spark_checkpoint_with_split_aliases_and_the_json_of_its_trainer(tmp_path: Path, tiny_state: dict[str, Tensor]) -> None:
    """SparkMAETrainer saves no plan in the file; its trainer wrote adaptation_plan.json one folder above fold_0.
    convert_to_spark_cnn split each encoder conv/norm from its all_modules twin and only all_modules.* trained:
    the reader keeps the trained values under every alias, as load_state_dict would."""
    weights = dict(tiny_state)
    stale = {}
    for key in list(weights):  # the encoder's conv./norm. twins keep their initial values (here: zeros)
        if key.startswith(("encoder.", "decoder.encoder.")) and (".conv." in key or ".norm." in key):
            stale[key] = weights[key] = torch.zeros_like(weights[key])
    checkpoint = tmp_path / "SparkMAETrainer__nnsslPlans__onemmiso" / "fold_0" / "checkpoint_final.pth"
    checkpoint.parent.mkdir(parents=True)
    torch.save(training_checkpoint(weights, None, trainer="SparkMAETrainer"), checkpoint)
    plan_file = checkpoint.parent.parent / "adaptation_plan.json"
    plan_file.write_text(json.dumps(adaptation_plan(TINY_PLANS, patch=(64, 64, 64))), encoding="utf-8")

    read = read_nnssl_checkpoint(checkpoint)
    assert read.plan_sources == (plan_file,) and read.trainer_name == "SparkMAETrainer" and read.record == TINY
    assert len(read.notes) == 1 and "aliased keys" in read.notes[0] and "all_modules" in read.notes[0]
    assert stale and all(torch.equal(read.network_weights[k], tiny_state[k]) for k in tiny_state)
    network = build_resenc_unet(RESENC_PRESETS["resenc_tiny"], 1, 1, deep_supervision=False)
    network.load_state_dict(weights)  # what nnU-Net's loader makes of the raw weights: the same values
    assert all(torch.equal(v, read.network_weights[k]) for k, v in network.state_dict().items())


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_ddp_and_compile_prefixes_are_taken_off(tmp_path: Path, tiny_state: dict[str, Tensor], prefix: str) -> None:
    checkpoint = tmp_path / "checkpoint_final.pth"
    torch.save(training_checkpoint({prefix + k: v for k, v in tiny_state.items()}, adaptation_plan(TINY_PLANS)), checkpoint)
    read = read_nnssl_checkpoint(checkpoint)
    assert list(read.network_weights) == list(tiny_state)
    assert read.notes == (f"took the wrapper prefix {prefix!r} off every key",)


def test_an_explicit_plan_file_is_used(tmp_path: Path, tiny_state: dict[str, Tensor]) -> None:
    checkpoint = tmp_path / "run" / "checkpoint_best.pth"
    checkpoint.parent.mkdir()
    torch.save(training_checkpoint(dict(tiny_state), None), checkpoint)
    plan_file = tmp_path / "elsewhere.json"
    plan_file.write_text(json.dumps(adaptation_plan(TINY_PLANS)), encoding="utf-8")
    assert read_nnssl_checkpoint(checkpoint, plan_path=plan_file).plan_sources == (plan_file,)


# ---------------------------------------------------------------- refusals on reading


def test_refuses_what_is_not_a_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint_final.pth"
    path.write_text("not a checkpoint", encoding="utf-8")
    with pytest.raises(ValueError, match="not a readable nnssl checkpoint") as error:
        read_nnssl_checkpoint(path)
    assert_one_line(error, path)


class Payload:
    """A class no weights_only load may build."""


def test_refuses_objects_other_than_tensors_and_plain_values(tmp_path: Path, tiny_state: dict[str, Tensor]) -> None:
    path = tmp_path / "checkpoint_final.pth"
    torch.save({**training_checkpoint(dict(tiny_state), adaptation_plan(TINY_PLANS)), "extra": Payload()}, path)
    with pytest.raises(UnsafeCheckpointError, match="Payload") as error:
        read_nnssl_checkpoint(path)
    assert_one_line(error, path)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([1, 2], "not an nnssl checkpoint"),
        ({"model": {}, "nnssl_adaptation_plan": {}}, "no network_weights"),
        ({"network_weights": {"a": 1}}, "not tensors"),
    ],
)
def test_refuses_a_file_without_network_weights(tmp_path: Path, payload: Any, message: str) -> None:
    path = tmp_path / "checkpoint_final.pth"
    torch.save(payload, path)
    with pytest.raises(NnsslFormatError, match=message) as error:
        read_nnssl_checkpoint(path)
    assert_one_line(error, path)


def test_refuses_a_file_without_an_adaptation_plan(tmp_path: Path, tiny_state: dict[str, Tensor]) -> None:
    path = tmp_path / "fold_0" / "checkpoint_final.pth"
    path.parent.mkdir()
    torch.save(training_checkpoint(dict(tiny_state), None), path)
    with pytest.raises(NnsslFormatError, match="no adaptation plan") as error:
        read_nnssl_checkpoint(path)
    assert_one_line(error, path)
    assert str(tmp_path / "adaptation_plan.json") in str(error.value)  # says where it looked, the trainer's folder too


def test_refuses_a_folder_without_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint_final.pth"):
        read_nnssl_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("name", "message"),
    [("PrimusM", "Primus transformer"), ("NoSkipResEncL", "without skip connections"), ("Mystery", "no architecture")],
)
def test_refuses_an_architecture_we_cannot_build(tmp_path: Path, tiny_state: dict[str, Tensor], name: str, message: str) -> None:
    path = tmp_path / "checkpoint_final.pth"
    plans = {"arch_class_name": name, "arch_kwargs": None, "arch_kwargs_requiring_import": None}
    torch.save(training_checkpoint(dict(tiny_state), adaptation_plan(plans)), path)
    with pytest.raises(NnsslFormatError, match=message) as error:
        read_nnssl_checkpoint(path)
    assert_one_line(error, path)


def test_refuses_kwargs_naming_a_class_we_do_not_allow(tmp_path: Path, tiny_state: dict[str, Tensor]) -> None:
    path = tmp_path / "checkpoint_final.pth"
    plans = {**TINY_PLANS, "arch_kwargs": {**TINY_PLANS["arch_kwargs"], "nonlin": "os.system"}}
    torch.save(training_checkpoint(dict(tiny_state), adaptation_plan(plans)), path)
    with pytest.raises(NnsslFormatError, match="'os.system' is not one of the classes") as error:
        read_nnssl_checkpoint(path)
    assert_one_line(error, path)


def test_refuses_weights_that_do_not_fit(tmp_path: Path, tiny_state: dict[str, Tensor]) -> None:
    path = tmp_path / "checkpoint_final.pth"
    missing = {k: v for k, v in tiny_state.items() if not k.startswith("decoder.stages.0.")}
    torch.save(training_checkpoint(missing, adaptation_plan(TINY_PLANS)), path)
    with pytest.raises(NnsslFormatError, match=r"keys missing \(first: decoder\.stages\.0\.") as error:
        read_nnssl_checkpoint(path)
    assert_one_line(error, path)

    reshaped = {**tiny_state, "encoder.stages.1.blocks.0.conv1.conv.weight": torch.zeros(8, 4, 1, 1, 1)}
    torch.save(training_checkpoint(reshaped, adaptation_plan(TINY_PLANS)), path)
    shape = r"shapes differ \(first: encoder\.stages\.1\.blocks\.0\.conv1\.conv\.weight \(8, 4, 1, 1, 1\) vs \(8, 4, 3, 3, 3\)"
    with pytest.raises(NnsslFormatError, match=shape):
        read_nnssl_checkpoint(path)

    torch.save(training_checkpoint(dict(tiny_state), adaptation_plan(RESENC_L_PLANS)), path)  # tiny weights, ResEncL plan
    with pytest.raises(NnsslFormatError, match=r"do not fit 'ResEncL' \(resenc_l\)"):
        read_nnssl_checkpoint(path)


def test_refuses_plans_that_disagree(tmp_path: Path, tiny_state: dict[str, Tensor]) -> None:
    path = tmp_path / "checkpoint_final.pth"
    torch.save(training_checkpoint(dict(tiny_state), adaptation_plan(TINY_PLANS)), path)
    stale = as_json(adaptation_plan(TINY_PLANS, recommended_downstream_patchsize=[128, 128, 128]))
    (tmp_path / "adaptation_plan.json").write_text(json.dumps(stale), encoding="utf-8")
    with pytest.raises(NnsslFormatError, match=r"disagree \(recommended_downstream_patchsize\[0\]: 160 in the file, 128 in the JSON\)") as error:
        read_nnssl_checkpoint(path)
    assert_one_line(error, path)


def test_refuses_a_plan_whose_input_channels_are_not_the_stem_s(tmp_path: Path, tiny_state: dict[str, Tensor]) -> None:
    path = tmp_path / "checkpoint_final.pth"
    torch.save(training_checkpoint(dict(tiny_state), adaptation_plan(TINY_PLANS, pretrain_num_input_channels=2)), path)
    with pytest.raises(NnsslFormatError, match="pretrain_num_input_channels is 2 but the stem kernel") as error:
        read_nnssl_checkpoint(path)
    assert_one_line(error, path)


# ---------------------------------------------------------------- refusals on writing


def test_writer_refusals(tmp_path: Path, tiny_state: dict[str, Tensor]) -> None:
    with pytest.raises(NnsslFormatError, match="a swin preset 'smit' record cannot be written"):
        write(tmp_path, tiny_state, FAMILIES["swin"].record("smit"))
    with pytest.raises(NnsslFormatError, match=r"the weights to write do not fit 'ResEncL' \(resenc_l\)"):
        write(tmp_path, tiny_state, LARGE)
    with pytest.raises(NnsslFormatError, match="in_channels is 2 but the stem kernel has 1"):
        write(tmp_path, tiny_state, in_channels=2)
    with pytest.raises(NnsslFormatError, match=r"multiple of the network's total stride \[32, 32, 32\]"):
        write(tmp_path, tiny_state, recommended_patch_size=[100, 96, 96])
    extra = {**TINY, "architecture": {**TINY["architecture"], "arch_kwargs": {**TINY["architecture"]["arch_kwargs"], "stem_channels": 4}}}
    with pytest.raises(NnsslFormatError, match=r"DynamicArchitecturePlans takes exactly .* has also \['stem_channels'\]"):
        write(tmp_path, tiny_state, extra)
    plan = nnssl_pretrain_plan(dataset_name="D", patch_size=PATCH, spacing=[1, 1, 1])
    fields = r"pretrain_plan \(nnssl's Plan\) takes exactly .* lacks \['plans_name'\] and has unknown \['plan_name'\]"
    with pytest.raises(NnsslFormatError, match=fields):
        write(tmp_path, tiny_state, pretrain_plan={**{k: v for k, v in plan.items() if k != "plans_name"}, "plan_name": "x"})
    broken = {**plan, "configurations": {"onemmiso": {**plan["configurations"]["onemmiso"], "spacing": None}}}
    with pytest.raises(NnsslFormatError, match="spacing is None but spacing_style is 'onemmiso'"):
        write(tmp_path, tiny_state, pretrain_plan=broken)
    assert not list(tmp_path.iterdir())  # nothing written by a refused call


def test_pretrain_plan_names_its_configuration_after_the_spacing() -> None:
    assert list(nnssl_pretrain_plan(dataset_name="D", patch_size=PATCH, spacing=None)["configurations"]) == ["noresample"]
    median = nnssl_pretrain_plan(dataset_name="D", patch_size=PATCH, spacing=[3.0, 0.8, 0.8])["configurations"]["median"]
    assert (median["spacing_style"], median["spacing"], median["data_identifier"]) == ("median", [3.0, 0.8, 0.8], "nnsslPlans_median")


# ---------------------------------------------------------------- comparing with nnU-Net's plans


def test_check_architecture_matches_ignores_spelling() -> None:
    plans_entry = {  # nnU-Net's plans, other class spellings, tuples, a kwarg at DNA's default, in another order
        "network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
        "arch_kwargs": {**{k: tuple(v) if isinstance(v, list) else v for k, v in reversed(NNSSL_RESENC_L_KWARGS.items())},
                        "conv_op": "torch.nn.Conv3d", "nonlin": "torch.nn.modules.activation.LeakyReLU", "stem_channels": None},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    assert check_architecture_matches(LARGE, plans_entry) == []
    assert check_architecture_matches(LARGE, {"architecture": plans_entry}) == []  # a plans configuration
    finetune = {"network_class_name": "ResEncL", "arch_kwargs": None, "_kw_requires_import": None}  # like_nnssl.py's ptPlans
    assert check_architecture_matches(LARGE, finetune) == []
    assert check_architecture_matches(adaptation_plan(RESENC_L_PLANS), LARGE) == []
    assert check_architecture_matches(TINY, TINY_PLANS) == []
    assert check_architecture_matches(LARGE, {**plans_entry, "arch_kwargs": {**plans_entry["arch_kwargs"], "strides": [1, 2, 2, 2, 2, 2]}}) == []


def test_check_architecture_matches_names_each_difference() -> None:
    five = RESENC_PRESETS["resenc_l"].arch_kwargs()
    five.update(n_stages=5, features_per_stage=[32, 64, 128, 256, 320], kernel_sizes=[[3, 3, 3]] * 5,
                strides=[[1, 1, 1]] + [[2, 2, 2]] * 4, n_blocks_per_stage=[1, 3, 4, 6, 6], n_conv_per_stage_decoder=[1] * 4)
    entry = {"network_class_name": LARGE["architecture"]["network_class_name"], "arch_kwargs": {**five, "stem_channels": 16}}
    differences = check_architecture_matches(LARGE, entry)
    assert differences[0] == "n_stages: 6 vs 5"
    assert "features_per_stage: [32, 64, 128, 256, 320, 320] vs [32, 64, 128, 256, 320]" in differences
    assert differences[-1] == "stem_channels: absent (DNA default null) vs 16"
    assert len(differences) == 7  # n_stages, features, kernels, strides, blocks, decoder convs, stem_channels
    with pytest.raises(ValueError, match="DNA ResidualEncoderUNet"):
        check_architecture_matches(FAMILIES["swin"].record("smit"), entry)

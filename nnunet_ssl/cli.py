"""The ``nnunet-ssl`` command: everything that is not an nnU-Net command.

Only this module parses arguments and configures logging.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nnunet_ssl.plans.planner import SwinPlanSettings
    from nnunet_ssl.pretraining.config import RunConfig
    from nnunet_ssl.weights.targets import DatasetTarget

from nnunet_ssl.nnunet_ext import ext_trainer_path
from nnunet_ssl.outputs import check_output_file, check_output_folder

logger = logging.getLogger("nnunet_ssl")
#: Libraries whose INFO messages are not the user's business (shown with -v).
QUIET_LOGGERS = ("numexpr", "matplotlib", "PIL")


def cmd_ext_path(args: argparse.Namespace) -> int:
    sys.stdout.write(f"{ext_trainer_path()}\n")
    return 0


def cmd_make_phantoms(args: argparse.Namespace) -> int:
    from nnunet_ssl.data.phantoms import PhantomConfig, write_phantom_datasets

    check_output_folder(args.out)
    mr = args.modality == "mr"
    config = PhantomConfig(
        num_train=args.num_train,
        num_test=args.num_test,
        num_unlabeled=args.num_unlabeled,
        seed=args.seed,
        dataset_id=args.dataset_id if args.dataset_id is not None else (502 if mr else 501),
        dataset_name="PhantomMR" if mr else "Phantom",
        modality=args.modality,
    )
    paths = write_phantom_datasets(Path(args.out), config)
    logger.info("labeled dataset: %s", paths.dataset_dir)
    logger.info("unlabeled pool:  %s", paths.unlabeled_dir)
    logger.info("use it with: export nnUNet_raw=%s", paths.raw_root)
    return 0


def cmd_trainers(args: argparse.Namespace) -> int:
    from nnunet_ssl.trainers.named import ALL_TRAINERS, describe

    rows = [describe(cls) for cls in ALL_TRAINERS.values()]
    header = (f"{'trainer':34s} {'family':6s} {'preset':13s} {'method':15s} {'schedule':17s} {'epochs':>6s} "
              f"{'few-shot':>8s} {'it/epoch':>8s}")
    lines = [header, "-" * len(header)]
    lines += [
        f"{r['trainer']:34s} {r['family']:6s} {r['preset']:13s} {r['method']:15s} {r['schedule']:17s} {r['epochs']:6d} "
        f"{r['few_shot_epochs']:8d} {r['iterations_per_epoch']:8d}"
        for r in rows
    ]
    lines += ["", "paper: the paper's recipe, for a GPU. cpu-trial: a first try on a CPU (tiny network, no test-time "
              "mirroring).",
              "resenc: nnU-Net's ResEnc U-Net built from the plans (`nnunet-ssl plan --family resenc`, or nnU-Net's "
              "nnUNetResEncUNetLPlans for scratch). nnunet: nnU-Net's SGD + poly from scratch; spark3d: the Spark3D "
              "fine-tuning (decoder warm-up, whole-network warm-up, poly at 1e-3); *-cpu-trial: 16 short epochs.",
              "Other schedules are trainers of your own (docs/trainers.md)."]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def cmd_inspect_weights(args: argparse.Namespace) -> int:
    from nnunet_ssl.weights.format import check_weights_against_network, load_weights_file

    weights, metadata = load_weights_file(args.file)
    sys.stdout.write(f"{args.file}\n")
    for key in sorted(metadata):
        sys.stdout.write(f"  {key:20s} {json.dumps(metadata[key])}\n")
    encoder_keys = sum(1 for k in weights if k.startswith("encoder."))
    sys.stdout.write(f"  {'tensors':20s} {len(weights)} ({encoder_keys} encoder)\n")
    if args.trainer is None:
        return 0
    if args.dataset is None:
        raise ValueError("--trainer needs -d/--dataset to know the channels and classes to check against")

    from nnunet_ssl.trainers.base import PluginTrainerBase
    from nnunet_ssl.trainers.named import find_trainer
    from nnunet_ssl.weights.targets import network_for_target, resolve_target

    # as nnUNetv2_train finds it: named, else in nnUNet_extTrainer; of either family
    trainer = find_trainer(args.trainer, kind=PluginTrainerBase)
    target = resolve_target(args.dataset, args.configuration, args.plans)
    network = network_for_target(trainer, target)
    check_weights_against_network(args.file, network, args.trainer)
    sys.stdout.write(
        f"OK: fits {args.trainer} on {target.dataset_name} ({target.configuration}, {target.plans_file.name}): "
        f"{target.in_channels} channel(s), {target.num_classes} outputs\n"
    )
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id

    from nnunet_ssl.plans.plan_command import plan_and_preprocess
    from nnunet_ssl.plans.planner import DEFAULT_PLANS_NAME, SwinPlanSettings

    if args.family == "resenc":
        from nnunet_ssl.plans.resenc_planner import RESENC_PLANS_NAME, ResEncPlanSettings, resenc_training_hint

        defaults = build_parser().parse_args(["plan", "-d", str(args.dataset)])
        swin_only = [f"--{name.replace('_', '-')}" for name in SWIN_ONLY_PLAN_OPTIONS
                     if getattr(args, name) != getattr(defaults, name)]
        if swin_only:
            raise ValueError(f"{', '.join(swin_only)}: Swin planning options; --family resenc plans 1 mm and z-scores "
                             "every channel, as Spark3D pretrains (drop them, or plan with --family swin)")
        resenc_settings = ResEncPlanSettings(
            preset=args.preset or "resenc_l",
            patch_size=tuple(args.patch_size) if args.patch_size else None,
            batch_size=args.batch_size,
            plans_name=args.plans_name or RESENC_PLANS_NAME,
        )
        plans = plan_and_preprocess(args.dataset, resenc_settings, num_processes=args.num_processes, verify=args.verify)
        logger.info("%s", resenc_training_hint(convert_dataset_name_to_id(plans["dataset_name"]), resenc_settings))
        return 0
    mr_mode, mr_scheme, mr_window = mr_normalization_settings(args.mr_normalization, args.mr_window)
    settings = SwinPlanSettings(
        preset=args.preset or "smit",
        modality=args.modality,
        hu_window=tuple(args.hu_window),
        spacing_xyz=tuple(args.spacing),
        patch_size=tuple(args.patch_size) if args.patch_size else None,
        batch_size=args.batch_size,
        plans_name=args.plans_name or DEFAULT_PLANS_NAME,
        mr_normalization=mr_mode,
        mr_scheme=mr_scheme,
        mr_window=mr_window,
        mr_percentiles=tuple(args.mr_percentiles),
    )
    plans = plan_and_preprocess(args.dataset, settings, num_processes=args.num_processes, verify=args.verify)
    logger.info("%s", training_hint(convert_dataset_name_to_id(plans["dataset_name"]), settings))
    return 0


def mr_normalization_settings(choice: str, window: Sequence[float] | None) -> tuple[str, str, tuple[float, float] | None]:
    """``SwinPlanSettings``' ``(mr_normalization, mr_scheme, mr_window)`` for ``--mr-normalization CHOICE`` and
    ``--mr-window LOW HIGH``.

    ``percentile`` measures the stand-in; ``window`` and ``minmax`` force one for the percentile mapping
    (``window`` with ``--mr-window``: that fixed window); ``zscore`` is nnU-Net's z-score.
    """
    if window:
        if choice not in ("percentile", "window"):
            raise ValueError(f"--mr-window sets a fixed window; it does not go with --mr-normalization {choice} "
                             "(drop one of them)")
        return "window", "auto", (float(window[0]), float(window[1]))
    if choice in ("window", "minmax"):
        return "percentile", choice, None
    return choice, "auto", None


#: ``nnunet-ssl plan`` options of the Swin planner only (refused with ``--family resenc`` when given).
SWIN_ONLY_PLAN_OPTIONS = ("modality", "hu_window", "mr_normalization", "mr_percentiles", "mr_window", "spacing")


def trainers_of_preset(preset: str) -> list[str]:
    """Named trainers that build ``preset``, the SMIT trainer first."""
    from nnunet_ssl.trainers.named import TRAINERS

    names = [name for name, cls in TRAINERS.items() if cls.preset_name == preset]
    return sorted(names, key=lambda n: (TRAINERS[n].method != "smit", n))


def training_hint(dataset_id: int, settings: SwinPlanSettings) -> str:
    """The closing line of ``nnunet-ssl plan``: the nnUNetv2_train command with a trainer of the planned preset."""
    from nnunet_ssl.plans.planner import CONFIGURATION

    trainers = trainers_of_preset(settings.preset)
    if not trainers:
        return (f"no named trainer builds preset {settings.preset!r}; `nnunet-ssl trainers` lists the trainers "
                "and their presets")
    others = f" (other trainers of preset {settings.preset}: `nnunet-ssl trainers`)" if len(trainers) > 1 else ""
    return (f"train with: `nnUNetv2_train {dataset_id} {CONFIGURATION} FOLD -tr {trainers[0]} -p {settings.plans_name}`"
            f"{others}")


def cmd_split(args: argparse.Namespace) -> int:
    from nnunet_ssl.nnunet_paths import preprocessed_dataset_folder
    from nnunet_ssl.splits import MANIFEST_FILE, SplitRequest, apply_split_request, fold_table, read_checked_manifest

    folder = preprocessed_dataset_folder(args.dataset)
    if args.list:
        sys.stdout.write(f"{folder / MANIFEST_FILE}\n{fold_table(read_checked_manifest(folder))}\n")
        return 0
    if bool(args.shots) == bool(args.sizes):
        raise ValueError("give --shots (few-shot folds) or --sizes (data-limited folds), or --list")
    request = SplitRequest(
        kind="few_shot" if args.shots else "data_limited",
        sizes=tuple(args.shots or args.sizes),
        seeds=tuple(args.seeds),
        val_cases=args.val_cases,
        val_from_fold=args.val_from_fold,
    )
    result = apply_split_request(folder, request)
    if result.created_default:
        logger.info("no splits_final.json yet: created nnU-Net's default 5 folds first (seed 12345)")
    if result.backup is not None:
        logger.info("backed up the previous split file to %s", result.backup)
    logger.info(
        "%d new fold(s), %d already present; validation set: %d cases", len(result.new_folds),
        len(result.folds) - len(result.new_folds), len(result.folds[0].val),
    )
    sys.stdout.write(fold_table(result.folds) + "\n")
    sys.stdout.write("train a fold with: nnUNetv2_train DATASET 3d_fullres FOLD -tr TRAINER [-p PLANS]\n")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from nnunet_ssl.demo import Demo, DemoConfig, DemoError

    check_output_folder(args.out)
    try:
        results = Demo(DemoConfig(work_dir=Path(args.out))).run()
    except DemoError as error:
        logger.error("%s", error)
        return 1
    logger.info("report: %s", results)
    return 0


def _parse_overrides(pairs: Sequence[str]) -> dict[str, object]:
    """``key=value`` pairs; values are parsed as JSON when possible (numbers, booleans, lists)."""
    overrides: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def _intensity_like(values: Sequence[str], method: str) -> tuple[Path, dict[str, object], list[str]]:
    """``pretrain --intensity-like DATASET [PLANS]`` (or a plans ``.json``): ``(plans file, data settings, log lines)``
    that map intensities as the plans' ``3d_fullres`` configuration does (:func:`settings_like_plans`).

    PLANS defaults to the plans identifier of the method's network family (``nnunet-ssl plan --family``'s).
    """
    from nnunet_ssl.nnunet_paths import preprocessed_dataset_folder
    from nnunet_ssl.weights.intensity import channel_modalities_of, plans_channel_mappings, settings_like_plans

    if not 1 <= len(values) <= 2:
        raise ValueError(f"--intensity-like takes DATASET [PLANS] or a plans .json file, got {' '.join(values)}")
    if len(values) == 1 and values[0].endswith(".json"):
        plans_file = Path(values[0])
        if not plans_file.is_file():
            raise FileNotFoundError(f"--intensity-like {plans_file}: no such plans file")
    else:
        from nnunet_ssl.pretraining.methods import method_family

        plans_name = values[1] if len(values) == 2 else method_family(method).ssl_plans
        folder = preprocessed_dataset_folder(values[0])
        plans_file = folder / f"{plans_name}.json"
        if not plans_file.is_file():
            others = sorted(p.stem for p in folder.glob("*.json") if p.stem not in ("dataset", "dataset_fingerprint",
                                                                                     "splits_final", plans_name))
            hint = (f"{folder} has plans {', '.join(others)}: name them, e.g. `nnunet-ssl pretrain --intensity-like "
                    f"{values[0]} {others[0]}`" if others else f"plan the dataset first (`nnunet-ssl plan -d {values[0]}`)")
            raise FileNotFoundError(f"--intensity-like: {plans_file} does not exist; {hint}")
    plans = json.loads(plans_file.read_text(encoding="utf-8"))
    configurations = plans.get("configurations", {})
    if "3d_fullres" not in configurations:
        raise ValueError(f"{plans_file} has no 3d_fullres configuration (it has {sorted(configurations)})")
    dataset_json_file = plans_file.parent / "dataset.json"
    dataset_json = json.loads(dataset_json_file.read_text(encoding="utf-8")) if dataset_json_file.is_file() else None
    mappings = plans_channel_mappings(plans, "3d_fullres")
    like = settings_like_plans(mappings, channel_modalities_of(mappings, dataset_json), origin=str(plans_file))
    return plans_file, like.data, like.lines


def run_config_from_args(args: argparse.Namespace, base: RunConfig | None = None) -> RunConfig:
    """The settings of a run, each from the first of: flags, ``--intensity-like`` (the data settings that
    map like those plans), the --config file, ``base`` (a resumed run's recorded configuration), the
    method's recipe defaults, the defaults of EngineConfig and DataConfig."""
    from nnunet_ssl.pretraining.config import (
        EngineConfig,
        RunConfig,
        apply_method_defaults,
        data_config_from_dict,
        load_config_file,
    )

    start = base.to_dict() if base is not None else {}
    file_values = load_config_file(args.config) if args.config else {}
    method = args.method or file_values.get("method") or start.get("method")
    if not method:
        raise ValueError("no method: pass --method NAME (or method in --config; --list-methods shows them)")
    data_values = {**start.get("data", {}), **file_values.get("data", {})}
    if args.data:
        data_values["inputs"] = args.data
    if "inputs" not in data_values:
        raise ValueError("no pretraining data: pass --data PATH... (or data.inputs in --config)")
    data_values.setdefault("cache_dir", str(Path(args.out) / "cache"))
    if getattr(args, "intensity_like", None):
        plans_file, like, lines = _intensity_like(args.intensity_like, method)
        if args.intensity is not None and args.intensity != like["intensity"]:
            raise ValueError(f"--intensity {args.intensity} contradicts --intensity-like: {plans_file} maps with "
                             f"{like['intensity']} ({'; '.join(lines)}); drop one of them")
        replaced = [f"{key} {data_values[key]} -> {value}" for key, value in like.items()
                    if key in data_values and data_values[key] != value]
        data_values.update(like)
        logger.info("intensities like %s: %s%s", plans_file, "; ".join(lines),
                    f" (replacing {', '.join(replaced)})" if replaced else "")
    for flag, key in (("cache_dir", "cache_dir"), ("modality", "modality"), ("crop_size", "crop_size"),
                      ("workers", "num_workers"), ("spacing", "spacing"), ("intensity", "intensity"),
                      ("augmentation", "augmentation")):
        if getattr(args, flag) is not None:
            data_values[key] = getattr(args, flag)
    engine_values = {**start.get("engine", {}), **file_values.get("engine", {})}
    engine_flags = {"epochs": args.epochs, "batch_size": args.batch_size, "max_steps": args.max_steps,
                    "base_lr": args.lr, "warmup_epochs": args.warmup_epochs, "seed": args.seed, "amp": args.amp,
                    "checkpoint_every": args.checkpoint_every, "optimizer": args.optimizer,
                    "momentum": args.momentum, "nesterov": args.nesterov, "schedule": args.schedule,
                    "weight_decay": args.weight_decay, "grad_clip": args.grad_clip,
                    "lr_reference_batch": args.lr_reference_batch}
    engine_values.update({k: v for k, v in engine_flags.items() if v is not None})
    engine_values, data_values = apply_method_defaults(method, engine_values, data_values)
    data = data_config_from_dict(data_values)
    engine = EngineConfig(**engine_values)
    overrides = {**start.get("method_overrides", {}), **file_values.get("method_overrides", {}),
                 **_parse_overrides(args.set)}
    return RunConfig(
        method=method,
        data=data,
        preset=args.preset or file_values.get("preset") or start.get("preset") or "",
        in_channels=file_values.get("in_channels", start.get("in_channels", 1)),
        method_overrides=overrides,
        engine=engine,
    )


def cmd_pretrain(args: argparse.Namespace) -> int:
    if args.list_methods:
        from nnunet_ssl.pretraining.methods.listing import method_lines

        sys.stdout.write("\n".join(method_lines()) + "\n")
        return 0
    from nnunet_ssl.pretraining.engine import Engine
    from nnunet_ssl.pretraining.resume import recorded_run_config

    if not args.out:
        raise ValueError("give the run folder with --out")
    check_output_folder(args.out)
    # a resume starts from what the run recorded: flags given again must match it (the engine checks)
    base = recorded_run_config(Path(args.out)) if args.resume else None
    config = run_config_from_args(args, base)
    if not config.method:
        raise ValueError("choose a method with --method")
    Engine(config, Path(args.out), resume=args.resume, progress=not args.no_progress).run()
    return 0


def _target_of(args: argparse.Namespace) -> DatasetTarget:
    """The dataset a weights file is for: ``-p PLANS.json``, or ``-d`` with a plans identifier."""
    from nnunet_ssl.weights.targets import resolve_target, target_from_plans_file

    if args.plans.endswith(".json"):
        return target_from_plans_file(Path(args.plans), args.configuration)
    if args.dataset is not None:
        return resolve_target(args.dataset, args.configuration, args.plans)
    raise ValueError("say which dataset the weights are for: --dataset ID, or --plans PLANS.json")


def cmd_export(args: argparse.Namespace) -> int:
    from nnunet_ssl.weights.export import export_nnssl, export_run
    from nnunet_ssl.weights.format import save_weights_file

    check_output_file(args.out, force=args.force, sources=[args.run_dir])
    if args.format == "nnssl":
        from nnunet_ssl.weights.nnssl import PLAN_FILE

        check_output_file(Path(args.out).parent / PLAN_FILE, force=args.force, sources=[args.run_dir])
        export_nnssl(Path(args.run_dir), Path(args.out), source=getattr(args, "from"))
        return 0
    target = _target_of(args)
    policy = ""
    if args.policy:
        from nnunet_ssl.trainers.policy import parse_policy

        policy = parse_policy(args.policy, origin="--policy").to_string()
        policy = "" if policy == "none" else policy
    payload = export_run(
        Path(args.run_dir), target, source=getattr(args, "from"), decoder_seed=args.decoder_seed,
        channels=args.channels, finetune_policy=policy, encoder_only=args.encoder_only,
    )
    path = save_weights_file(payload, args.out)
    meta = payload["metadata"]
    logger.info(
        "wrote %s: %s encoder (%s, digest %s) and a %s decoder for %s %s, %d channel(s), %d outputs; channels: %s; "
        "policy: %s",
        path, meta["method"], meta["preset"] or meta["family"], meta["encoder_digest"], meta.get("decoder", "fresh"),
        target.dataset_name, target.configuration, target.in_channels, target.num_classes, meta["channel_adaptation"],
        policy or "none",
    )
    log_intensity_report(meta.get("intensity"), target)
    return 0


def log_intensity_report(intensity: dict[str, object] | None, target: DatasetTarget) -> None:
    """Log how far the fine-tuning plans' intensity mapping is from the weights' pretraining one, measured on a
    few of the dataset's raw training images (:func:`~nnunet_ssl.weights.intensity.intensity_report`)."""
    from nnunet_ssl.weights.intensity import intensity_report

    try:
        plans = json.loads(target.plans_file.read_text(encoding="utf-8"))
        dataset_json = json.loads((target.plans_file.parent / "dataset.json").read_text(encoding="utf-8"))
        report = intensity_report(intensity, plans, target.configuration, dataset_json)
    except (OSError, ValueError, KeyError) as error:  # the file is written: the check must not fail the export
        logger.warning("intensities not checked against %s: %s", target.plans_file, error)
        return
    for note in report.notes:
        logger.info("intensities: %s", note)
    for warning in report.warnings:
        logger.warning("%s", warning)


def cmd_convert(args: argparse.Namespace) -> int:
    from nnunet_ssl.weights.convert_file import convert_file
    from nnunet_ssl.weights.format import save_weights_file

    check_output_file(args.out, force=args.force, sources=[args.source])
    target = _target_of(args)
    payload, report = convert_file(
        args.source, target, preset_name=args.preset, layout=args.layout, prefix=args.prefix,
        allow_partial=args.allow_partial, method=args.method, decoder_seed=args.decoder_seed,
        channels=args.channels, encoder_only=args.encoder_only, export_from=getattr(args, "from"),
    )
    for line in report.lines(limit=10**6 if args.verbose else 8):
        sys.stdout.write(f"  {line}\n")
    if args.verbose:
        for ours, theirs in {**report.matched, **report.derived}.items():
            sys.stdout.write(f"    {ours} <- {theirs}\n")
    path = save_weights_file(payload, args.out)
    meta = payload["metadata"]
    logger.info(
        "wrote %s: %s weights (%s layout, preset %s, digest %s) for %s %s, %d channel(s), %d outputs",
        path, meta["method"], meta["conversion"]["layout"], meta["preset"], meta["encoder_digest"],
        target.dataset_name, target.configuration, target.in_channels, target.num_classes,
    )
    return 0


def cmd_cka(args: argparse.Namespace) -> int:
    from nnunet_ssl.analysis.cka.render import format_table
    from nnunet_ssl.analysis.cka.run import CKASettings, run_cka, write_outputs

    check_output_folder(args.out)
    settings = CKASettings(
        pretrained=args.pretrained, finetuned=args.finetuned, data=args.data, out=args.out, layers=args.layers,
        checkpoint=args.checkpoint, patches_per_case=args.patches_per_case, batch_size=args.batch_size,
        seed=args.seed, device=args.device,
    )
    result = run_cka(settings)
    paths = write_outputs(result, settings)
    logger.info("CKA pretrained vs fine-tuned %s encoder, same layer (%d patches):\n%s",
                result.provenance["family"], result.examples, format_table(result.per_layer()))
    logger.info("wrote %s", ", ".join(str(p) for p in paths))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import os

    from nnunet_ssl.analysis.report import ReportConfig, make_report
    from nnunet_ssl.analysis.tables import headline_markdown

    check_output_folder(args.out)
    results, preprocessed = os.environ.get("nnUNet_results"), os.environ.get("nnUNet_preprocessed")
    if not results:
        raise ValueError("nnUNet_results is not set; export it as for any nnU-Net command")
    if not preprocessed:
        logger.warning("nnUNet_preprocessed is not set: no few-shot manifest and no check against splits_final.json")
    config = ReportConfig(
        dataset=args.dataset, trainers=tuple(args.trainers), out_dir=Path(args.out), results_root=Path(results),
        preprocessed_root=Path(preprocessed) if preprocessed else None, reference=args.reference, plans=args.plans,
        configuration=args.configuration, folds=tuple(args.folds) if args.folds else None,
        test_images=Path(args.test_images) if args.test_images else None,
        test_labels=Path(args.test_labels) if args.test_labels else None,
        checkpoint=args.checkpoint, device=args.device, hd95=args.hd95,
        predictions=Path(args.predictions) if args.predictions else None,
    )
    report = make_report(config)
    sys.stdout.write(headline_markdown(report))
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from nnunet_ssl.experiment.spec import load_experiment

    if args.action == "emit" and args.out:
        check_output_file(args.out, force=args.force, sources=[args.file])
    experiment = load_experiment(args.file)
    if args.job and args.action != "run":
        raise ValueError(f"--job is an option of experiment run, not of experiment {args.action}")
    if args.action == "run":
        from nnunet_ssl.experiment.runner import FAILED, RunInterrupted, run_experiment

        try:
            status = run_experiment(experiment, args.jobs, progress=not args.no_progress, only=args.job or ())
        except RunInterrupted as interrupt:  # one line, the jobs recorded, 130 (Ctrl-C) or 143 (SIGTERM)
            logger.error("%s", interrupt.line(experiment.source))
            return interrupt.exit_code
        return 1 if any(s == FAILED for s, _ in status.values()) else 0
    if args.action == "emit":
        from nnunet_ssl.experiment.emit import array_tasks, render
        from nnunet_ssl.experiment.runner import prepare

        prepared = prepare(experiment)
        text = render(prepared.jobs, experiment, args.format)
        prepared.paths.logs.mkdir(parents=True, exist_ok=True)  # SLURM opens --output there before the script runs
        if args.out:
            from nnunet_ssl.io import atomic_write_text

            atomic_write_text(text, args.out)
            if args.format == "slurm":
                logger.info("wrote %d array task(s) for %d job(s) to %s; submit with: sbatch %s",
                            len(array_tasks(prepared.jobs)), len(prepared.jobs), args.out, args.out)
            else:
                logger.info("wrote %d job(s) to %s", len(prepared.jobs), args.out)
        else:
            sys.stdout.write(text)
        return 0
    from nnunet_ssl.experiment.report import make_experiment_report

    report = make_experiment_report(experiment, cka=not args.no_cka, device=args.device)
    sys.stdout.write(report.markdown)
    return 0


def add_force_argument(parser: argparse.ArgumentParser, what: str = "--out") -> None:
    """``--force``: replace an existing output file (never the command's source)."""
    parser.add_argument("--force", action="store_true",
                        help=f"replace {what} if it exists (never the source the command reads)")


def add_channels_argument(parser: argparse.ArgumentParser) -> None:
    """``--channels``: how a weights file's stem meets a dataset with another channel count (export, convert)."""
    parser.add_argument(
        "--channels", choices=["replicate", "first", "mean"], default="replicate",
        help="stem adaptation when the dataset's channel count differs from the weights': replicate "
        "(copy x C, scale 1/C; default), first (channel 0 only, others zero), mean (many to fewer)",
    )


def _add_no_arguments(parser: argparse.ArgumentParser) -> None:
    """``ext-path`` and ``trainers`` take no arguments."""


def _add_make_phantoms_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (gets nnUNet_raw/ and unlabeled/)")
    parser.add_argument("--num-train", type=int, default=12,
                        help="labelled training cases, imagesTr/labelsTr (default 12)")
    parser.add_argument("--num-test", type=int, default=4,
                        help="labelled test cases, imagesTs/labelsTs, numbered after the training cases (default 4)")
    parser.add_argument("--num-unlabeled", type=int, default=16,
                        help="unlabelled volumes for pretraining, in unlabeled/ (default 16)")
    parser.add_argument("--seed", type=int, default=0,
                        help="root seed; every case draws from its own stream derived from it (default 0)")
    parser.add_argument("--modality", choices=["ct", "mr"], default="ct",
                        help="ct (default): abdominal CT (liver, spleen, kidneys, lesions); mr: T1-like heads (grey "
                        "matter, white matter, ventricles; channel T1) in a large noisy background that goes negative, "
                        "with per-case gain and bias field")
    parser.add_argument("--dataset-id", type=int, default=None,
                        help="nnU-Net dataset id, 1-999, zero-padded in the folder name (default 501: "
                        "nnUNet_raw/Dataset501_Phantom; --modality mr: 502, Dataset502_PhantomMR)")


def _add_pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("An option left out takes its value from --config, else (with --resume) from the run's "
                     "config.json, else from the method's recipe (spark3d: SGD, poly, z-score, 160^3 crops; the "
                     "log names each setting taken from it), else the default shown.")
    parser.add_argument("--method", help="a method name (--list-methods shows them all)")
    parser.add_argument("--list-methods", action="store_true",
                        help="print every method (family, views, heads, loss terms with default weights) and exit")
    parser.add_argument("--data", nargs="+", help="folders, files, nnU-Net raw datasets or path lists")
    parser.add_argument("--out", help="run folder (checkpoints, metrics.jsonl, loss_curves.png); required to train")
    parser.add_argument("--preset", help="network preset, of the method's network family (default: the family's, "
                        "smit for the Swin methods, resenc_l for the ResEnc ones)")
    parser.add_argument("--config", help="JSON/YAML with data/engine/method_overrides sections")
    parser.add_argument("--epochs", type=int, help="passes over the pretraining volumes (default 500, the paper's)")
    parser.add_argument("--max-steps", type=int, help="stop after this many steps (for quick runs)")
    parser.add_argument("--batch-size", type=int, help="volumes per process and step (default 2)")
    parser.add_argument("--lr", type=float,
                        help="peak lr at the reference batch of 2 (scaled with the global batch; default 2e-4)")
    parser.add_argument("--lr-reference-batch", type=int,
                        help="global batch at which --lr applies; other global batches scale it linearly (default 2)")
    parser.add_argument("--optimizer", choices=["adamw", "sgd"],
                        help="adamw (the Swin paper's; default) or sgd (nnU-Net's, with --momentum and --nesterov); "
                        "both leave norms, biases and tokens without weight decay")
    parser.add_argument("--momentum", type=float, help="SGD momentum, in [0, 1) (default 0.9; adamw ignores it)")
    parser.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None,
                        help="Nesterov momentum for SGD (default off; adamw ignores it)")
    parser.add_argument("--schedule", choices=["cosine", "poly"],
                        help="learning rate after the warm-up: cosine down to 1e-6 (default) or poly, nnU-Net's "
                        "lr * (1 - t / T) ** 0.9 down to 0")
    parser.add_argument("--weight-decay", type=float,
                        help="weight decay of the weights (never of norms, biases and tokens; default 0.05)")
    parser.add_argument("--grad-clip", type=float, help="max global gradient norm, 0 for none (default 3)")
    parser.add_argument("--warmup-epochs", type=float,
                        help="epochs of linear learning-rate warm-up before the cosine decay (converted to steps; "
                        "default 30)")
    parser.add_argument("--seed", type=int,
                        help="seed of the parameter initialisation, the crops and the masks (default 0)")
    parser.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"],
                        help="mixed precision on a GPU: auto (bf16 where the GPU supports it, else fp16 with a "
                        "gradient scaler; default), bf16, fp16, or off (float32); a CPU always runs float32")
    parser.add_argument("--checkpoint-every", type=int,
                        help="steps between checkpoints; one is always written at the end (default 200)")
    parser.add_argument("--modality", choices=["ct", "mr"],
                        help="modality of every input volume: ct (an HU window, default -500 500, mapped to [0, 1]) "
                        "or mr (per-image percentiles, default 5 95, mapped to [0, 1]); default: per volume from "
                        "nnU-Net's channel_names, the DICOM Modality tag, else its intensities (ambiguous volumes are "
                        "skipped)")
    parser.add_argument("--intensity", choices=["window", "zscore", "zscore_nonzero", "minmax"],
                        help="intensity mapping of the cached volumes: window (CT: the HU window, MR: per-image "
                        "percentiles or data.mr_window, to [0, 1]; default), zscore (per image, nnU-Net's "
                        "ZScoreNormalization, CT and MR alike), zscore_nonzero (the same inside the nonzero region, "
                        "0 outside: use_mask_for_norm) or minmax (per image, RescaleTo01Normalization)")
    parser.add_argument("--intensity-like", nargs="+", metavar=("DATASET", "PLANS"),
                        help="map intensities as these nnU-Net plans do, so that pretraining and fine-tuning see the "
                        "same values: DATASET (name or id in nnUNet_preprocessed) and PLANS (identifier; default the "
                        "method family's: nnUNetSwinPlans or nnUNetResEncSSLPlans), or one plans .json file. Sets "
                        "--intensity and the windows from the 3d_fullres normalisation of each channel: a "
                        "CTNormalization window -> window with that CT or MR window, RescaleTo01Normalization -> "
                        "minmax, ZScoreNormalization -> zscore (zscore_nonzero with use_mask_for_norm); nnU-Net's "
                        "dataset-statistics CTNormalization and mixed schemes are refused")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                        help="target spacing in mm along the image x, y, z axes the volumes are resampled to "
                        "(default 1.5 1.5 2)")
    parser.add_argument("--crop-size", type=int, help="edge of the cubic crops (views) in voxels (default 96)")
    parser.add_argument("--augmentation", choices=["none", "scale_rotate_mirror"],
                        help="spatial augmentation of each crop in the loader: none (default) or scale_rotate_mirror "
                        "(nnU-Net's: scaling 0.7-1.4 and rotation up to 30 degrees, each with p 0.2, mirroring per "
                        "axis with p 0.5)")
    parser.add_argument("--workers", type=int,
                        help="background processes for preprocessing and loading crops; 0 = in this process (default 2)")
    parser.add_argument("--cache-dir", help="preprocessed volume cache (default RUN_DIR/cache)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="method settings, e.g. mask_ratio=0.6")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """``-d``, ``-c``, ``-p``: the dataset plans a weights file is built for (export, convert)."""
    parser.add_argument("-d", "--dataset", help="dataset name or id (reads nnUNet_preprocessed)")
    parser.add_argument("-c", "--configuration", default="3d_fullres",
                        help="nnU-Net configuration of the plans the weights are for (default 3d_fullres)")
    parser.add_argument("-p", "--plans", default="nnUNetPlans",
                        help="plans identifier, or a path to a plans .json (default nnUNetPlans)")


def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="pretraining run folder (pretrain --out) or one of its checkpoints; a run "
                        "folder gives its final checkpoint, else its latest (with a warning)")
    _add_target_arguments(parser)
    parser.add_argument("--out", required=True, help="weights file to write (refused if it exists, unless --force)")
    add_force_argument(parser)
    parser.add_argument("--format", choices=["nnunet", "nnssl"], default="nnunet",
                        help="nnunet (default): a -pretrained_weights file for the dataset's plans (-d, -p); nnssl: "
                        "nnssl's interchange checkpoint of a ResEnc run (the whole U-Net, with adaptation_plan.json "
                        "written beside --out; no dataset needed)")
    parser.add_argument("--from", choices=["default", "teacher", "student"], default="default",
                        help="which encoder: default = teacher for distillation methods, else the student")
    parser.add_argument("--decoder-seed", type=int, default=0,
                        help="seed of the freshly initialised decoder stored beside the encoder, so an export is "
                        "reproducible (default 0)")
    parser.add_argument("--encoder-only", action="store_true",
                        help="a fresh seeded decoder even when the method pretrained one (Spark3D trains the whole "
                        "U-Net and its decoder is exported by default; the Spark3D paper compares both variants)")
    add_channels_argument(parser)
    parser.add_argument("--policy", default="", metavar="POLICY",
                        help="fine-tuning policy stored in the file for the trainer, e.g. "
                        "freeze_encoder_epochs=50,encoder_lr_warmup_epochs=10 (NNUNET_SSL_FINETUNE overrides it)")


def _add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="model_swinvit.pt-style MONAI checkpoint, MONAI SwinUNETR state dict, SMIT "
                        "checkpoint, nnssl checkpoint (ResEnc; its adaptation plan inside or adaptation_plan.json "
                        "beside), or an nnunet-ssl pretraining run (folder or checkpoint)")
    _add_target_arguments(parser)
    parser.add_argument("--out", required=True, help="weights file to write (refused if it exists, unless --force)")
    add_force_argument(parser)
    parser.add_argument("--preset", help="architecture preset (default: monai_ssl for MONAI self-supervised "
                        "checkpoints, smit_public for SMIT, the run's for our runs; required for a full SwinUNETR)")
    parser.add_argument("--layout", choices=["monai_ssl", "monai_swinunetr", "smit", "nnssl"], help="skip layout detection")
    parser.add_argument("--prefix", help="key prefix of the encoder when the file holds several")
    parser.add_argument("--method", help="method recorded in the metadata (default: by layout)")
    parser.add_argument("--allow-partial", action="store_true",
                        help="write the file even if keys are missing, unplaced or of another shape (they stay fresh)")
    parser.add_argument("--decoder-seed", type=int, default=0,
                        help="seed of the freshly initialised parts (the decoder, and encoder keys the source lacks), "
                        "so a conversion is reproducible (default 0)")
    parser.add_argument("--encoder-only", action="store_true",
                        help="a fresh seeded decoder even when the source holds a pretrained one (nnssl checkpoints, "
                        "Spark3D runs)")
    parser.add_argument("--from", choices=["default", "teacher", "student"], default="default",
                        help="for one of our runs: which encoder, as `export --from` (default: the teacher of "
                        "distillation methods, else the student)")
    add_channels_argument(parser)


def _add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-d", "--dataset", required=True, help="dataset name or id in nnUNet_raw")
    parser.add_argument("--family", choices=["swin", "resenc"], default="swin",
                        help="network family the plans are for (default swin). resenc: plans whose architecture is "
                        "the pretrained ResEnc topology (1 mm, z-score per image, patch fitted to the data up to the "
                        "preset's), plans name nnUNetResEncSSLPlans; the Swin options below do not apply")
    parser.add_argument("--preset", default=None,
                        help="architecture preset (default smit; resenc_l with --family resenc, or resenc_tiny for "
                        "a CPU); Swin: its input size is the patch")
    parser.add_argument("--modality", choices=["ct", "mr"],
                        help="for every channel (default: dataset.json channel names)")
    parser.add_argument("--hu-window", type=float, nargs=2, default=[-175.0, 250.0], metavar=("LOW", "HIGH"),
                        help="CT window in HU mapped to [0, 1] (default -175 250)")
    parser.add_argument("--mr-normalization", choices=["percentile", "window", "minmax", "zscore"],
                        default="percentile",
                        help="MR channels: percentile (default): the paper's and pretraining's per-image percentiles "
                        "to [0, 1], through the nnU-Net scheme closest to it on the foreground (one window for all "
                        "images, or per-image min-max; a window that clips an image's anatomy is not chosen); or "
                        "force a scheme: window (the images' median percentiles, or --mr-window), minmax (per "
                        "image), zscore (nnU-Net's, not [0, 1]). Every choice is measured and reported (errors, "
                        "the contrast between the labelled structures before and after)")
    parser.add_argument("--mr-percentiles", type=float, nargs=2, default=[5.0, 95.0], metavar=("LOW", "HIGH"),
                        help="MR percentiles mapped to 0 and 1 (default 5 95)")
    parser.add_argument("--mr-window", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="a fixed MR window mapped to [0, 1] instead (e.g. 0 400; implies --mr-normalization "
                        "window)")
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.5, 1.5, 2.0], metavar=("X", "Y", "Z"),
                        help="target spacing in mm along the image x, y, z axes (default 1.5 1.5 2)")
    parser.add_argument("--patch-size", type=int, nargs=3, metavar=("Z", "Y", "X"),
                        help="patch size in nnU-Net's axis order (default: Swin, the preset's, cubic; resenc, fitted "
                        "to the median image, multiples of 32 in [64, the preset's])")
    parser.add_argument("--batch-size", type=int, default=2, help="patches per training step, written to the plans "
                        "(default 2)")
    parser.add_argument("--plans-name", default=None,
                        help="plans identifier for -p (default nnUNetSwinPlans; nnUNetResEncSSLPlans with --family "
                        "resenc)")
    parser.add_argument("-np", "--num-processes", type=int, default=2, help="preprocessing processes (default 2)")
    parser.add_argument("--verify", action="store_true", help="run nnU-Net's dataset integrity check first")


def _add_split_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-d", "--dataset", required=True, help="dataset name or id (must be preprocessed)")
    parser.add_argument("--shots", type=int, nargs="+", help="few-shot training set sizes, e.g. 5 10 20")
    parser.add_argument("--sizes", type=int, nargs="+", help="data-limited training set sizes, e.g. 20 40 60")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="one nested family of folds per seed (default 0)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--val-cases", type=int, help="draw a fixed validation set of N cases")
    group.add_argument("--val-from-fold", type=int, help="use this fold's validation set (default: fold 0)")
    parser.add_argument("--list", action="store_true", help="show the folds made so far and exit")


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_work", help="work folder (default: demo_work)")


def _add_inspect_weights_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="weights file written by `nnunet-ssl export` or `nnunet-ssl convert`")
    parser.add_argument("--trainer", help="trainer name to check against, e.g. SwinSMITTrainer")
    parser.add_argument("-d", "--dataset", help="dataset name or id (needs nnUNet_preprocessed)")
    parser.add_argument("-c", "--configuration", default="3d_fullres",
                        help="nnU-Net configuration checked against with --trainer (default 3d_fullres)")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")


def _add_cka_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pretrained", required=True,
                        help="weights file from `nnunet-ssl export`, or a pretraining run (Swin or ResEnc; the "
                             "fine-tuned network's architecture)")
    parser.add_argument("--finetuned", required=True,
                        help="nnU-Net results fold: .../<Trainer>__<plans>__<config>/fold_N of a Swin trainer, or of "
                             "any trainer whose network nnU-Net builds from the plans (ResEnc; nnUNetTrainer too)")
    parser.add_argument("--data", required=True,
                        help="raw images in nnU-Net format (CASE_0000.nii.gz ...), e.g. imagesTs")
    parser.add_argument("--out", required=True, help="output folder (CSV tables, PNG figures, settings)")
    parser.add_argument("--layers", default="all",
                        help="'all' (default) or comma-separated names: embed,stage1.block1,... (Swin blocks), "
                             "stem,stage1.block1,... (ResEnc residual blocks)")
    parser.add_argument("--checkpoint", choices=["final", "best"], default="final", help="fold checkpoint to compare")
    parser.add_argument("--patches-per-case", type=int, default=4, help="seeded random crops per case (default 4)")
    parser.add_argument("--batch-size", type=int, default=8, help="patches per minibatch, at least 4 (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patch positions (default 0)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")


def _add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-d", "--dataset", required=True, help="dataset name or id")
    parser.add_argument("--trainers", nargs="+", required=True, help="trainer class names to compare")
    parser.add_argument("--reference",
                        help="trainer the others are compared with (default: the first of --trainers)")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("-c", "--configuration", default="3d_fullres",
                        help="nnU-Net configuration of the trained folds (default 3d_fullres)")
    parser.add_argument("-f", "--folds", type=int, nargs="+",
                        help="folds (default: all found, plus the few-shot manifest's)")
    parser.add_argument("--test-images", help="score on this test set (nnU-Net layout, CASE_0000.nii.gz ...) ...")
    parser.add_argument("--test-labels", help="... with these labels (CASE.nii.gz); default: nnU-Net's validation")
    parser.add_argument("--checkpoint", choices=["final", "best"], default="final", help="checkpoint to predict with")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="prediction device (default: cuda if available)")
    parser.add_argument("--hd95", action="store_true",
                        help="also the 95th-percentile Hausdorff distance (needs MONAI)")
    parser.add_argument("--predictions", help="score existing test predictions in DIR/<trainer>/fold_N/ "
                        "(e.g. from nnUNetv2_predict) instead of predicting")
    parser.add_argument("--out", required=True, help="report folder (report.md, CSVs, PNGs, predictions/)")


def _add_experiment_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["run", "emit", "report"],
                        help="run: train/validate/predict every job; emit: print the grid as shell; report: the tables")
    parser.add_argument("file", help="experiment file (YAML)")
    parser.add_argument("--jobs", type=int, default=1, help="run: jobs at a time (default 1)")
    parser.add_argument("--job", action="append", metavar="ID",
                        help="run: only this job (repeatable) and the jobs it depends on, skipped when done; the ids "
                        "are the log names in logs/ (each task of the SLURM script runs its jobs so)")
    parser.add_argument("--no-progress", action="store_true", help="run: no progress bar")
    parser.add_argument("--format", choices=["commands", "slurm"], default="commands",
                        help="emit: one command a line, or a SLURM job-array script (resources from the file's "
                        "slurm: section)")
    parser.add_argument("--out",
                        help="emit: write to this file instead of stdout (refused if it exists, unless --force)")
    add_force_argument(parser, "emit's --out file")
    parser.add_argument("--no-cka", action="store_true", help="report: skip the few-shot vs full-data CKA")
    parser.add_argument("--device", default="cpu", help="report: device of the CKA forward passes (default cpu)")


_Command = tuple[str, Callable[[argparse.Namespace], int], str, Callable[[argparse.ArgumentParser], None]]


def _commands() -> tuple[_Command, ...]:
    """Every subcommand in ``--help`` order: name, handler, one-line help, the function that adds its arguments.

    Built on each call, so a parser calls the module's handlers as they are then (tests replace some).
    """
    return (
        ("ext-path", cmd_ext_path, "print the folder for nnUNet_extTrainer", _add_no_arguments),
        ("trainers", cmd_trainers, "list the plugin's nnU-Net trainers", _add_no_arguments),
        ("make-phantoms", cmd_make_phantoms, "generate synthetic CT or T1-like MR phantoms in nnU-Net raw format",
         _add_make_phantoms_arguments),
        ("pretrain", cmd_pretrain, "pretrain the Swin encoder on unlabeled volumes", _add_pretrain_arguments),
        ("export", cmd_export, "write a -pretrained_weights file for a dataset's plans from a pretraining run",
         _add_export_arguments),
        ("convert", cmd_convert, "write a -pretrained_weights file from MONAI/SMIT weights or a pretraining run",
         _add_convert_arguments),
        ("plan", cmd_plan, "plan and preprocess a dataset with the paper's setup (own plans file)", _add_plan_arguments),
        ("split", cmd_split, "append nested few-shot / data-limited folds to splits_final.json", _add_split_arguments),
        ("demo", cmd_demo, "run the whole story on generated phantoms (resumes when re-run)", _add_demo_arguments),
        ("inspect-weights", cmd_inspect_weights, "print a weights file's metadata and check it against a trainer",
         _add_inspect_weights_arguments),
        ("cka", cmd_cka, "layer-wise CKA between a pretrained encoder and its fine-tuned nnU-Net encoder",
         _add_cka_arguments),
        ("report", cmd_report, "transfer report: Dice, gap % and Wilcoxon p vs a reference, few-shot, curves",
         _add_report_arguments),
        ("experiment", cmd_experiment, "the benchmark grid of an experiment file: run it, emit it, report it",
         _add_experiment_arguments),
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``nnunet-ssl`` parser: ``-v`` and one subcommand of :func:`_commands`."""
    parser = argparse.ArgumentParser(prog="nnunet-ssl", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, handler, help_text, add_arguments in _commands():
        # argparse %-formats help strings (not descriptions): a literal % must be doubled there
        command = sub.add_parser(name, help=help_text.replace("%", "%%"), description=help_text)
        command.set_defaults(handler=handler)
        add_arguments(command)
    return parser


def tolerate_narrow_terminals() -> None:
    """Let tables with +/- signs and arrows reach a terminal whose encoding lacks them (an ASCII locale).

    Python encodes stdout strictly in such a locale, so ``nnunet-ssl report`` would die on its own
    table after the work was done; escaping the few characters instead keeps the output readable.
    Files are always written as UTF-8.
    """
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and stream.encoding.lower().replace("-", "") != "utf8":
            stream.reconfigure(errors="backslashreplace")


def describe_os_error(error: OSError) -> str:
    """One line naming the file and the problem: ``PATH: Permission denied``, ``cannot write PATH: ...``.

    An ``OSError`` class with its own ``__str__`` (:class:`~nnunet_ssl.outputs.WriteError`, split's
    write error) or without a file name (``FileNotFoundError("PATH: no such ...")``) words its own message.
    """
    if type(error).__str__ is not OSError.__str__ or error.filename is None or not error.strerror:
        return str(error) or error.__class__.__name__
    names = str(error.filename) + (f" -> {error.filename2}" if error.filename2 is not None else "")
    return f"{names}: {error.strerror}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Refused inputs and failed file operations end as one ``ERROR`` line and exit code 1.

    The boundary catches ``OSError`` (permission, a folder where a file should be, not found, disk
    full), ``ValueError`` (every refusal class of the package derives from it: WeightsError,
    SplitError, ExperimentError, OutputError, ...) and ``SystemExit`` with a message; anything else
    (a ``TypeError``, an ``AttributeError``) is a bug and keeps its traceback. With ``-v`` the
    traceback of a refusal is logged at DEBUG. Ctrl-C ends with "interrupted" and exit code 130.
    """
    tolerate_narrow_terminals()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in QUIET_LOGGERS:  # third-party INFO chatter on import (e.g. "NumExpr defaulting to 2 threads")
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130
    except OSError as error:
        return _refused(describe_os_error(error), error)
    except ValueError as error:
        return _refused(str(error) or error.__class__.__name__, error)
    except SystemExit as error:
        if isinstance(error.code, str):  # raise SystemExit("message"): a refusal worded by the code
            return _refused(error.code, error)
        raise


def _refused(message: str, error: BaseException) -> int:
    logger.debug("traceback of the error below:", exc_info=error)
    logger.error("%s", message)
    return 1


if __name__ == "__main__":
    sys.exit(main())

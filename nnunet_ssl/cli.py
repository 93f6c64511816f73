"""The ``nnunet-ssl`` command: everything that is not an nnU-Net command.

Only this module parses arguments and configures logging.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

logger = logging.getLogger("nnunet_ssl")


def ext_trainer_path() -> Path:
    """Folder to put in ``nnUNet_extTrainer`` (re-export shims of the plugin's trainers)."""
    from nnunet_ssl import nnunet_ext

    return Path(nnunet_ext.__file__).resolve().parent


def cmd_ext_path(args: argparse.Namespace) -> int:
    sys.stdout.write(f"{ext_trainer_path()}\n")
    return 0


def cmd_make_phantoms(args: argparse.Namespace) -> int:
    from nnunet_ssl.data.phantoms import PhantomConfig, write_phantom_datasets

    config = PhantomConfig(
        num_train=args.num_train,
        num_test=args.num_test,
        num_unlabeled=args.num_unlabeled,
        seed=args.seed,
        dataset_id=args.dataset_id,
    )
    paths = write_phantom_datasets(Path(args.out), config)
    logger.info("labeled dataset: %s", paths.dataset_dir)
    logger.info("unlabeled pool:  %s", paths.unlabeled_dir)
    logger.info("use it with: export nnUNet_raw=%s", paths.raw_root)
    return 0


def cmd_trainers(args: argparse.Namespace) -> int:
    from nnunet_ssl.trainers.base import describe
    from nnunet_ssl.trainers.named import TRAINERS

    rows = [describe(cls) for cls in TRAINERS.values()]
    header = f"{'trainer':42s} {'preset':8s} {'method':15s} {'epochs':>6s} {'it/epoch':>8s}"
    lines = [header, "-" * len(header)]
    lines += [
        f"{r['trainer']:42s} {r['preset']:8s} {r['method']:15s} {r['epochs']:6d} {r['iterations_per_epoch']:8d}"
        for r in rows
    ]
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
        raise SystemExit("--trainer needs -d/--dataset to know the channels and classes to check against")

    from nnunet_ssl.trainers.named import TRAINERS
    from nnunet_ssl.weights.targets import network_for_target, resolve_target

    if args.trainer not in TRAINERS:
        raise SystemExit(f"unknown trainer {args.trainer!r}; `nnunet-ssl trainers` lists them")
    target = resolve_target(args.dataset, args.configuration, args.plans)
    network = network_for_target(TRAINERS[args.trainer], target)
    check_weights_against_network(args.file, network, args.trainer)
    sys.stdout.write(
        f"OK: fits {args.trainer} on {target.dataset_name} ({target.configuration}, {target.plans_file.name}): "
        f"{target.in_channels} channel(s), {target.num_classes} outputs\n"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunet-ssl", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, handler: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    add("ext-path", cmd_ext_path, "print the folder for nnUNet_extTrainer")
    add("trainers", cmd_trainers, "list the plugin's nnU-Net trainers")

    p = add("make-phantoms", cmd_make_phantoms, "generate synthetic CT phantoms in nnU-Net raw format")
    p.add_argument("--out", required=True, help="output folder (gets nnUNet_raw/ and unlabeled/)")
    p.add_argument("--num-train", type=int, default=12)
    p.add_argument("--num-test", type=int, default=4)
    p.add_argument("--num-unlabeled", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset-id", type=int, default=501)

    p = add("inspect-weights", cmd_inspect_weights, "print a weights file's metadata and check it against a trainer")
    p.add_argument("file")
    p.add_argument("--trainer", help="trainer name to check against, e.g. SwinSMITTrainer")
    p.add_argument("-d", "--dataset", help="dataset name or id (needs nnUNet_preprocessed)")
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    from nnunet_ssl.weights.format import WeightsError

    try:
        return args.handler(args)
    except (WeightsError, FileNotFoundError, FileExistsError, ValueError) as error:
        logger.error("%s", error)
        return 1


if __name__ == "__main__":
    sys.exit(main())

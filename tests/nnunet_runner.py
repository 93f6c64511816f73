"""Run nnU-Net and nnunet-ssl commands in subprocesses with a test's own nnU-Net folders."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from short_trainers import with_test_trainers

from nnunet_ssl.cpu_memory import with_freed_memory_kept
from nnunet_ssl.data.phantoms import PhantomConfig, write_phantom_datasets

BIN = Path(sys.executable).parent


class NnUNet:
    """nnU-Net's folders under ``root`` (raw data in ``raw``); every command gets them in its environment.

    nnU-Net finds the plugin's trainers and the tests' own (``short_trainers``) through ``nnUNet_extTrainer``.
    """

    def __init__(self, root: Path, raw: Path, dataset: str = "Dataset501_Phantom") -> None:
        self.root = root
        self.dataset = dataset
        # nnU-Net's commands keep freed memory for reuse, as the demo starts them (nnunet_ssl/cpu_memory.py)
        self.env = with_freed_memory_kept({
            **with_test_trainers(os.environ),
            "nnUNet_raw": str(raw),
            "nnUNet_preprocessed": str(root / "preprocessed"),
            "nnUNet_results": str(root / "results"),
            "nnUNet_def_n_proc": "1",
            "nnUNet_n_proc_DA": "1",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),  # conftest lowers it for parallel workers
        })

    def run(
        self, *args: str, check: bool = True, timeout: int = 900, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        """Run a command from the environment's bin folder; ``env`` adds to (or overrides) the folders' variables."""
        command = [str(BIN / args[0]), *args[1:]]
        result = subprocess.run(
            command, env={**self.env, **(env or {})}, capture_output=True, encoding="utf-8", errors="replace",
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result

    @classmethod
    def with_phantoms(cls, root: Path, config: PhantomConfig, *plan_args: str) -> NnUNet:
        """Phantoms of ``config`` under ``root``, planned and preprocessed by nnU-Net's own command (3d_fullres)."""
        paths = write_phantom_datasets(root, config)
        runner = cls(root, paths.raw_root)
        runner.run("nnUNetv2_plan_and_preprocess", "-d", str(config.dataset_id), "-c", "3d_fullres", "-np", "1",
                   *plan_args, timeout=1800)
        return runner

    @property
    def preprocessed(self) -> Path:
        return self.root / "preprocessed" / self.dataset

    def fold_dir(self, trainer: str, fold: int = 0, plans: str = "nnUNetPlans") -> Path:
        return self.root / "results" / self.dataset / f"{trainer}__{plans}__3d_fullres" / f"fold_{fold}"

    def training_log(self, trainer: str, fold: int = 0, plans: str = "nnUNetPlans") -> str:
        logs = sorted(self.fold_dir(trainer, fold, plans).glob("training_log_*.txt"))
        return "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in logs)

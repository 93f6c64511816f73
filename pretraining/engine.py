"""The one training loop for every pretraining method.

The engine owns the device, data-parallelism (PyTorch DDP under ``torchrun``), autocast, the
optimiser and learning-rate schedule, gradient clipping, checkpoints (atomic, resumable after
``kill -9``), the progress bar, the JSON-lines metrics log and the loss-curve PNG. The method owns
its networks, teacher and loss (see ``methods/base.py``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from nnunet_ssl.checkpoints import (  # noqa: F401 (load_checkpoint, find_checkpoint: re-exported)
    CHECKPOINT_FORMAT,
    FINAL,
    LATEST,
    PREVIOUS,
    encoder_digest,
    find_checkpoint,
    load_checkpoint,
)
from nnunet_ssl.io import atomic_json_dump, atomic_torch_save
from nnunet_ssl.optim import build_optimizer, scheduled_lr
from nnunet_ssl.pretraining.config import CONFIG_FILE, EngineConfig, RunConfig
from nnunet_ssl.pretraining.data import Manifest, build_cache, make_loader, summarize
from nnunet_ssl.pretraining.data import steps_per_epoch as volume_steps_per_epoch
from nnunet_ssl.pretraining.distributed import Collectives
from nnunet_ssl.pretraining.methods import METHODS, build_config, build_method, resolve_preset
from nnunet_ssl.pretraining.methods.base import (
    StepContext,
    after_step,
    before_optimizer_step,
    decoder_states,
    encoder_states,
    method_contract,
)
from nnunet_ssl.pretraining.metrics_log import MetricsLog, plot_loss_curves
from nnunet_ssl.pretraining.resume import RESUME_ORDER, ResumePoint, check_resume_config, find_resume_point
from nnunet_ssl.weights.intensity import pretraining_intensity

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class DistributedContext:
    """Rank layout of this process (a single process when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistributedContext:
    """Join the process group torchrun describes in the environment (``WORLD_SIZE`` > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistributedContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def run_method_overrides(config: RunConfig) -> dict[str, Any]:
    """The method settings of a run, with the crop size taken from the data settings (one source of truth)."""
    from dataclasses import fields

    _, config_class = METHODS[config.method] if config.method in METHODS else (None, None)
    overrides = dict(config.method_overrides)
    if config_class is not None and "crop_size" in {f.name for f in fields(config_class)}:
        overrides.setdefault("crop_size", config.data.crop_size)
    return overrides


def validate_run_config(config: RunConfig) -> None:
    """Raise ValueError for an unknown method, preset or method setting, or a preset of another network
    family than the method's, before any data is touched."""
    build_config(config.method, run_method_overrides(config))
    resolve_preset(config.method, config.preset)


def build_run_method(config: RunConfig) -> nn.Module:
    """The method of a run (see :func:`run_method_overrides`), built with its family's preset."""
    return build_method(config.method, config.preset, config.in_channels, run_method_overrides(config))


def describe_optimizer(engine: EngineConfig) -> str:
    """``"adamw"`` or ``"sgd (momentum 0.99, nesterov)"``, for the log."""
    if engine.optimizer != "sgd":
        return engine.optimizer
    return f"sgd (momentum {engine.momentum:g}{', nesterov' if engine.nesterov else ''})"


class ProgressLines:
    """When to log a progress line of a run without a progress bar: every tenth of the run and at least every
    ``interval_s`` seconds, and at the last step; each line has the step, loss, rate and time left."""

    def __init__(self, start_step: int, total_steps: int, interval_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.start_step, self.total_steps, self.interval_s, self.clock = start_step, total_steps, interval_s, clock
        self.started = self.last = clock()
        self.every = max(1, (total_steps - start_step) // 10)

    def line(self, done: int, loss: float, lr: float, volumes_per_s: float) -> str | None:
        """The line after ``done`` steps in all, or None when none is due."""
        now = self.clock()
        due = done == self.total_steps or (done - self.start_step) % self.every == 0 or now - self.last >= self.interval_s
        if not due:
            return None
        self.last = now
        per_step = (now - self.started) / max(1, done - self.start_step)
        left = per_step * (self.total_steps - done)
        return (f"pretraining step {done}/{self.total_steps} ({done / self.total_steps:.0%}): loss {loss:.4f}, "
                f"lr {lr:.2e}, {volumes_per_s:.2f} volumes/s, {left / 60:.1f} min left")


def warmup_warning(warmup_steps: int, total_steps: int, warmup_epochs: float) -> str | None:
    """A warning when a run ends inside (or just after) its learning-rate warm-up; None otherwise.

    A short run (``--max-steps``, few volumes) keeps the warm-up's length in epochs, so it may never reach
    its peak rate, and the distillation losses then stay near ln K: the schedule is not scaled to the steps
    asked for, because a resumed or extended run must keep the same schedule.
    """
    if warmup_steps == 0 or warmup_steps < total_steps / 2:
        return None
    reached = "never reaches its peak" if warmup_steps >= total_steps else "reaches its peak only in its last half"
    return (
        f"the learning-rate warm-up ({warmup_epochs:g} epochs = {warmup_steps} steps) is {warmup_steps / total_steps:.0%} "
        f"of this run's {total_steps} steps: the rate {reached}; for a short run lower --warmup-epochs "
        "(e.g. to a tenth of the run)"
    )


class _StepModule(nn.Module):
    """Routes ``forward`` to the method's training step so DDP can wrap it."""

    def __init__(self, method: nn.Module) -> None:
        super().__init__()
        self.method = method

    def forward(self, batch: dict[str, Tensor], context: StepContext) -> dict[str, Tensor]:
        return method_contract(self.method).training_step(batch, context)


def choose_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device``; None means full precision."""
    if amp == "off" or device.type != "cuda":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def rng_state() -> dict[str, Any]:
    """Every RNG state the run depends on, as tensors and plain values (``weights_only`` safe)."""
    legacy = np.random.get_state(legacy=True)
    if isinstance(legacy, dict):  # only for a bit generator other than MT19937, which the global one never is
        raise RuntimeError(f"numpy's global generator is {legacy['bit_generator']}, not MT19937")
    kind, keys, pos, has_gauss, gauss = legacy
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate((state["python_version"], tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Engine:
    """Trains one method on one data configuration into ``run_dir``."""

    def __init__(self, config: RunConfig, run_dir: Path, resume: bool = False, progress: bool = True) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.progress = progress
        self.device = choose_device()
        self.dist = init_distributed(self.device.type)

    # ------------------------------------------------------------------ setup
    def _prepare_data(self) -> Manifest:
        if self.dist.is_main:
            manifest = build_cache(self.config.data, progress=self.progress)
            logger.info("%s", summarize(manifest))
        if self.dist.enabled:
            dist.barrier()
        if not self.dist.is_main:
            manifest = Manifest.load(self.config.data.cache_dir)  # the cache rank 0 just built
        return manifest

    def _check_run_dir(self) -> ResumePoint | None:
        """Refuse to overwrite another run or to change a resumed one; return the point to resume from."""
        if self.resume:
            point = find_resume_point(self.run_dir)
            if point is None:
                raise FileNotFoundError(
                    f"--resume: {self.run_dir} holds no {LATEST} or {FINAL} to continue from; leave out --resume "
                    "to start a new run there"
                )
            for key, (saved, now) in check_resume_config(point, self.config).items():
                logger.info("resume changes %s: %r -> %r", key, saved, now)
            return point
        existing = [name for name in RESUME_ORDER if (self.run_dir / name).is_file()]
        if existing:
            raise FileExistsError(
                f"{self.run_dir} already holds a run ({', '.join(existing)}); pass --resume to continue it or "
                "choose another --out"
            )
        return None

    # ------------------------------------------------------------------ main loop
    def run(self) -> Path:
        """Train to the end (or continue a killed run); returns the final checkpoint path."""
        config = self.config
        validate_run_config(config)  # argument errors before anything is created or cached
        resume_point = self._check_run_dir()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.engine.seed)
        manifest = self._prepare_data()
        intensity = pretraining_intensity(
            config.data.modality, (e.modality for e in manifest.usable()), config.data.ct_window,
            config.data.mr_percentiles, config.data.intensity, config.data.mr_window,
        )
        method = build_run_method(config)
        contract = method_contract(method)
        method.to(self.device)
        step_module: nn.Module = _StepModule(method)
        if self.dist.enabled:
            step_module = nn.parallel.DistributedDataParallel(
                step_module, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        engine = config.engine
        global_batch = engine.batch_size * self.dist.world_size
        peak_lr = engine.base_lr * global_batch / engine.lr_reference_batch
        optimizer = build_optimizer(
            engine.optimizer, contract.student_modules(), peak_lr, engine.weight_decay, engine.momentum, engine.nesterov
        )
        amp_dtype = autocast_dtype(engine.amp, self.device)
        scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

        num_volumes = len(manifest.usable())
        steps_per_epoch = volume_steps_per_epoch(num_volumes, engine.batch_size, self.dist.world_size)
        total_steps = engine.epochs * steps_per_epoch
        if engine.max_steps is not None:
            total_steps = min(total_steps, engine.max_steps)
        warmup_steps = round(engine.warmup_epochs * steps_per_epoch)
        warning = warmup_warning(warmup_steps, total_steps, engine.warmup_epochs)
        if warning and self.dist.is_main:
            logger.warning("%s", warning)

        start_step = 0
        if resume_point is not None:
            checkpoint = resume_point.checkpoint
            method.load_state_dict(checkpoint["method"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scaler.load_state_dict(checkpoint["scaler"])
            restore_rng_state(checkpoint["rng"][min(self.dist.rank, len(checkpoint["rng"]) - 1)])
            start_step = int(checkpoint["step"])
            if start_step > total_steps:
                raise ValueError(
                    f"{resume_point.path} is at step {start_step}, beyond the {total_steps} steps of the requested "
                    "run; give at least as many --epochs (or --max-steps) as it already trained"
                )
            logger.info("resumed from %s at step %d of %d", resume_point.path.name, start_step, total_steps)
        if self.dist.is_main:
            atomic_json_dump(config.to_dict(), self.run_dir / CONFIG_FILE)
        collectives = Collectives(self.dist.rank, self.dist.world_size)
        metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.dist.is_main, truncate_from=start_step)
        logger.info(
            "%s on %d volumes, %d steps (%d per epoch), global batch %d, peak lr %.2e, device %s%s",
            config.method, num_volumes, total_steps, steps_per_epoch, global_batch, peak_lr, self.device,
            f", {self.dist.world_size} processes" if self.dist.enabled else "",
        )
        logger.info("optimiser %s, %s schedule after %d warm-up step(s), weight decay %g, gradient clip %g",
                    describe_optimizer(engine), engine.schedule, warmup_steps, engine.weight_decay, engine.grad_clip)
        loader = make_loader(
            manifest, config.data, engine.batch_size, contract.num_views,
            seed=engine.seed, rank=self.dist.rank, world_size=self.dist.world_size, start_step=start_step,
        )  # a resumed run continues the data stream where the checkpoint left it
        bar = tqdm(
            total=total_steps, initial=start_step, desc=config.method, unit="step", dynamic_ncols=True,
            disable=not (self.progress and self.dist.is_main and sys.stderr.isatty()),
        )
        # without a bar (a log file, the demo, --no-progress) a progress line now and then instead
        progress_log = ProgressLines(start_step, total_steps) if bar.disable and self.dist.is_main else None
        for step in range(start_step, total_steps):
            context = StepContext(
                step=step, steps_per_epoch=steps_per_epoch, total_steps=total_steps, seed=engine.seed,
                collectives=collectives,
            )
            lr = scheduled_lr(engine.schedule, step, peak_lr, warmup_steps, total_steps, engine.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            started = time.perf_counter()
            batch = next(loader)
            outputs = self._train_step(step_module, method, optimizer, scaler, batch, context, amp_dtype)
            elapsed = time.perf_counter() - started
            record = {"step": step, "epoch": context.epoch, "lr": lr, "seconds": elapsed,
                      "volumes_per_s": global_batch / elapsed, "volumes": self._gather_indices(batch), **outputs}
            metrics.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{outputs['loss']:.4f}", lr=f"{lr:.2e}")
            if progress_log is not None:
                line = progress_log.line(step + 1, outputs["loss"], lr, global_batch / elapsed)
                if line:
                    logger.info("%s", line)
            if (step + 1) % engine.checkpoint_every == 0 and step + 1 < total_steps:
                self._save(LATEST, method, optimizer, scaler, step + 1, steps_per_epoch, intensity)
        bar.close()
        loader.close()
        self._check_ranks_in_sync(method)
        final = self._save(FINAL, method, optimizer, scaler, total_steps, steps_per_epoch, intensity)
        if self.dist.is_main:
            for name in (LATEST, PREVIOUS):
                (self.run_dir / name).unlink(missing_ok=True)
            plot_loss_curves(self.run_dir / "metrics.jsonl", self.run_dir / "loss_curves.png",
                             title=f"Pretraining losses ({config.method}, preset {config.preset})")
            logger.info("done: %s (loss curves: %s)", final, self.run_dir / "loss_curves.png")
        if self.dist.enabled:
            dist.barrier()
        return final

    def _train_step(
        self,
        step_module: nn.Module,
        method: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        batch: dict[str, Tensor],
        context: StepContext,
        amp_dtype: torch.dtype | None,
    ) -> dict[str, float]:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        optimizer.zero_grad(set_to_none=True)
        autocast = (
            torch.autocast(self.device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
        )
        with autocast:
            outputs = step_module(batch, context)
        loss = outputs["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {context.step}: {loss.item()}")
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        before_optimizer_step(method, context)  # optional hooks: a method without them skips them
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for g in optimizer.param_groups for p in g["params"]],
            self.config.engine.grad_clip if self.config.engine.grad_clip > 0 else float("inf"),
        )
        scaler.step(optimizer)
        scaler.update()
        after_step(method, context)
        logged = {k: float(v.detach()) if isinstance(v, Tensor) else float(v) for k, v in outputs.items()}
        logged["grad_norm"] = float(grad_norm)
        return logged

    def _gather_indices(self, batch: dict[str, Tensor]) -> list[list[int]]:
        """Volume indices of this step on every rank (rank order), for the metrics log."""
        indices = batch["index"].tolist()
        if not self.dist.enabled:
            return [indices]
        gathered: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(gathered, indices)
        return gathered

    def _check_ranks_in_sync(self, method: nn.Module) -> None:
        """Fail loudly if data-parallel ranks ended with different student weights."""
        if not self.dist.enabled:
            return
        digest = encoder_digest(method_contract(method).student_modules().state_dict())
        digests: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(digests, digest)
        if len(set(digests)) != 1:
            raise RuntimeError(f"data-parallel ranks diverged: student digests {digests}")
        logger.info("all %d ranks in sync (student digest %s)", self.dist.world_size, digest)

    def _save(
        self,
        name: str,
        method: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        step: int,
        steps_per_epoch: int,
        intensity: dict[str, Any],
    ) -> Path:
        """Gather every rank's RNG state, then rank 0 writes the checkpoint atomically.

        Besides what a resume needs, the checkpoint carries what ``nnunet-ssl export`` reads without
        building the method (version 2): the encoders by role (``encoders``, sharing the storage of
        ``method``'s tensors), which one ``"default"`` means (``default_encoder``) and the intensity
        mapping of the data (``intensity``). Version 1 lacked these three entries.

        A method that declares ``decoder_modules`` also gets ``decoders``: its decoders by role
        (:func:`~nnunet_ssl.pretraining.methods.base.decoder_states`, sharing storage like the encoders),
        e.g. the U-Net decoder a ResEnc method trains. Still version 2: the entry is optional, present
        only when the method declares decoders, and a reader that does not know it ignores it.
        """
        states = [rng_state()]
        if self.dist.enabled:
            gathered: list[Any] = [None] * self.dist.world_size
            dist.all_gather_object(gathered, states[0])
            states = gathered
        path = self.run_dir / name
        if self.dist.is_main:
            encoders = encoder_states(method)
            checkpoint = {
                "format": CHECKPOINT_FORMAT,
                "version": 2,
                "method": method.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "step": step,
                "epoch": step / steps_per_epoch,
                "rng": states,
                "config": self.config.to_dict(),
                "encoders": encoders,
                "default_encoder": next(iter(encoders)),
                "intensity": intensity,
            }
            decoders = decoder_states(method)
            if decoders:
                checkpoint["decoders"] = decoders
            if name == LATEST and path.is_file():
                os.replace(path, self.run_dir / PREVIOUS)  # a damaged new latest still leaves this one
            atomic_torch_save(checkpoint, path)
        return path

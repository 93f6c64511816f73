"""The trainer's early stopping: stops nnU-Net's loop once the EMA pseudo-Dice stalls, then finishes normally."""
from __future__ import annotations

from dataclasses import replace

import pytest
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ssl.trainers.base import EarlyStop, SwinTrainerBase
from nnunet_ssl.trainers.recipe import FineTuneRecipe


class FakeLogger:
    def __init__(self, ema: list[float]) -> None:
        self.ema = ema

    def get_value(self, key: str, step: object) -> list[float]:
        assert key == "ema_fg_dice" and step is None
        return self.ema


def bare_trainer(ema_per_epoch: list[float], patience: int | None, num_epochs: int = 100) -> SwinTrainerBase:
    """A trainer object without nnU-Net's __init__ (no dataset needed): only what the loop hooks read."""
    trainer = object.__new__(SwinTrainerBase)
    trainer.active_recipe = replace(FineTuneRecipe(), early_stopping_patience=patience)
    trainer.logger = FakeLogger([])
    trainer.num_epochs = num_epochs
    trainer.current_epoch = 0
    trainer.log_lines = []
    trainer.print_to_log_file = lambda *args, **kwargs: trainer.log_lines.append(" ".join(map(str, args)))
    trainer.ema_script = list(ema_per_epoch)
    return trainer


@pytest.fixture
def scripted_nnunet_loop(monkeypatch):
    """nnU-Net's epoch end and loop reduced to what matters here: log the scripted EMA Dice, count epochs."""

    def on_epoch_end(self):
        self.logger.ema.append(self.ema_script[self.current_epoch])
        self.current_epoch += 1

    def run_training(self):
        for _ in range(self.current_epoch, self.num_epochs):
            self.on_epoch_end()
        self.on_train_end()

    def on_train_end(self):
        self.train_end_calls = getattr(self, "train_end_calls", 0) + 1

    monkeypatch.setattr(nnUNetTrainer, "on_epoch_end", on_epoch_end)
    monkeypatch.setattr(nnUNetTrainer, "run_training", run_training)
    monkeypatch.setattr(nnUNetTrainer, "on_train_end", on_train_end)


def test_stops_after_patience_epochs_without_improvement(scripted_nnunet_loop):
    ema = [0.1, 0.3, 0.5, 0.4, 0.45, 0.5, 0.2] + [0.1] * 93
    trainer = bare_trainer(ema, patience=3)
    trainer.run_training()
    assert trainer.current_epoch == 6  # epochs 0..5 ran; best at epoch 2, three epochs without improvement
    assert trainer.train_end_calls == 1  # final checkpoint and clean-up still happen
    assert any("Early stopping after epoch 5" in line for line in trainer.log_lines)


def test_runs_every_epoch_without_patience_or_while_improving(scripted_nnunet_loop):
    trainer = bare_trainer([0.1] * 10, patience=None, num_epochs=10)
    trainer.run_training()
    assert trainer.current_epoch == 10 and trainer.train_end_calls == 1

    rising = bare_trainer([i / 10 for i in range(10)], patience=1, num_epochs=10)
    rising.run_training()
    assert rising.current_epoch == 10


def test_last_epoch_ends_normally_even_when_stalled(scripted_nnunet_loop):
    trainer = bare_trainer([0.5, 0.1, 0.1], patience=2, num_epochs=3)
    trainer.run_training()
    assert trainer.current_epoch == 3 and trainer.train_end_calls == 1
    assert not any("Early stopping" in line for line in trainer.log_lines)

    stalled_early = bare_trainer([0.5, 0.1, 0.1, 0.1], patience=2, num_epochs=4)
    for _ in range(2):
        stalled_early.on_epoch_end()
    with pytest.raises(EarlyStop):
        stalled_early.on_epoch_end()


def test_the_log_never_announces_a_patience_longer_than_the_run() -> None:
    from nnunet_ssl.trainers.base import stopping_text

    assert stopping_text(None, 16) == "no early stopping"
    assert stopping_text(300, 16) == "no early stopping (its patience of 300 epochs is not shorter than the run)"
    assert stopping_text(300, 3000) == "early stopping after 300 epochs without a better EMA pseudo-Dice"

"""JSON-lines metrics of a pretraining run and its loss-curve plot."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends one JSON object per step to ``path``.

    On resume, records at or after ``truncate_from`` (written by the killed run after its last
    checkpoint) are dropped first, so every step appears once.
    """

    def __init__(self, path: Path, enabled: bool = True, truncate_from: int = 0) -> None:
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self._truncate(truncate_from)

    def _truncate(self, first_dropped: int) -> None:
        if not self.path.is_file():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) < first_dropped]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of a metrics file; a torn last line (killed mid-write) is ignored."""
    records = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


#: Legend names of the loss terms methods log (``loss_<abbreviation>``); others show their key.
LOSS_NAMES = {
    "loss": "total loss",
    "loss_mip": "masked image prediction (mip)",
    "loss_mpd": "masked patch distillation (mpd)",
    "loss_itd": "image token distillation (itd)",
}


def loss_label(key: str) -> str:
    """Readable legend name of a logged loss term, e.g. ``loss_mip`` -> ``masked image prediction (mip)``."""
    return LOSS_NAMES.get(key, key.removeprefix("loss_"))


def plot_loss_curves(metrics_path: Path, out_path: Path, title: str = "Pretraining losses") -> Path | None:
    """Plot every ``loss*`` term and the learning rate against the step into a PNG."""
    records = read_metrics(metrics_path)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    loss_keys = sorted({k for r in records for k in r if k.startswith("loss")})
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for key in loss_keys:
        ax_loss.plot(steps, [r.get(key, float("nan")) for r in records], label=loss_label(key), linewidth=1)
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(title)
    ax_loss.set_yscale("log" if all(r.get("loss", 1) > 0 for r in records) else "linear")
    ax_loss.legend(loc="upper right", fontsize=8)
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(steps, [r.get("lr", float("nan")) for r in records], color="black", linewidth=1)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path

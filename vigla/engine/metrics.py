"""Run logs: ``metrics.csv`` (one row per epoch), ``steps.csv`` (train loss every few steps), TensorBoard when
installed, and ``curves.png`` (training loss and validation accuracy). Only rank 0 writes."""
from __future__ import annotations

import csv
import io
import math
import os

from .outputs import atomic_write, write_text


def _read_csv(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return [{k: _num(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _num(v: str):
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


def _write_csv(path: str, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


class MetricsLog:
    """Append-only run logs that survive a resume: rows at or after the resumed position are dropped."""

    def __init__(self, out_dir: str, resume_step: int = 0, tensorboard: bool = True):
        self.out_dir = out_dir
        self.epoch_path, self.step_path = os.path.join(out_dir, "metrics.csv"), os.path.join(out_dir, "steps.csv")
        self.epochs = [r for r in _read_csv(self.epoch_path) if r["global_step"] <= resume_step]
        self.steps = [r for r in _read_csv(self.step_path) if r["global_step"] <= resume_step]
        self.tb = _tensorboard(out_dir) if tensorboard else None

    def log_step(self, row: dict) -> None:
        self.steps.append(row)
        if self.tb:
            self.tb.add_scalar("train/loss", row["loss"], row["global_step"])
            self.tb.add_scalar("train/lr", row["lr"], row["global_step"])

    def log_epoch(self, row: dict) -> None:
        self.epochs.append(row)
        self.flush()
        if self.tb:
            for k, v in row.items():
                if k not in ("epoch", "global_step") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"epoch/{k}", v, row["epoch"])
            self.tb.flush()

    def flush(self) -> None:
        if self.epochs:
            _write_csv(self.epoch_path, self.epochs)
        if self.steps:
            _write_csv(self.step_path, self.steps)

    def close(self) -> None:
        self.flush()
        if self.tb:
            self.tb.close()


def _tensorboard(out_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(os.path.join(out_dir, "tensorboard"))


def plot_curves(out_dir: str, title: str = "") -> str | None:
    """``curves.png`` from ``steps.csv`` and ``metrics.csv``: train loss (left), val top-1 (right)."""
    steps, epochs = _read_csv(os.path.join(out_dir, "steps.csv")), _read_csv(os.path.join(out_dir, "metrics.csv"))
    if not steps and not epochs:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    if steps:
        ax_loss.plot([r["epoch_progress"] for r in steps], [r["loss"] for r in steps], lw=0.8, label="per step")
    if epochs:
        x = [r["epoch"] + 1 for r in epochs]
        ax_loss.plot(x, [r["train_loss"] for r in epochs], "o-", label="epoch mean")
        ax_acc.plot(x, [r["val_top1"] for r in epochs], "o-", label="model")
        if any(not math.isnan(float(r.get("ema_val_top1", "nan") or "nan")) for r in epochs):
            ax_acc.plot(x, [r.get("ema_val_top1") for r in epochs], "s--", label="EMA")
        _plot_aux_branch(ax_acc, x, epochs)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="top-1 (%)", title="validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.legend()
    return save_curves(fig, (ax_loss, ax_acc), out_dir, title, dpi=120)


def save_curves(fig, axes, out_dir: str, title: str = "", dpi: int = 110) -> str:
    """``fig`` (a matplotlib figure of training curves) with ``axes`` gridded and the ``title`` above, written
    atomically to ``out_dir/curves.png`` and closed; returns the path."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = os.path.join(out_dir, "curves.png")
    try:
        atomic_write(path, lambda f: fig.savefig(f, dpi=dpi, format="png"))
    finally:
        plt.close(fig)
    return path


def _plot_aux_branch(ax, x: list, epochs: list[dict]) -> None:
    """Castling runs (``val_top1_aux_on`` in metrics.csv): validation top-1 with the auxiliary branch on, while
    it is on, beside the model's (off, as in inference), and the validation mask density on a second axis."""
    def values(key):
        out = []
        for r in epochs:
            try:
                out.append(float(r.get(key)))
            except (TypeError, ValueError):
                out.append(math.nan)
        return out

    on = values("val_top1_aux_on")
    if all(math.isnan(v) for v in on):
        return
    ax.plot(x, on, "^:", label="model, aux branch on")
    density = ax.twinx()
    density.plot(x, values("val_aux_mask_density"), "x--", color="tab:gray", label="aux mask density")
    density.set_ylabel("aux mask density (validation)")
    density.set_ylim(bottom=0)
    density.legend(loc="center right", fontsize=8)

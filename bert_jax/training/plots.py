"""The loss curve of a run, drawn from its log.jsonl into a PNG beside it."""

from __future__ import annotations

import json
import os

import matplotlib
from etils import epath

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss(log_path: str | os.PathLike, png_path: str | os.PathLike) -> None:
    """Training loss per logged step, and held-out MLM loss where evaluated (either path may
    be remote, gs://)."""
    records = [json.loads(line) for line in epath.Path(log_path).read_text().splitlines()
               if line.strip()]
    train = sorted({r["step"]: r["loss"] for r in records if "loss" in r}.items())
    held_out = sorted({r["step"]: r["eval_mlm_loss"] for r in records
                       if "eval_mlm_loss" in r}.items())
    figure, axes = plt.subplots(figsize=(7, 4))
    if train:
        axes.plot(*zip(*train), label="train loss (MLM + NSP)")
    if held_out:
        axes.plot(*zip(*held_out), "o-", label="held-out MLM loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    with epath.Path(png_path).open("wb") as file:
        figure.savefig(file, format="png", dpi=100)
    plt.close(figure)

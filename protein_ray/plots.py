"""PNG pictures of a training run, drawn from its ``history.jsonl``."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence

from protein_ray import storage
from protein_ray.checkpoint import HISTORY_FILE


def _figure_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def read_history(run_uri: str) -> list[dict]:
    text = storage.read_text(storage.join(run_uri, HISTORY_FILE))
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_training_plots(run_uri: str, class_names: Sequence[str]) -> list[str]:
    """curves.png (loss, macro F1 per epoch) and classes.png (per-class F1 bars and
    the tuned threshold table of the best epoch) in the run folder."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    history = read_history(run_uri)
    epochs = [record["epoch"] + 1 for record in history]
    best = max(history, key=lambda record: record["macro_f1"])

    curves, (loss_axis, f1_axis) = plt.subplots(1, 2, figsize=(10, 3.6))
    loss_axis.plot(epochs, [r["train_loss"] for r in history], marker="o")
    loss_axis.set(title="training loss", xlabel="epoch")
    f1_axis.plot(epochs, [r["macro_f1"] for r in history], marker="o", label="tuned thresholds")
    f1_axis.plot(epochs, [r["macro_f1@0.5"] for r in history], marker="s", label="threshold 0.5")
    f1_axis.axhline(best["label_prior_macro_f1"], color="grey", linestyle="--", label="label prior")
    f1_axis.set(title="validation macro F1", xlabel="epoch", ylim=(0, 1))
    f1_axis.legend(loc="lower right")

    height = max(4, 0.3 * len(class_names))
    classes, (bar_axis, table_axis) = plt.subplots(1, 2, figsize=(12, height), gridspec_kw={"width_ratios": [3, 2]})
    positions = range(len(class_names))
    bar_axis.barh(positions, best["f1_per_class"], color="tab:green")
    bar_axis.set(yticks=list(positions), yticklabels=list(class_names), xlim=(0, 1),
                 title=f"per-class F1, epoch {best['epoch'] + 1} (tuned thresholds)")
    bar_axis.invert_yaxis()
    table_axis.axis("off")
    rows = [[name, f"{t:.2f}", f"{f:.3f}"] for name, t, f in zip(class_names, best["thresholds"], best["f1_per_class"])]
    table_axis.table(cellText=rows, colLabels=["class", "threshold", "F1"], loc="center").scale(1, 1.3)

    written = []
    for name, figure in (("curves.png", curves), ("classes.png", classes)):
        uri = storage.join(run_uri, name)
        storage.write_bytes(uri, _figure_bytes(figure))
        plt.close(figure)
        written.append(uri)
    return written

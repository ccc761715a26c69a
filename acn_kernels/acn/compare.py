"""Seeds compared: the work of ``acn-compare`` (:func:`acn_kernels.acn.cli.compare_main`).

Every run is evaluated as ``acn-eval`` does (:func:`~acn_kernels.acn.evaluate.write_report`);
this module turns the per-run results of several seeds per model into means and standard
deviations (:func:`aggregate`), one markdown table (:func:`table`) and one figure of the held-out
curves of all runs (:func:`plot_curves`, from each run's history).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .checkpoint import atomic_write

HELDOUT_KEYS = ("test_kl", "test_recon", "test_loss", "test_bpd")
"""The held-out numbers of :func:`~acn_kernels.acn.evaluate.heldout_terms` that are aggregated."""
REPRESENTATION_KEYS = ("linear_probe", "knn")
"""The scores of :func:`~acn_kernels.acn.evaluate.representation` that are aggregated."""


def summary(values: list[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof 1) of one number over the runs of a model:
    {"mean", "std", "n", "values"}; runs where the number is undefined (None) are left out of
    n. With n = 1 the standard deviation is undefined: "std" is None and "note" says so; with
    n = 0 both are None."""
    present = [float(v) for v in values if v is not None]
    out: dict[str, Any] = {"mean": None, "std": None, "n": len(present), "values": list(values)}
    if present:
        out["mean"] = float(np.mean(present))
    if len(present) >= 2:
        out["std"] = float(np.std(present, ddof=1))
    elif len(present) == 1:
        out["note"] = "one run: the standard deviation is undefined (n=1)"
    return out


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The runs of one model (results of ``write_report`` with "name", "steps" and "passes"
    added) -> {"runs": [{"name", "steps", "passes"}], "heldout": {key: :func:`summary`},
    "representation": {key: :func:`summary`}} over :data:`HELDOUT_KEYS` and
    :data:`REPRESENTATION_KEYS`."""
    def values(section: str, key: str) -> list[float | None]:
        return [(r.get(section) or {}).get(key) for r in runs]

    return {
        "runs": [{name: r[name] for name in ("name", "steps", "passes")} for r in runs],
        "heldout": {key: summary(values("heldout", key)) for key in HELDOUT_KEYS},
        "representation": {key: summary(values("representation", key)) for key in REPRESENTATION_KEYS},
    }


def _cell(s: dict[str, Any], scale: float, digits: int, unit: str = "") -> str:
    if s["mean"] is None:
        return "-"
    mean = f"{scale * s['mean']:.{digits}f}{unit}"
    return f"{mean} ± {scale * s['std']:.{digits}f}" if s["std"] is not None else f"{mean} (n=1, no std)"


def table(models: dict[str, dict[str, Any]], references: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per model (mean ± std over its runs, the number of runs, and the
    completed passes / optimiser steps of each: a run stopped mid-pass has more steps than its
    passes), then one row per reference (pixels, PCA: a single deterministic fit each)."""
    lines = ["| model | runs (passes/steps) | held-out KL | held-out recon | held-out total | bits/dim | linear probe "
             "| k-NN (k=5) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, agg in models.items():
        h, rep = agg["heldout"], agg["representation"]
        passes = ", ".join(f"{r['passes']}/{r['steps']}" for r in agg["runs"])
        cells = [_cell(h[k], 1, 2) for k in ("test_kl", "test_recon", "test_loss")] + [_cell(h["test_bpd"], 1, 4)]
        cells += [_cell(rep[k], 100, 1, "%") for k in REPRESENTATION_KEYS]
        lines.append(f"| {name} | {len(agg['runs'])} ({passes}) | {' | '.join(cells)} |")
    for name, rep in references.items():
        acc = " | ".join(f"{100 * rep[k]:.1f}%" if rep.get(k) is not None else "-" for k in REPRESENTATION_KEYS)
        lines.append(f"| {name} (reference) | - | - | - | - | - | {acc} |")
    lines.append("")
    lines.append("Mean ± sample standard deviation over the runs of each model; held-out numbers in nats "
                 "per image (total = KL + recon).")
    return "\n".join(lines)


def plot_curves(histories: dict[str, list[list[dict[str, float]]]], path: str) -> None:
    """One PNG of the held-out curves of all runs: total, KL and reconstruction nats per image
    against passes, one line per run, one colour per model. ``histories``: model -> one history per run
    (rows with "epoch" and "test_loss", "test_kl", "test_recon"); rows without held-out numbers
    are skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (model, runs) in enumerate(histories.items()):
        for j, history in enumerate(runs):
            rows = [h for h in history if "test_loss" in h]
            for ax, key in zip(axes, ("test_loss", "test_kl", "test_recon"), strict=True):
                ax.plot([h["epoch"] for h in rows], [h[key] for h in rows], color=colours[i % len(colours)],
                        alpha=0.8, label=model if j == 0 else None)
    for ax, title in zip(axes, ("held-out total", "held-out KL", "held-out recon"), strict=True):
        ax.set_title(f"{title} (nats/image)")
        ax.set_xlabel("pass")
        if title == "held-out total":
            ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)


def run_name(run: str) -> str:
    """The name of a run given as a folder or a checkpoint file: its folder's base name."""
    folder = run if os.path.isdir(run) else os.path.dirname(run) or "."
    return os.path.basename(os.path.normpath(os.path.abspath(folder)))


__all__ = ["HELDOUT_KEYS", "REPRESENTATION_KEYS", "aggregate", "plot_curves", "run_name", "summary", "table"]

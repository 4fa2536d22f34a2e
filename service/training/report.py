"""Human-readable evaluation output: a comparison table and learning-curve plots."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

MODEL_HEADER = "model"
MISSING = "-"
# Prefixes Keras-style histories put on validation series; stripped to group with training.
VALIDATION_PREFIXES = ("val_", "validation_")


def format_table(rows: Mapping[str, Mapping[str, float | None]], columns: list[str]) -> str:
    """An aligned text table: one row per model, one column per metric.

    Values are shown with 4 decimals; a metric missing for a model (or None) shows as '-'.
    The model column is left-aligned, metric columns right-aligned.
    """
    header = [MODEL_HEADER, *columns]
    body = [[model, *(_format_value(metrics.get(column)) for column in columns)]
            for model, metrics in rows.items()]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [_format_line(header, widths), "  ".join("-" * width for width in widths)]
    lines.extend(_format_line(line, widths) for line in body)
    return "\n".join(lines)


def _format_value(value: float | None) -> str:
    return MISSING if value is None else f"{value:.4f}"


def _format_line(cells: list[str], widths: list[int]) -> str:
    first = cells[0].ljust(widths[0])
    rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
    return "  ".join([first, *rest]).rstrip()


def plot_learning_curves(history: dict[str, list[float]], path: Path) -> None:
    """Save a PNG of training history: one subplot per metric, epochs (from 1) on x.

    A metric and its validation series (``val_<name>`` / ``validation_<name>``) share a subplot,
    so e.g. loss and val_loss are drawn together. Uses the Agg canvas only (no display).
    """
    groups = group_history_keys(history)
    if not groups:
        raise ValueError("history is empty: nothing to plot")
    figure = Figure(figsize=(5.0 * len(groups), 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(groups), squeeze=False)[0]
    for ax, (metric, keys) in zip(axes, groups.items(), strict=True):
        _plot_group(ax, metric, {key: history[key] for key in keys})
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)


def group_history_keys(history: dict[str, list[float]]) -> dict[str, list[str]]:
    """History keys grouped by metric name with any validation prefix removed (input order)."""
    groups: dict[str, list[str]] = {}
    for key in history:
        groups.setdefault(_base_metric(key), []).append(key)
    return groups


def _base_metric(key: str) -> str:
    for prefix in VALIDATION_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _plot_group(ax: Axes, metric: str, series: dict[str, list[float]]) -> None:
    for key, values in series.items():
        epochs = range(1, len(values) + 1)
        ax.plot(epochs, [_finite_or_nan(v) for v in values], marker="o", markersize=3,
                label=key)
    ax.set_title(metric)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend()


def _finite_or_nan(value: float | None) -> float:
    """Missing or infinite points become gaps instead of breaking the axis range."""
    return value if value is not None and math.isfinite(value) else math.nan

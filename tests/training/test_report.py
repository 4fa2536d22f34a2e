"""Comparison table and learning-curve PNG."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from service.training.report import format_table, group_history_keys, plot_learning_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_format_table_aligns_rounds_and_marks_missing() -> None:
    rows: dict[str, dict[str, float | None]] = {"popularity": {"hr@10": 0.5, "ndcg@10": 0.25},
            "deepfm": {"hr@10": 0.61236, "ndcg@10": None}}
    # Widths: model 10 ("popularity"), hr@10 6 ("0.5000"), ndcg@10 7 (header), auc 3 (header).
    # 0.61236 rounds to 0.6124; None and the absent auc show as '-'.
    assert format_table(rows, ["hr@10", "ndcg@10", "auc"]).splitlines() == [
        "model        hr@10  ndcg@10  auc",
        "----------  ------  -------  ---",
        "popularity  0.5000   0.2500    -",
        "deepfm      0.6124        -    -",
    ]


def test_format_table_without_models_is_header_only() -> None:
    assert format_table({}, ["auc"]).splitlines() == ["model  auc", "-----  ---"]


def test_history_keys_group_with_their_validation_series() -> None:
    history = {"loss": [1.0], "val_loss": [1.0], "val_hr@10": [0.1], "validation_auc": [0.5]}
    assert group_history_keys(history) == {
        "loss": ["loss", "val_loss"], "hr@10": ["val_hr@10"], "auc": ["validation_auc"]}


def test_plot_learning_curves_writes_a_png(tmp_path: Path) -> None:
    history = {"loss": [0.7, 0.5, 0.4], "val_loss": [0.72, 0.6, 0.55],
               "val_auc": [0.6, 0.7, float("nan")]}
    path = tmp_path / "nested" / "curves.png"
    plot_learning_curves(history, path)
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    # IHDR width/height: two subplot groups (loss, auc) at 5.0 x 3.6 inches and 100 dpi.
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1000, 360)


def test_plot_learning_curves_rejects_empty_history(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        plot_learning_curves({}, tmp_path / "curves.png")

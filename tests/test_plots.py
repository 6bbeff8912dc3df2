"""reports.plots: what the learning-curve figure shows on its axes."""

from __future__ import annotations

from pathlib import Path

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg

import fewlabel.reports.plots as plots


def _drawn_figure(monkeypatch, history: list[dict]) -> matplotlib.figure.Figure:
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, dpi=110: figures.append(fig) or Path(path))
    plots.plot_learning_curves(history, "unused.png")
    (fig,) = figures
    with matplotlib.rc_context({"text.parse_math": False}):  # as plain_text draws it
        FigureCanvasAgg(fig).draw()
    return fig


def test_learning_rate_ticks_are_readable_numbers_and_epochs_whole(monkeypatch):
    history = [
        {"epoch": 1, "train_loss": 1.0, "lr": 1e-3},
        {"epoch": 2, "train_loss": 0.8, "lr": 3e-4},
        {"epoch": 3, "train_loss": 0.7, "lr": 2e-5},
    ]
    fig = _drawn_figure(monkeypatch, history)
    loss_ax, lr_ax = fig.axes
    labels = [t.get_text() for t in lr_ax.get_yticklabels() + lr_ax.get_yticklabels(minor=True)]
    assert any(labels) and not any("$" in text for text in labels)
    assert "1e−04" in labels
    for ax in (loss_ax, lr_ax):
        assert all(float(t.get_text().replace("−", "-")).is_integer() for t in ax.get_xticklabels())

"""The layer sweep's plot: panels only for methods that ran, curves in depth order, one key."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_sweep  # noqa: E402


def _row(layer: int, es: float) -> dict:
    return {"name": "rome", "layers": [layer], "ES": es, "PS": 80.0, "NS": 70.0, "S": 75.0, "gen_ES": es - 5}


def test_sweep_figure_draws_rows_in_depth_order_and_skips_empty_methods():
    result = {
        "rows": [_row(2, 90.0), _row(6, 96.0), _row(4, 93.0), _row(9, 99.0)],  # resumed runs: any order
        "settings": {"band_method": "memit"},
        "records": 50,
        "n_layers": 12,
        "aie": [0.01 * i for i in range(12)],
        "name": "tiny",
    }
    import matplotlib.pyplot as plt

    fig = bench_sweep.figure(result)
    try:
        panels = [ax for ax in fig.axes if ax.get_title()]
        assert [ax.get_title() for ax in panels] == ["rome (50 records)"]  # no empty memit panel
        lines = {line.get_label(): line for line in panels[0].get_lines()}
        assert list(lines["ES"].get_xdata()) == [2, 4, 6, 9]
        assert list(lines["ES"].get_ydata()) == [90.0, 93.0, 96.0, 99.0]
        assert list(lines["gen_ES"].get_ydata()) == [85.0, 88.0, 91.0, 94.0]
        labels = [t.get_text() for t in fig.legends[0].get_texts()]
        assert labels == ["ES", "PS", "NS", "S", "gen_ES", "MLP AIE"]
    finally:
        plt.close(fig)


def test_a_trace_only_sweep_still_plots_the_indirect_effect():
    result = {
        "rows": [],
        "settings": {"band_method": "memit"},
        "records": 0,
        "n_layers": 4,
        "aie": [0.1, 0.3, 0.2, 0.0],
        "name": "tiny",
    }
    import matplotlib.pyplot as plt

    fig = bench_sweep.figure(result)
    try:
        curves = {line.get_label(): list(line.get_ydata()) for ax in fig.axes for line in ax.get_lines()}
        assert curves == {"MLP AIE": [0.1, 0.3, 0.2, 0.0]}
    finally:
        plt.close(fig)

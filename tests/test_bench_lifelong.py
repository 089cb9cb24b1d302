"""The lifelong benchmark's own logic: method specs and the targets table (the streams themselves are benchmarks)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_lifelong  # noqa: E402
from hf_knowedit.evaluation.lifelong import LifelongResult  # noqa: E402


def test_method_specs_take_nas_and_any_option():
    assert bench_lifelong.method_options("memit") == ("memit", {})
    assert bench_lifelong.method_options("alphaedit+nas") == ("alphaedit", {"nas": True})
    assert bench_lifelong.method_options("encore+norm_anchor=original+norm_weight=0.01") == (
        "encore",
        {"norm_anchor": "original", "norm_weight": 0.01},
    )
    with pytest.raises(SystemExit, match="unknown method flag 'fast'"):
        bench_lifelong.method_options("memit+fast")


def test_targets_table_marks_each_missed_target():
    r0 = {"n_edits": 0, "ES": 30.0, "NS": 70.0, "GE": 500.0, "ppl": 30.0, "known_acc": 20.0}
    good = {"n_edits": 3000, "ES": 92.0, "NS": 61.0, "GE": 480.0, "ppl": 32.9, "known_acc": 16.0}
    bad = {"n_edits": 1500, "ES": 89.9, "NS": 59.0, "GE": 530.0, "ppl": 33.1, "known_acc": 14.0}
    table = bench_lifelong.targets_table([LifelongResult("a", [r0, good], {}), LifelongResult("b", [r0, bad], {})])
    rows = {
        line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| a") or line.startswith("| b")
    }
    assert rows["| a"] == "| a | 3000 | 92.0 | 9.0 | -4.0 % | +9.7 % | 4 | 3000 |"
    assert rows["| b"] == "| b | 1500 | 89.9 ✗ | 11.0 ✗ | +6.0 % ✗ | +10.3 % ✗ | 6 ✗ | — |"


def test_streams_measured_in_chat_form_get_the_generation_targets_too():
    r0 = {"n_edits": 0, "ES": 30.0, "NS": 70.0, "GE": 500.0, "ppl": 30.0, "known_acc": 20.0}
    r0 |= {"gen_ES": 2.0, "chat_ES": 0.0}
    last = {**r0, "n_edits": 1000, "ES": 95.0, "gen_ES": 81.0, "chat_ES": 65.0, "known_acc": 16.0}
    plain = {k: v for k, v in r0.items() if k not in ("gen_ES", "chat_ES")}
    table = bench_lifelong.targets_table(
        [LifelongResult("chat", [r0, last], {}), LifelongResult("plain", [plain, {**plain, "n_edits": 1000}], {})]
    )
    head, chat = table.split("## Targets in generation and chat form")
    assert "| chat |" in head and "| plain |" in head
    assert "| plain |" not in chat  # measured without --chat: no chat_ES to judge
    assert "| chat | 1000 | 81.0 | 65.0 ✗ | 4 | — |" in chat


def test_a_collapsed_perplexity_reads_as_a_factor():
    assert bench_lifelong.change(1.097) == "+9.7 %"
    assert bench_lifelong.change(0.9) == "-10.0 %"
    assert bench_lifelong.change(9.4e7) == "×9.4e+07"


def test_all_met_until_stops_at_the_first_row_that_misses_a_target():
    r0 = {"n_edits": 0, "ES": 30.0, "NS": 70.0, "GE": 500.0, "ppl": 30.0, "known_acc": 20.0}
    ok = [{**r0, "n_edits": n, "ES": 95.0} for n in (500, 1000)]
    worse = {**r0, "n_edits": 1500, "ES": 95.0, "ppl": 34.0}  # perplexity +13 %
    recovered = {**r0, "n_edits": 2000, "ES": 95.0}  # a later row that passes again does not count
    assert bench_lifelong.all_met_until([r0, *ok, worse, recovered]) == 1000
    assert bench_lifelong.all_met_until([r0, *ok]) == 1000
    assert bench_lifelong.all_met_until([r0, worse]) is None


def test_a_rewritten_report_keeps_its_hand_written_reading(tmp_path):
    r0 = {"n_edits": 0, "ES": 30.0, "NS": 70.0, "GE": 500.0, "ppl": 30.0, "known_acc": 20.0}
    res = [LifelongResult("a", [r0, {**r0, "n_edits": 100, "ES": 95.0}], {"n_edits": 100})]
    out = tmp_path / "report.md"
    args = argparse.Namespace(
        out=out,
        n_edits=100,
        batch_size=100,
        checkpoint_every=100,
        gen_sample=10,
        n_known=10,
        context_templates=0,
        model="smollm2",
    )
    bench_lifelong.write(args, res, bench_lifelong.machine_info(1), None)
    first = out.read_text()
    assert "## Targets" in first and "| a | 100 | 95.0 |" in first and "## Reading" not in first
    out.write_text(first + "\n## Reading\n\nWhy the numbers are what they are.\n")
    res[0].rows.append({**r0, "n_edits": 200, "ES": 91.0})
    bench_lifelong.write(args, res, bench_lifelong.machine_info(1), None)
    again = out.read_text()
    assert "| a | 200 | 91.0 |" in again and again.count("## Reading") == 1
    assert again.endswith("## Reading\n\nWhy the numbers are what they are.\n")


def test_the_plot_keys_methods_once_and_goes_logarithmic_for_a_collapsed_stream(tmp_path):
    import matplotlib.pyplot as plt

    from hf_knowedit.evaluation import plot_lifelong

    r0 = {"n_edits": 0, "ES": 30.0, "GE": 500.0, "ppl": 30.0, "known_acc": 20.0, "norm_growth": 1.0}
    fine = LifelongResult("fine", [r0, {**r0, "n_edits": 100, "ppl": 33.0, "norm_growth": 1.1}], {})
    broken = LifelongResult("broken", [r0, {**r0, "n_edits": 100, "ppl": 3e6, "norm_growth": 1.5}], {})
    fig = plot_lifelong([fine, broken], path=tmp_path / "curves.png")
    try:
        ax_ppl, ax_norm = fig.axes[2], fig.axes[3]
        assert ax_ppl.get_yscale() == "log" and ax_norm.get_yscale() == "linear"
        assert [t.get_text() for t in fig.legends[0].get_texts()] == ["fine", "broken"]
        assert [t.get_text() for t in ax_ppl.get_legend().get_texts()] == ["GE", "ppl", "known_acc"]
        assert (tmp_path / "curves.png").stat().st_size > 0
        fig2 = plot_lifelong([fine])
        assert fig2.axes[2].get_yscale() == "linear"
        plt.close(fig2)
    finally:
        plt.close(fig)


def test_reproduce_line_is_a_command_a_shell_runs_as_given(tmp_path, monkeypatch):
    import shlex

    import benchlib

    script = str(benchlib.ROOT / "benchmarks" / "bench_sweep.py")
    argv = [script, "--bands", "", "--methods", "encore+norm_anchor=original", "--report"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(benchlib, "machine_line", lambda machine: "test machine")
    out = benchlib.write_markdown(tmp_path / "r.md", "t", "| a |", {}, None, drop=("--report",))
    line = next(l for l in out.read_text().splitlines() if l.startswith("Reproduce:"))
    command = line.split("`")[1]
    expected = ["python", "benchmarks/bench_sweep.py", "--bands", "", "--methods", "encore+norm_anchor=original"]
    assert shlex.split(command) == expected


def test_prose_perplexity_probe_judges_each_text_by_the_same_target():
    import probe_lifelong_ppl as probe

    r0 = {"n_edits": 0, "ES": 30.0, "ppl": 30.0, "ppl_prose": 20.0}
    rows = [
        r0,
        {**r0, "n_edits": 500, "ES": 95.0, "ppl": 32.9, "ppl_prose": 21.0},  # +9.7 %, +5 %
        {**r0, "n_edits": 1000, "ES": 94.0, "ppl": 45.0, "ppl_prose": 21.9},  # +50 %, +9.5 %
        {**r0, "n_edits": 1500, "ES": 93.0, "ppl": 46.0, "ppl_prose": 22.1},  # prose +10.5 %: missed
    ]
    assert probe.met_until(rows, "ppl") == 500 and probe.met_until(rows, "ppl_prose") == 1000
    assert probe.met_until([r0, {**r0, "n_edits": 500, "ppl": 40.0}], "ppl") is None
    text = probe.table("encore", rows)
    assert "| 1000 | 94.0 | 45.0 | +50.0 % | 21.90 | +9.5 % |" in text
    assert text.endswith("ppl ≤ +10 % held up to: 500 edits (facts), 1000 (prose).\n")

"""Tests of the results tooling: runlog.py (log parser), stats.py and plot.py.

Run from the repository root:

    python -m pytest -q tests/test_results_tools.py

Fixture logs live in tests/fixtures/. The M_seed*.log runs finish at val losses 3.25, 3.26
and 3.27; M_nan_cpu.log stopped on a NaN loss; good_A.log embeds a source whose docstring
holds decoy log lines that must not be parsed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import scipy.stats

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _load(name: str, filename: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# plot.py and stats.py do `from runlog import ...`, which finds the module registered here.
runlog = _load("runlog", "runlog.py")
plot = _load("results_plot", "plot.py")
stats = _load("results_stats", "stats.py")

M_FINISHED = ["M_seed0.log", "M_seed1.log", "M_seed2_resumed.log"]
ALL_GOOD = ["good_A.log", *M_FINISHED, "M_nan_cpu.log", "M_tied_variant.log"]


def fixture(name: str) -> Path:
    return FIXTURES / name


# ---------------------------------------------------------------- parser


def test_parse_good_log_ignores_decoys_in_source():
    run = runlog.parse_log(fixture("good_A.log"))
    assert run.run_id == "A_20261123-203000_1a2b3c"
    assert run.baseline == "A" and run.group == "A" and run.script == "train_gpt_A.py"
    assert run.config["batch_tokens"] == 524288 and run.config["num_iterations"] == 20
    assert (run.python, run.torch, run.cuda) == ("3.12.3", "2.11.0+cu130", "13.0")
    assert run.device == "NVIDIA H100 80GB HBM3 x1"
    assert run.world_size == 1 and run.grad_accum_steps == 8
    assert run.resumed_from is None and run.stopped is None and run.complete
    assert (run.peak_allocated_mib, run.peak_reserved_mib) == (28682, 29120)
    assert run.num_steps == 20
    # Only the real validation lines: the decoys (val_loss 1.0 / 0.5 at steps 5/10 of 10) are absent.
    assert [s for s, _, _ in run.val] == [0, 5, 10, 15, 20]
    assert run.val[0] == (0, 10.8258, 0.0)
    assert run.val[-1] == (20, 3.29, 2620.0)
    assert all(loss not in (1.0, 0.5) for _, loss, _ in run.val)
    # Steps 1..19 log a training line; the last step logs only its validation line.
    assert [s for s, _ in run.train] == list(range(1, 20))
    assert run.train[0] == (1, 131.0)
    assert runlog.final_val_loss(run) == 3.29
    assert runlog.total_train_time_ms(run) == 2620.0
    assert runlog.time_to_target(run) is None  # 3.29 never gets to <= 3.28
    assert run.tokens_at(20) == 20 * 524288


def test_parse_resumed_log():
    run = runlog.parse_log(fixture("M_seed2_resumed.log"))
    assert run.resumed_from == "logs/ckpt/M_20261123-212000_cccccc_step10.pt"
    assert run.resumed_step == 10
    assert run.group == "M" and run.complete
    assert [s for s, _, _ in run.val] == [10, 15, 20]


def test_parse_nan_stopped_cpu_log():
    run = runlog.parse_log(fixture("M_nan_cpu.log"))
    assert run.stopped == "loss is nan at step 7"
    assert not run.complete
    assert run.device == "cpu" and run.cuda == "None"
    assert run.peak_allocated_mib is None and run.peak_reserved_mib is None
    assert run.train[-1] == (7, 6300.0)


@pytest.mark.parametrize(
    "name, problem",
    [
        ("empty.log", "empty file"),
        ("foreign.csv", "not a training log"),
        ("truncated_training.log", "no '=== end of run ===' line"),
        ("truncated_source.log", "no '=== end of source ===' line"),
    ],
)
def test_broken_logs_raise_log_error_naming_the_path(name, problem):
    path = fixture(name)
    with pytest.raises(runlog.LogError) as info:
        runlog.parse_log(path)
    assert isinstance(info.value, ValueError)
    assert str(path) in str(info.value)
    assert problem in str(info.value)


def test_header_only_and_missing_file(tmp_path):
    header_only = tmp_path / "header_only.log"
    header_only.write_text("run_id: A_x\nbaseline: A\nscript: train_gpt_A.py\n")
    with pytest.raises(runlog.LogError, match="truncated log: no '=== source: ...' line"):
        runlog.parse_log(header_only)
    missing = tmp_path / "nope.log"
    with pytest.raises(runlog.LogError, match="nope.log: cannot read file"):
        runlog.parse_log(missing)


def test_malformed_step_line_and_bad_config(tmp_path):
    text = fixture("good_A.log").read_text()
    bad_step = tmp_path / "bad_step.log"
    bad_step.write_text(text.replace("step:7/20 train_time:917ms", "step:7/20 train_time:abcms"))
    with pytest.raises(runlog.LogError, match="malformed step line"):
        runlog.parse_log(bad_step)
    bad_config = tmp_path / "bad_config.log"
    bad_config.write_text(text.replace('"batch_tokens": 524288, "num_iterations": 20', '"num_iterations": 20'))
    with pytest.raises(runlog.LogError, match="batch_tokens"):
        runlog.parse_log(bad_config)


def test_allow_incomplete_accepts_truncated_training():
    run = runlog.parse_log(fixture("truncated_training.log"), allow_incomplete=True)
    assert not run.complete and run.stopped is None
    assert run.train[-1] == (12, 1572.0)


def test_group_labels():
    assert runlog.group_label("A", {"tied_embed": True, "logit_softcap": 0.0}) == "A"
    assert runlog.group_label("A", {"tied_embed": True, "logit_softcap": 30.0}) == "A (logit_softcap=30.0)"
    assert runlog.group_label("M", {"tied_embed": False, "logit_softcap": 30}) == "M"
    assert runlog.group_label("M", {"tied_embed": True, "logit_softcap": 30.0}) == "M (tied_embed=True)"
    assert (runlog.group_label("M", {"tied_embed": True, "logit_softcap": 0.0})
            == "M (tied_embed=True, logit_softcap=0.0)")
    assert runlog.parse_log(fixture("M_tied_variant.log")).group == "M (tied_embed=True)"
    labels = ["M (tied_embed=True)", "M", "A (logit_softcap=30.0)", "A"]
    assert sorted(labels, key=runlog.group_sort_key) == ["A", "A (logit_softcap=30.0)", "M", "M (tied_embed=True)"]


def test_time_to_target_interpolates_on_crafted_curve():
    base = runlog.parse_log(fixture("good_A.log"))
    crossing = dataclasses.replace(base, val=[(0, 10.0, 0.0), (5, 3.30, 1000.0), (10, 3.26, 2000.0)])
    # 3.30 -> 3.26 between 1000 and 2000 ms; 3.28 is halfway: 1000 + (0.02 / 0.04) * 1000 = 1500 ms.
    assert runlog.time_to_target(crossing) == pytest.approx(1500.0)
    # Another target on the same segment: 3.29 is a quarter of the way: 1000 + 0.25 * 1000 = 1250 ms.
    assert runlog.time_to_target(crossing, target=3.29) == pytest.approx(1250.0)
    exact = dataclasses.replace(base, val=[(0, 10.0, 0.0), (5, 3.28, 700.0), (10, 3.0, 900.0)])
    assert runlog.time_to_target(exact) == pytest.approx(700.0)
    already = dataclasses.replace(base, val=[(0, 3.0, 40.0), (5, 2.9, 90.0)])
    assert runlog.time_to_target(already) == 40.0
    never = dataclasses.replace(base, val=[(0, 10.0, 0.0), (5, 3.2801, 500.0)])
    assert runlog.time_to_target(never) is None
    assert runlog.time_to_target(dataclasses.replace(base, val=[])) is None


def test_time_to_target_on_fixture_runs():
    # M_seed0: 3.30 @ 1500 ms -> 3.25 @ 2000 ms: 1500 + (0.02 / 0.05) * 500 = 1700 ms.
    assert runlog.time_to_target(runlog.parse_log(fixture("M_seed0.log"))) == pytest.approx(1700.0)
    # M_seed1: 3.32 @ 1530 ms -> 3.26 @ 2040 ms: 1530 + (0.04 / 0.06) * 510 = 1870 ms.
    assert runlog.time_to_target(runlog.parse_log(fixture("M_seed1.log"))) == pytest.approx(1870.0)
    # M_seed2: 3.31 @ 1470 ms -> 3.27 @ 1960 ms: 1470 + (0.03 / 0.04) * 490 = 1837.5 ms.
    assert runlog.time_to_target(runlog.parse_log(fixture("M_seed2_resumed.log"))) == pytest.approx(1837.5)


def test_runlog_main(capsys):
    assert runlog.main([str(fixture("good_A.log")), str(fixture("M_seed0.log"))]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2
    assert "A_20261123-203000_1a2b3c" in out[0] and "final_val_loss=3.2900" in out[0] and "complete" in out[0]
    assert "time_to_3.28=1.7s" in out[1]
    assert runlog.main([str(fixture("good_A.log")), str(fixture("empty.log"))]) == 1
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 1
    assert str(fixture("empty.log")) in captured.err


# ---------------------------------------------------------------- stats


def test_summarize_against_hand_computed_values():
    runs = runlog.load_runs([fixture(n) for n in ALL_GOOD])
    rows = stats.summarize(runs)
    assert [r["group"] for r in rows] == ["A", "M", "M (tied_embed=True)"]
    a, m, tied = rows

    # M: 4 logs; the NaN-stopped one is not finished, so the loss statistics use 3 runs.
    assert (m["runs"], m["finished"], m["steps"]) == (4, 3, [20])
    # mean = (3.25 + 3.26 + 3.27) / 3 = 9.78 / 3 = 3.26
    assert m["loss_mean"] == pytest.approx(3.26, abs=1e-12)
    # deviations -0.01, 0, +0.01; sum of squares 0.0002; / (n - 1 = 2) = 0.0001; sqrt = 0.01
    assert m["loss_std"] == pytest.approx(0.01, rel=1e-9)
    # t = (3.26 - 3.28) / (0.01 / sqrt(3)) = -2 * sqrt(3) = -3.4641016; df = 2.
    # For df = 2 the t CDF is F(t) = 1/2 + t / (2 * sqrt(2 + t^2)):
    # p = 0.5 - 3.4641016 / (2 * sqrt(14)) = 0.5 - 0.4629100 = 0.0370900
    t_stat = -2 * math.sqrt(3)
    assert m["p_value"] == pytest.approx(0.5 + t_stat / (2 * math.sqrt(2 + t_stat**2)), rel=1e-9)
    assert m["p_value"] == pytest.approx(scipy.stats.t.cdf(t_stat, df=2), rel=1e-9)
    assert m["p_value"] == pytest.approx(0.0370900, abs=1e-7)
    # total training time of the finished runs: (2000 + 2040 + 1960) / 3 = 2000 ms
    assert m["train_time_ms"] == pytest.approx(2000.0)
    # time to 3.28: (1700 + 1870 + 1837.5) / 3 = 5407.5 / 3 = 1802.5 ms, reached by 3 of 4
    assert m["reached"] == 3
    assert m["time_to_target_ms"] == pytest.approx(1802.5)

    # single runs: no std, no test
    assert (a["runs"], a["finished"], a["loss_mean"], a["loss_std"], a["p_value"]) == (1, 1, 3.29, None, None)
    assert (a["reached"], a["time_to_target_ms"], a["train_time_ms"]) == (0, None, 2620.0)
    assert (tied["runs"], tied["loss_mean"], tied["loss_std"], tied["p_value"]) == (1, 3.31, None, None)


def test_summarize_other_target():
    runs = runlog.load_runs([fixture(n) for n in M_FINISHED])
    (m,) = stats.summarize(runs, target=3.3)
    # t = (3.26 - 3.30) / (0.01 / sqrt(3)) = -4 * sqrt(3); p = F(t) with df = 2 as above
    t_stat = -4 * math.sqrt(3)
    assert m["p_value"] == pytest.approx(0.5 + t_stat / (2 * math.sqrt(2 + t_stat**2)), rel=1e-9)
    # seed0 reaches 3.30 exactly at 1500 ms; seed1: 1530 + (0.02 / 0.06) * 510 = 1700 ms;
    # seed2: 1470 + (0.01 / 0.04) * 490 = 1592.5 ms
    assert m["time_to_target_ms"] == pytest.approx((1500 + 1700 + 1592.5) / 3)


def test_stats_main_prints_table(capsys):
    assert stats.main([str(fixture(n)) for n in ALL_GOOD]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["group", "runs", "steps", "finished"]
    m_line = next(line for line in lines if line.startswith("M "))
    assert m_line.split() == ["M", "4", "20", "3", "3.2600", "0.0100", "0.0371", "2.0", "3/4", "1.8"]
    a_line = next(line for line in lines if line.startswith("A "))
    assert a_line.split() == ["A", "1", "20", "1", "3.2900", "-", "-", "2.6", "0/1", "-"]


def test_stats_main_reports_broken_log(capsys):
    assert stats.main([str(fixture("good_A.log")), str(fixture("foreign.csv"))]) == 1
    assert str(fixture("foreign.csv")) in capsys.readouterr().err
    assert stats.main(["--skip-bad", str(fixture("good_A.log")), str(fixture("foreign.csv"))]) == 0
    captured = capsys.readouterr()
    assert "skipping" in captured.err and captured.out.startswith("group")


# ---------------------------------------------------------------- plot


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000
    assert data[:8] == PNG_SIGNATURE


def test_plot_with_reference(tmp_path):
    runs = runlog.load_runs([fixture(n) for n in ALL_GOOD])
    out = plot.plot_runs(runs, tmp_path / "img" / "nested" / "curves.png")
    assert out == tmp_path / "img" / "nested" / "curves.png"
    _assert_png(out)


def test_plot_without_reference_and_linear(tmp_path):
    runs = runlog.load_runs([fixture(n) for n in M_FINISHED])
    _assert_png(plot.plot_runs(runs, tmp_path / "noref.png", reference=None))
    _assert_png(plot.plot_runs(runs, tmp_path / "linear.png", reference=None, log_y=False, ylim=(3.2, 4.5)))


def test_plot_main_reference_override_and_errors(tmp_path, capsys):
    ref = tmp_path / "ref.csv"
    ref.write_text("script,step,val_loss,train_time_ms\nM,0,10.8,0\nM,10,3.5,1000\nM,20,3.27,2000\n")
    assert plot.load_reference(ref) == {"M": [(0, 10.8, 0.0), (10, 3.5, 1000.0), (20, 3.27, 2000.0)]}
    out = tmp_path / "cli" / "curves.png"
    logs = [str(fixture(n)) for n in M_FINISHED]
    assert plot.main([*logs, "-o", str(out), "--reference", str(ref)]) == 0
    _assert_png(out)
    assert plot.main([*logs, "-o", str(tmp_path / "b.png"), "--no-reference"]) == 0
    _assert_png(tmp_path / "b.png")
    capsys.readouterr()

    bad_ref = tmp_path / "bad.csv"
    bad_ref.write_text("script,step,loss\nA,0,10\n")
    assert plot.main([*logs, "-o", str(tmp_path / "c.png"), "--reference", str(bad_ref)]) == 1
    assert "lacks columns" in capsys.readouterr().err
    assert plot.main([str(fixture("truncated_training.log")), "-o", str(tmp_path / "d.png")]) == 1
    assert str(fixture("truncated_training.log")) in capsys.readouterr().err
    assert not (tmp_path / "d.png").exists()


def test_published_reference_csv_loads():
    curves = plot.load_reference(plot.DEFAULT_REFERENCE)
    assert set(curves) == {"A", "M"}
    assert all(len(points) > 2 for points in curves.values())

"""Tests of the results tooling: runlog.py (log parser), stats.py and plot.py.

Run from the repository root:

    python -m pytest -q tests/test_results_tools.py

Fixture logs live in tests/fixtures/. The M_seed*.log runs finish at val losses 3.25, 3.26
and 3.27; M_nan_cpu.log stopped on a NaN loss; good_A.log embeds a source whose docstring
holds decoy log lines that must not be parsed. Logs of other shapes (new step lines, unfinished
runs, synthetic curves, modded-nanogpt logs) are written by the tests into tmp_path.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
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


# Crafted validation curves, (step, loss, time in ms) each, with the target and the steps and time at which
# linear interpolation crosses it: 3.30 -> 3.26 between steps 5 and 10 (1000 and 2000 ms) puts 3.28 halfway
# and 3.29 a quarter of the way; a point exactly at the target; a run below it from its first point; a run
# that never reaches it.
CRAFTED_CURVES = [
    ([(0, 10.0, 0.0), (5, 3.30, 1000.0), (10, 3.26, 2000.0)], 3.28, 7.5, 1500.0),
    ([(0, 10.0, 0.0), (5, 3.30, 1000.0), (10, 3.26, 2000.0)], 3.29, 6.25, 1250.0),
    ([(0, 10.0, 0.0), (5, 3.28, 700.0), (10, 3.0, 900.0)], 3.28, 5.0, 700.0),
    ([(0, 3.0, 40.0), (5, 2.9, 90.0)], 3.28, 0.0, 40.0),
    ([(0, 10.0, 0.0), (5, 3.2801, 500.0)], 3.28, None, None),
]


def test_time_to_target_interpolates_on_crafted_curve():
    base = runlog.parse_log(fixture("good_A.log"))
    for val, target, _, time_ms in CRAFTED_CURVES:
        got = runlog.time_to_target(dataclasses.replace(base, val=val), target=target)
        assert got == (None if time_ms is None else pytest.approx(time_ms)), (val, target)
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


def test_stats_main_skips_broken_logs_unless_strict(capsys):
    good, foreign, empty = (str(fixture(n)) for n in ("good_A.log", "foreign.csv", "empty.log"))
    assert stats.main([good, foreign, empty]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("group")
    err = captured.err.splitlines()
    assert len(err) == 2
    assert err[0].startswith(f"skipped {foreign}:1: not a training log")
    assert err[1] == f"skipped {empty}: empty file, not a training log"
    # --skip-bad is still accepted (a no-op); --strict restores the error
    assert stats.main(["--skip-bad", good, foreign]) == 0
    capsys.readouterr()
    assert stats.main(["--strict", good, foreign]) == 1
    assert foreign in capsys.readouterr().err
    assert stats.main([foreign, empty]) == 1
    assert "error: no parsable logs" in capsys.readouterr().err


# ---------------------------------------------------------------- plot


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000
    assert data[:8] == PNG_SIGNATURE


def test_plot_writes_png(tmp_path):
    runs = runlog.load_runs([fixture(n) for n in ALL_GOOD])
    notes = []
    out = plot.plot_runs(runs, tmp_path / "img" / "nested" / "curves.png", note=notes.append)
    assert out == tmp_path / "img" / "nested" / "curves.png"
    _assert_png(out)
    assert len(notes) == 1  # the fixture runs are short: the reference curves are left out
    _assert_png(plot.plot_runs(runs, tmp_path / "forced.png", force_reference=True, note=notes.append))
    assert len(notes) == 1


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
    err = capsys.readouterr().err.splitlines()
    assert err == [f"skipped unfinished log {fixture('truncated_training.log')} (last step 12/20)",
                   "error: no logs left to plot"]
    assert not (tmp_path / "d.png").exists()


def test_published_reference_csv_loads():
    curves = plot.load_reference(plot.DEFAULT_REFERENCE)
    assert set(curves) == {"A", "M"}
    assert all(len(points) > 2 for points in curves.values())


# ---------------------------------------------------------------- logs written by the tests

ARCH = {"M": {"tied_embed": False, "logit_softcap": 30.0}, "A": {"tied_embed": True, "logit_softcap": 0.0}}


def write_log(path: Path, body: list[str], *, baseline: str = "M", num_steps: int = 20, batch_tokens: int = 524_288,
              ended: bool = True, **config) -> Path:
    """A train_gpt log at `path` whose training section is `body` (plus "=== end of run ===" if ended)."""
    full_config = {"batch_tokens": batch_tokens, "num_iterations": num_steps, **ARCH[baseline], **config}
    lines = [
        f"run_id: {path.stem}", f"baseline: {baseline}", f"script: train_gpt_{baseline}.py",
        "date: 2026-11-23T20:30:00Z", f"command: train_gpt_{baseline}.py", f"=== source: train_gpt_{baseline}.py ===",
        'print0(f"step:{step}/{n} train_loss:{loss:.4f} lr_mult:{lr:.4f} train_time:{t:.0f}ms step_avg:{a:.2f}ms")',
        "=== end of source ===", "config: " + json.dumps(full_config), "python: 3.12.3", "device: cpu",
        "world_size: 1", "=== training ===", *body, *(["=== end of run ==="] if ended else []),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def curve_log(path: Path, val: list[tuple[int, float]], *, num_steps: int, ms_per_step: float = 100.0,
              **options) -> Path:
    """A log with validation points `val` [(step, loss)] and a new-style training line for every step."""
    losses = dict(val)
    body = []
    for step in range(num_steps + 1):
        t = step * ms_per_step
        if step > 0:
            body.append(f"step:{step}/{num_steps} train_loss:{losses.get(step, 4.0) + 0.05:.4f} lr_mult:1.0000 "
                        f"train_time:{t:.0f}ms step_avg:{ms_per_step:.2f}ms")
        if step in losses:
            body.append(f"step:{step}/{num_steps} val_loss:{losses[step]:.4f} train_time:{t:.0f}ms "
                        f"step_avg:{ms_per_step:.2f}ms")
    return write_log(path, body, num_steps=num_steps, **options)


SEPARATOR = "=" * 100
NVIDIA_SMI = [
    "Wed Aug 27 04:15:50 2025",
    "+---------------------------------------------------------------------------------------+",
    "| GPU  Name                 Persistence-M | Bus-Id        Disp.A | Volatile Uncorr. ECC |",
    "|=========================================+======================+======================|",
    *(f"|   {i}  NVIDIA H100 80GB HBM3          On  | 00000000:00:0{i}.0 Off |                  Off |"
      for i in range(8)),
    "| Processes:                                                                            |",
    "|    0   N/A  N/A     12345      C   /usr/bin/python3                          1519MiB |",
    "+---------------------------------------------------------------------------------------+",
]


def write_modded_log(path: Path, val: list[tuple[int, float]], *, num_steps: int, ms_per_step: float = 95.0,
                     smi: bool = True, train_loss: bool = False, final: bool = True) -> Path:
    """A modded-nanogpt log: source (with decoys, a 100-'=' line among them), separator, environment,
    separator, step lines, peak memory; with final=False the run stops before its last step."""
    source = [
        "import os", '"""Decoys: a separator and step lines inside the source must not be read.', SEPARATOR,
        "step:5/10 val_loss:0.1234 train_time:5ms step_avg:1.00ms", '"""',
        'print0(f"step:{step}/{train_steps} val_loss:{val_loss:.4f} train_time:{t:.0f}ms step_avg:{a:.2f}ms")',
        'print0("="*100)',
    ]
    environment = ["Running Python 3.12.7 (main, Oct  1 2024, 08:52:12) [GCC 11.4.0]",
                   "Running PyTorch 2.6.0.dev20241203+cu124 compiled for CUDA 12.4"]
    environment += NVIDIA_SMI if smi else []
    losses = dict(val)
    data = []
    last = num_steps if final else num_steps - 3
    for step in range(last + 1):
        t = step * ms_per_step
        if step > 0:
            loss_field = f"train_loss:{losses.get(step, 4.0) + 0.05:.4f} " if train_loss else ""
            data.append(f"step:{step}/{num_steps} {loss_field}train_time:{t:.0f}ms step_avg:{ms_per_step:.2f}ms")
        if step in losses:
            data.append(f"step:{step}/{num_steps} val_loss:{losses[step]:.4f} train_time:{t:.0f}ms "
                        f"step_avg:{ms_per_step:.2f}ms")
    if final:
        data.append("peak memory allocated: 30000 MiB reserved: 31000 MiB")
    path.write_text("\n".join([*source, SEPARATOR, *environment, SEPARATOR, *data]) + "\n")
    return path


# ---------------------------------------------------------------- step lines with train_loss / lr_mult


def test_parse_step_lines_with_train_loss_and_lr_mult(tmp_path):
    rng = np.random.default_rng()
    losses, lrs = rng.uniform(2.5, 11.0, 9), rng.uniform(0.0, 1.0, 9)
    body = ["step:0/10 val_loss:10.8258 train_time:0ms step_avg:0.00ms"]
    body += [f"step:{s}/10 train_loss:{losses[s - 1]:.4f} lr_mult:{lrs[s - 1]:.4f} train_time:{100 * s}ms "
             f"step_avg:100.00ms" for s in range(1, 10)]
    body += ["step:10/10 train_loss:inf lr_mult:0.1000 train_time:1000ms step_avg:100.00ms",
             "step:10/10 val_loss:3.5000 train_time:1000ms step_avg:100.00ms"]
    run = runlog.parse_log(write_log(tmp_path / "new.log", body, num_steps=10))
    # run.train keeps its (step, train_time_ms) pairs, as bench/speed.py reads them
    assert run.train == [(s, 100.0 * s) for s in range(1, 11)]
    assert dict(run.train)[5] == 500.0
    assert run.train_losses[:9] == [(s, float(f"{losses[s - 1]:.4f}")) for s in range(1, 10)]
    assert run.lr_mults == [*((s, float(f"{lrs[s - 1]:.4f}")) for s in range(1, 10)), (10, 0.1)]
    assert run.train_losses[9] == (10, math.inf) and runlog.final_train_loss(run) == math.inf
    assert run.complete and run.ended and run.val[-1] == (10, 3.5, 1000.0)
    assert "train_loss=inf" in runlog.summary_line(run)


def test_parse_diverged_run_with_nan_train_loss(tmp_path):
    body = ["step:0/20 val_loss:10.8300 train_time:0ms step_avg:0.00ms",
            "step:1/20 train_loss:10.1000 lr_mult:1.0000 train_time:90ms step_avg:90.00ms",
            "step:2/20 train_loss:nan lr_mult:1.0000 train_time:180ms step_avg:90.00ms",
            "stopped: loss is nan at step 2"]
    run = runlog.parse_log(write_log(tmp_path / "nan.log", body))
    assert run.ended and not run.complete and run.stopped == "loss is nan at step 2"
    assert run.train_losses[0] == (1, 10.1) and math.isnan(runlog.final_train_loss(run))
    line = runlog.summary_line(run)
    assert "train_loss=nan" in line and "stopped (loss is nan at step 2)" in line


def test_old_step_lines_have_no_train_loss():
    run = runlog.parse_log(fixture("good_A.log"))
    assert run.train_losses == [] and run.lr_mults == [] and runlog.final_train_loss(run) is None
    assert "train_loss=-" in runlog.summary_line(run)


def test_bad_train_loss_is_an_error(tmp_path):
    body = ["step:1/20 train_loss:abc lr_mult:1.0000 train_time:90ms step_avg:90.00ms"]
    with pytest.raises(runlog.LogError, match="train_loss is not a number"):
        runlog.parse_log(write_log(tmp_path / "bad.log", body))


def test_steps_to_target_interpolates():
    base = runlog.parse_log(fixture("good_A.log"))
    for val, target, steps, _ in CRAFTED_CURVES:
        got = runlog.steps_to_target(dataclasses.replace(base, val=val), target=target)
        assert got == (None if steps is None else pytest.approx(steps)), (val, target)
    after_nan = dataclasses.replace(base, val=[(0, 10.0, 0.0), (5, math.nan, 10.0), (10, 3.0, 20.0)])
    assert runlog.steps_to_target(after_nan) == 10.0
    # M_seed0: 3.30 @ 15 -> 3.25 @ 20: 15 + (0.02 / 0.05) * 5 = 17
    assert runlog.steps_to_target(runlog.parse_log(fixture("M_seed0.log"))) == pytest.approx(17.0)


# ---------------------------------------------------------------- unfinished logs


def test_unfinished_logs_are_skipped_with_one_line(tmp_path, capsys):
    rng = np.random.default_rng()
    last, total = int(rng.integers(2, 2000)), 2500
    body = [f"step:{s}/{total} train_loss:5.0000 lr_mult:1.0000 train_time:{s}ms step_avg:1.00ms"
            for s in range(1, last + 1)]
    killed = write_log(tmp_path / "M_killed.txt", body, num_steps=total, ended=False)
    logs = [str(fixture(n)) for n in M_FINISHED] + [str(killed)]
    assert stats.main(logs) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"skipped unfinished log {killed} (last step {last}/{total})"]
    m_line = next(line for line in captured.out.splitlines() if line.startswith("M "))
    assert m_line.split()[:4] == ["M", "3", "20", "3"]

    assert stats.main(["--strict", *logs]) == 1
    err = capsys.readouterr().err
    assert str(killed) in err and "no '=== end of run ===' line" in err and f"last step {last}/{total}" in err

    out = tmp_path / "curves.png"
    assert plot.main([*logs, "-o", str(out), "--no-reference"]) == 0
    _assert_png(out)
    assert capsys.readouterr().err.splitlines() == [f"skipped unfinished log {killed} (last step {last}/{total})"]
    assert plot.main([*logs, "-o", str(tmp_path / "strict.png"), "--strict"]) == 1
    assert str(killed) in capsys.readouterr().err and not (tmp_path / "strict.png").exists()
    # --allow-incomplete plots it, also with --strict
    assert plot.main([*logs, "-o", str(tmp_path / "all.png"), "--no-reference", "--allow-incomplete", "--strict"]) == 0
    assert capsys.readouterr().err == ""


def test_unfinished_log_with_no_step_and_half_written_last_line(tmp_path):
    notes = []
    empty_training = write_log(tmp_path / "started.txt", [], ended=False)
    half_line = write_log(tmp_path / "half.txt", ["step:1/20 train_loss:9.0000 lr_mult:1.0000 train_time:90ms "
                                                 "step_avg:90.00ms", "step:2/20 train_loss:8.9"], ended=False)
    assert runlog.load_runs([empty_training, half_line], warn=notes.append) == []
    assert notes == [f"skipped unfinished log {empty_training} (no step logged)",
                     f"skipped unfinished log {half_line} (last step 1/20)"]
    kept = runlog.load_runs([empty_training, half_line], allow_incomplete=True, warn=notes.append)
    assert [r.ended for r in kept] == [False, False] and len(notes) == 2
    with pytest.raises(runlog.LogError, match="malformed step line"):
        runlog.parse_log(write_log(tmp_path / "mid.txt", ["step:2/20 train_loss:8.9", "step:3/20 val_loss:5.0 "
                                                          "train_time:3ms step_avg:1.00ms"]))


# ---------------------------------------------------------------- modded-nanogpt logs


def test_parse_modded_nanogpt_log(tmp_path):
    rng = np.random.default_rng()
    val = [(s, float(f"{10.8 - 0.06 * s + rng.normal(0, 0.01):.4f}")) for s in range(0, 101, 25)]
    path = write_modded_log(tmp_path / "0b1c-uuid.txt", val, num_steps=100)
    run = runlog.parse_log(path)
    assert run.log_format == "modded-nanogpt" and run.baseline == "modded-nanogpt"
    assert run.group == "modded-nanogpt:0b1c-uuid" and run.run_id == "0b1c-uuid"
    assert run.batch_tokens == 524_288 and run.batch_tokens_assumed
    assert run.val == [(s, loss, s * 95.0) for s, loss in val]  # the decoys in the source are not read
    assert [s for s, _ in run.train] == list(range(1, 101)) and run.train_losses == []
    assert run.num_steps == 100 and run.ended and run.complete
    assert (run.python, run.torch, run.cuda) == ("3.12.7", "2.6.0.dev20241203+cu124", "12.4")
    assert run.device == "NVIDIA H100 80GB HBM3 x8"
    assert (run.peak_allocated_mib, run.peak_reserved_mib) == (30000, 31000)
    assert runlog.steps_to_target(run, target=val[2][1]) == 50.0
    line = runlog.summary_line(run)
    assert "modded-nanogpt:0b1c-uuid" in line and "batch_tokens=524288 (assumed)" in line and "complete" in line

    given = runlog.parse_log(path, batch_tokens=393_216, label="record 0827")
    assert given.group == "record 0827" and given.batch_tokens == 393_216 and not given.batch_tokens_assumed
    assert given.tokens_at(100) == 100 * 393_216


def test_modded_nanogpt_log_variants_and_unfinished(tmp_path, capsys):
    val = [(0, 10.8), (5, 5.0), (10, 3.9), (15, 3.5), (20, 3.27)]
    bare = runlog.parse_log(write_modded_log(tmp_path / "bare.txt", val, num_steps=20, smi=False, train_loss=True))
    assert bare.device is None and bare.complete
    assert bare.train_losses[0] == (1, 4.05) and runlog.final_train_loss(bare) == pytest.approx(3.32)

    text_with_rule = tmp_path / "notes.txt"
    text_with_rule.write_text(f"notes\n{SEPARATOR}\nmore notes\n")
    with pytest.raises(runlog.LogError, match="notes.txt: not a training log"):
        runlog.parse_log(text_with_rule)

    unfinished = write_modded_log(tmp_path / "killed.txt", val, num_steps=20, final=False)
    with pytest.raises(runlog.LogError, match=r"no final validation line \(step N/N\).*last step 17/20"):
        runlog.parse_log(unfinished)
    assert not runlog.parse_log(unfinished, allow_incomplete=True).ended
    notes = []
    assert runlog.load_runs([unfinished], warn=notes.append) == []
    assert notes == [f"skipped unfinished log {unfinished} (last step 17/20)"]

    # the tools take them next to ours; --label groups several logs, --batch_tokens sets their tokens per step
    logs = [str(write_modded_log(tmp_path / f"rec{i}.txt", [(s, loss + 0.01 * i) for s, loss in val], num_steps=20))
            for i in range(2)]
    assert stats.main([*logs, str(fixture("M_seed0.log")), "--label", "record"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[2].split()[:2] == ["M", "1"] and rows[3].split()[:4] == ["record", "2", "20", "2"]
    assert runlog.main([logs[0], "--batch_tokens", "1000"]) == 0
    assert "(assumed)" not in capsys.readouterr().out
    out = tmp_path / "modded.png"
    assert plot.main([*logs, str(fixture("M_seed0.log")), "-o", str(out), "--no-reference"]) == 0
    _assert_png(out)


# ---------------------------------------------------------------- reference curves in the plot


def _dashed_lines(fig) -> int:
    return sum(line.get_linestyle() == "--" for ax in fig.axes for line in ax.get_lines())


def test_reference_curves_left_out_for_short_runs_and_kept_for_long(tmp_path):
    short = runlog.load_runs([fixture(n) for n in M_FINISHED])
    notes = []
    fig = plot.curves_figure(short, note=notes.append)
    assert _dashed_lines(fig) == 0
    assert len(notes) == 1 and notes[0].startswith("left out the reference curves of published_curves.csv")
    assert "10.5M tokens" in notes[0] and "10%" in notes[0]
    # forced in: two published curves on each of the two axes, no note
    assert _dashed_lines(plot.curves_figure(short, force_reference=True, note=notes.append)) == 4
    assert len(notes) == 1

    # a run of 2500 steps of 524,288 tokens (1.3B) is near the published curves' 2.3B tokens
    long_run = dataclasses.replace(short[0], val=[(s, 10.0 - s / 500, s * 150.0) for s in range(0, 2501, 250)])
    fig = plot.curves_figure([long_run, *short], note=notes.append)
    assert _dashed_lines(fig) == 4 and len(notes) == 1
    assert plot.curves_figure(short, reference=None, note=notes.append) is not None and len(notes) == 1


def test_reference_nearness_threshold(tmp_path):
    rng = np.random.default_rng()
    ref_steps = int(rng.integers(100, 1000)) * 10
    ref = tmp_path / "ref.csv"
    ref.write_text(f"script,step,val_loss,train_time_ms\nM,0,10.8,0\nM,{ref_steps},3.28,{ref_steps * 100}\n")
    curves = plot.load_reference(ref)
    run = runlog.parse_log(fixture("M_seed0.log"))  # 524,288 tokens per step, as the reference
    at = dataclasses.replace(run, val=[(0, 10.8, 0.0), (ref_steps // 10, 4.0, 1.0)])
    below = dataclasses.replace(run, val=[(0, 10.8, 0.0), (ref_steps // 10 - 1, 4.0, 1.0)])
    assert plot.reference_is_near([at], curves) and plot.reference_is_near([below, at], curves)
    assert not plot.reference_is_near([below], curves)
    assert plot.reference_is_near([below], curves, fraction=0.05)


def test_plot_main_reference_options(tmp_path, capsys):
    logs = [str(fixture(n)) for n in M_FINISHED]
    assert plot.main([*logs, "-o", str(tmp_path / "a.png")]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("left out the reference curves") and len(captured.err.splitlines()) == 1
    assert plot.main([*logs, "-o", str(tmp_path / "b.png"), "--reference"]) == 0
    assert capsys.readouterr().err == ""
    assert plot.main([*logs, "-o", str(tmp_path / "c.png"), "--no-reference"]) == 0
    assert capsys.readouterr().err == ""
    for name in "abc":
        _assert_png(tmp_path / f"{name}.png")


# ---------------------------------------------------------------- two-group comparison


def test_welch_interval_and_p_match_scipy():
    rng = np.random.default_rng()
    for _ in range(25):
        n_base, n_new = rng.integers(2, 10, size=2)
        base = rng.normal(3.28, rng.uniform(0.001, 0.05), n_base)
        new = rng.normal(3.28 + rng.normal(0, 0.02), rng.uniform(0.001, 0.05), n_new)
        d = stats.welch_difference(base, new)
        reference = scipy.stats.ttest_ind(new, base, equal_var=False)
        interval = reference.confidence_interval(0.95)
        assert d.diff == pytest.approx(new.mean() - base.mean(), abs=1e-12)
        assert (d.lo, d.hi) == (pytest.approx(interval.low, abs=1e-12), pytest.approx(interval.high, abs=1e-12))
        assert d.p == pytest.approx(reference.pvalue, rel=1e-9)
        assert d.df == pytest.approx(reference.df, rel=1e-9)
    # by hand: base [0, 2] (var 2), new [0, 4] (var 8): se^2 = 1 + 4 = 5, df = 25 / (1 + 16) = 25/17
    d = stats.welch_difference([0.0, 2.0], [0.0, 4.0])
    assert d.df == pytest.approx(25 / 17)
    assert d.hi - d.diff == pytest.approx(scipy.stats.t.ppf(0.975, 25 / 17) * math.sqrt(5))


def test_differences_with_one_run_per_side():
    for difference in (stats.welch_difference([3.30], [3.29]),
                       stats.welch_difference([3.30, 3.31], [3.29]),
                       stats.bootstrap_difference([3.30], [3.29, 3.28], seed=0)):
        assert difference.lo is None and difference.hi is None and difference.p is None
        assert difference.note == "an interval needs at least 2 runs per side"
    assert stats.welch_difference([3.30], [3.29]).diff == pytest.approx(-0.01)


def test_bootstrap_interval_covers_true_difference_and_is_reproducible():
    rng = np.random.default_rng()
    true_diff = -rng.uniform(0.03, 0.06)
    base, new = rng.normal(0, 0.01, 8), rng.normal(0, 0.01, 8)
    base, new = base - base.mean() + 3.30, new - new.mean() + 3.30 + true_diff  # sample means exactly on target
    seed = int(rng.integers(0, 2**31))
    d = stats.bootstrap_difference(base, new, seed=seed)
    assert d.diff == pytest.approx(true_diff)
    assert d.lo < true_diff < d.hi < 0
    again = stats.bootstrap_difference(base, new, seed=seed)
    assert (again.lo, again.hi) == (d.lo, d.hi)
    other = stats.bootstrap_difference(base, new, seed=seed + 1)
    assert (other.lo, other.hi) != (d.lo, d.hi)
    # no spread and no difference: the interval is the single point 0
    flat = stats.bootstrap_difference([3.3, 3.3], [3.3, 3.3], seed=seed)
    assert flat.lo == pytest.approx(0.0) and flat.hi == pytest.approx(0.0)


def test_slope_and_step_conversion_on_linear_curves():
    rng = np.random.default_rng()
    slope = -rng.uniform(1e-4, 5e-3)
    base_run = runlog.parse_log(fixture("M_seed0.log"))
    runs = []
    for _ in range(3):
        intercept = 3.6 + slope * rng.uniform(-20, 20)
        # a steep first point, then a straight line from step 25 to 200
        val = [(0, 10.8, 0.0)] + [(s, intercept + slope * s, s * 10.0) for s in range(25, 201, 25)]
        runs.append(dataclasses.replace(base_run, val=val, num_steps=200))
    crossing_target = 3.6 + slope * 130  # each run crosses between steps 100 and 175
    measured = stats.loss_slope(runs, crossing_target)
    assert measured.slope == pytest.approx(slope, rel=1e-9)
    assert (measured.runs, measured.reached, measured.points) == (3, 3, 4)
    unreached = stats.loss_slope(runs, target=0.0)  # the last 4 points of each run
    assert unreached.slope == pytest.approx(slope, rel=1e-9) and unreached.reached == 0
    assert stats.steps_equivalent(10 * slope, slope) == pytest.approx(10.0)

    # new = base shifted down by what base gains in 30 steps: "+30.0 steps", new is ahead
    shift = 30 * slope
    new_runs = [dataclasses.replace(r, run_id=f"new_{i}", val=[(s, loss + shift, t) for s, loss, t in r.val])
                for i, r in enumerate(runs)]
    text = stats.format_comparison(stats.compare(runs, new_runs, target=crossing_target, seed=0))
    assert "= +30.0 steps" in text and "base would need about 30.0 more steps" in text
    assert "assumes: base's curve is a straight line" in text and "(base 200, new 200)" in text
    behind = [dataclasses.replace(r, run_id=f"behind_{i}", val=[(s, loss - shift, t) for s, loss, t in r.val])
              for i, r in enumerate(runs)]
    text = stats.format_comparison(stats.compare(runs, behind, target=crossing_target, seed=0))
    assert "= -30.0 steps" in text and "(new is behind)" in text


def test_verdict_wording():
    lower = stats.Difference(3.30, 3.2877, -0.0123, lo=-0.0195, hi=-0.0051, p=0.004)
    assert stats.verdict("A", "B", lower) == "B is lower than A by 0.0123 (95% CI 0.0051 to 0.0195), p = 0.004"
    higher = stats.Difference(3.30, 3.3123, 0.0123, lo=0.0051, hi=0.0195, p=0.004)
    assert stats.verdict("A", "B", higher) == "B is higher than A by 0.0123 (95% CI 0.0051 to 0.0195), p = 0.004"
    same = stats.Difference(3.30, 3.3012, 0.0012, lo=-0.0040, hi=0.0064, p=0.61)
    assert (stats.verdict("A", "B", same)
            == "no significant difference: B - A = 0.0012 (95% CI -0.0040 to 0.0064), p = 0.61")
    one = stats.welch_difference([3.30], [3.29])
    assert stats.verdict("A", "B", one) == "B - A = -0.0100 (an interval needs at least 2 runs per side)"

    # from data: a clear drop, a clear rise, and identical samples
    rng = np.random.default_rng()
    base = rng.normal(3.30, 0.002, 6)
    assert stats.verdict("A", "B", stats.welch_difference(base, base - 0.05)).startswith("B is lower than A by 0.0500")
    assert stats.verdict("A", "B", stats.welch_difference(base, base + 0.05)).startswith("B is higher than A by 0.0500")
    assert stats.verdict("A", "B", stats.welch_difference(base, base)).startswith(
        "no significant difference: B - A = 0.0000 (95% CI -")


def _group_logs(folder: Path, name: str, shift: float, count: int, rng: np.random.Generator, **config) -> list[str]:
    """`count` logs of a falling curve (3.28 crossed near step 16 of 20), shifted by `shift`, with noise."""
    paths = []
    for i in range(count):
        noise = rng.normal(0, 0.002)
        val = [(0, 10.8)] + [(s, 3.6 - 0.02 * s + shift + noise) for s in range(5, 21, 5)]
        paths.append(str(curve_log(folder / f"{name}_{i}.txt", val, num_steps=20, **config)))
    return paths


def test_stats_against_compares_two_groups(tmp_path, capsys):
    rng = np.random.default_rng()
    base = _group_logs(tmp_path, "base", 0.0, 3, rng)
    new = _group_logs(tmp_path, "new", -0.03, 4, rng, tied_embed=True)
    nan_run = write_log(tmp_path / "nan.txt", ["step:1/20 train_loss:nan lr_mult:1.0000 train_time:9ms "
                                               "step_avg:9.00ms", "stopped: loss is nan at step 1"])
    assert stats.main([*base, str(nan_run), "--against", *new, "--seed", "7"]) == 0
    captured = capsys.readouterr()
    assert captured.err == f"left out {nan_run} from the base group: stopped (loss is nan at step 1)\n"
    out = captured.out.splitlines()
    assert out[0] == "base: M (3 complete runs)" and out[1] == "new:  M (tied_embed=True) (4 complete runs)"
    loss_row = next(line for line in out if line.startswith("final val loss"))
    assert "Welch t (df " in loss_row
    steps_row = next(line for line in out if line.startswith("steps to 3.28"))
    assert "bootstrap (10,000 resamples, seed 7)" in steps_row
    assert next(line for line in out if line.startswith("time to 3.28 [s]"))
    assert any(line.startswith("loss difference in steps: ") for line in out)
    verdict = re.fullmatch(r"M \(tied_embed=True\) is lower than M by (\S+) \(95% CI (\S+) to (\S+)\), p = (\S+)",
                           out[-1])
    assert verdict and float(verdict[1]) == pytest.approx(0.03, abs=0.01)
    assert float(verdict[2]) < float(verdict[1]) < float(verdict[3]) and float(verdict[4]) < 0.05
    # the same seed gives the same output
    assert stats.main([*base, "--against", *new, "--seed", "7"]) == 0
    first = capsys.readouterr().out
    assert stats.main([*base, "--against", *new, "--seed", "7"]) == 0
    assert capsys.readouterr().out == first


def test_stats_against_edge_cases(tmp_path, capsys):
    rng = np.random.default_rng()
    base = _group_logs(tmp_path, "base", 0.0, 2, rng)
    never = _group_logs(tmp_path, "never", 0.5, 2, rng)  # ends at 3.7: never reaches 3.28
    assert stats.main([*base, "--against", *never]) == 0
    out = capsys.readouterr().out
    assert "not reached by all runs (base 2/2, new 0/2)" in out
    assert re.fullmatch(r"new M is higher than base M by 0\.[45]\d+ \(95% CI .*\), p = \S+", out.splitlines()[-1])

    assert stats.main([base[0], "--against", never[0]]) == 0
    out = capsys.readouterr().out
    assert out.count("an interval needs at least 2 runs per side") >= 2
    assert re.fullmatch(r"new M - base M = 0\.[45]\d+ \(an interval needs at least 2 runs per side\)",
                        out.splitlines()[-1])

    mixed = [base[0], str(fixture("M_tied_variant.log"))]
    assert stats.main([*mixed, "--against", *never]) == 0
    assert "base: [base_0.txt, M_tied_variant.log] (2 complete runs)" in capsys.readouterr().out

    assert stats.main([str(fixture("M_nan_cpu.log")), "--against", *never]) == 1
    assert "error: no complete runs among the base logs" in capsys.readouterr().err


# ---------------------------------------------------------------- runs, not files


def test_runs_are_grouped_by_their_whole_configuration(tmp_path):
    """A sweep of two learning rates is two groups, named by the field in which they differ; the seed and where
    outputs go do not split a group."""
    rng = np.random.default_rng()
    low = _group_logs(tmp_path, "low", 0.0, 2, rng, muon_lr=0.05, log_dir="a")
    high = _group_logs(tmp_path, "high", 0.1, 2, rng, muon_lr=0.1, log_dir="b", seed=3)
    rows = stats.summarize(runlog.load_runs([*low, *high]))
    assert [(r["group"], r["runs"]) for r in rows] == [("M (muon_lr=0.05)", 2), ("M (muon_lr=0.1)", 2)]
    assert [r["group"] for r in stats.summarize(runlog.load_runs(low))] == ["M"]


def test_a_run_is_counted_once(tmp_path):
    """The same file twice, a copy (the same run id) and a run with its continuation are one run each; a
    continuation from before logs carried their past borrows the parent's earlier validation points."""
    rng = np.random.default_rng()
    (one,) = _group_logs(tmp_path, "one", 0.0, 1, rng)
    copy = tmp_path / "elsewhere" / "one_0.txt"
    copy.parent.mkdir()
    copy.write_text(Path(one).read_text())
    parent = curve_log(tmp_path / "parent.txt", [(0, 10.8), (5, 3.5), (10, 3.3)], num_steps=20, ended=False)
    child = curve_log(tmp_path / "child.txt", [(10, 3.3), (15, 3.2), (20, 3.1)], num_steps=20)
    text = child.read_text().replace("\nconfig: ", "\nconfig: ", 1)
    child.write_text(text.replace("\n=== training ===", "\nresumed_from: ckpt/parent/step000010.pt step:10 "
                                  "run:parent\n=== training ==="))
    notes = []
    runs = runlog.load_runs([one, one, str(copy), str(parent), str(child)], warn=notes.append)
    assert sorted(r.path.name for r in runs) == ["child.txt", "one_0.txt"]
    assert notes == [f"counted once: {one} is given twice", f"counted once: {copy} is a copy of {one} (run id one_0)",
                     f"merged {parent} into its continuation {child} (resumed at step 10)"]
    merged = next(r for r in runs if r.run_id == "child")
    assert [s for s, _, _ in merged.val] == [0, 5, 10, 15, 20]
    assert runlog.steps_to_target(merged) == pytest.approx(10 + 5 * (3.3 - 3.28) / (3.3 - 3.2))


def test_the_same_run_on_both_sides_is_refused(tmp_path, capsys):
    rng = np.random.default_rng()
    logs = _group_logs(tmp_path, "g", 0.0, 2, rng)
    assert stats.main([*logs, "--against", logs[1]]) == 1
    assert "error: run g_1 is on both sides of --against" in capsys.readouterr().err


def test_groups_of_other_lengths_or_batches_are_compared_with_a_warning(tmp_path, capsys):
    rng = np.random.default_rng()
    base = _group_logs(tmp_path, "base", 0.0, 2, rng)
    longer = [str(curve_log(tmp_path / f"long_{i}.txt", [(0, 10.8), (15, 3.3), (30, 3.1)], num_steps=30,
                            batch_tokens=65_536)) for i in range(2)]
    assert stats.main([*base, "--against", *longer]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2] == ("warning: the groups differ in steps (num_iterations: base 20; new 30); their losses and "
                      "times are not like for like")
    assert out[3].startswith("warning: the groups differ in tokens per step (batch_tokens: base 524288; new 65536)")


@pytest.mark.parametrize("target", ["nan", "inf", "-inf"])
def test_target_must_be_finite(target, capsys):
    with pytest.raises(SystemExit) as exit_:
        stats.main([str(fixture("M_seed0.log")), f"--target={target}"])
    assert exit_.value.code == 2 and "must be a finite number" in capsys.readouterr().err


def test_against_compares_mean_training_time_with_an_interval(tmp_path, capsys):
    """The speedrun's measure when every run stops at a fixed step: the training time, Welch interval."""
    rng = np.random.default_rng()
    base = [str(curve_log(tmp_path / f"b{i}.txt", [(0, 10.8), (20, 3.5)], num_steps=20, ms_per_step=100 + i))
            for i in range(3)]
    new = [str(curve_log(tmp_path / f"n{i}.txt", [(0, 10.8), (20, 3.5)], num_steps=20, ms_per_step=90 + 2 * i))
           for i in range(3)]
    assert rng is not None and stats.main([*base, "--against", *new]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("train time [s]"))
    expected = stats.welch_difference([2000 + 20 * i for i in range(3)], [1800 + 40 * i for i in range(3)])
    assert (
        row.split()[3:6] == ["2.02", "1.84", "-0.18"]
        and f"{expected.lo / 1000:+.2f} to {expected.hi / 1000:+.2f}" in row
    )


def test_label_names_the_group_it_follows(tmp_path, capsys):
    rng = np.random.default_rng()
    base, new = _group_logs(tmp_path, "b", 0.0, 2, rng), _group_logs(tmp_path, "n", -0.02, 2, rng)
    assert stats.main([*base, "--label", "baseline", "--against", *new, "--label", "idea"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["base: baseline (2 complete runs)", "new:  idea (2 complete runs)"]
    assert stats.main([*base, "--label", "baseline", "--against", *new]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == ["base: baseline (2 complete runs)", "new:  M (2 complete runs)"]


def test_modded_logs_of_one_code_are_one_group_and_their_seconds_are_read(tmp_path):
    """A record's runs (the same code) are one group; the optimization track writes train_time in seconds."""
    logs = [write_modded_log(tmp_path / f"r{i}.txt", [(0, 10.8), (10, 3.3)], num_steps=10) for i in range(2)]
    seconds = tmp_path / "track3.txt"
    seconds.write_text(logs[0].read_text().replace("train_time:950ms", "train_time:0.950s"))
    other = write_modded_log(tmp_path / "other.txt", [(0, 10.8), (10, 3.4)], num_steps=10)
    other.write_text(other.read_text().replace("import os", "import sys", 1))
    runs = runlog.load_runs([*logs, other])
    assert sorted(r.group for r in runs) == ["modded-nanogpt:other", "modded-nanogpt:r0", "modded-nanogpt:r0"]
    run = runlog.parse_log(seconds)
    assert run.val[-1] == (10, 3.3, 950.0) and run.complete


def test_plot_writes_pdf_and_svg_and_refuses_other_endings(tmp_path, capsys):
    logs = [str(fixture(n)) for n in M_FINISHED]
    assert plot.main([*logs, "-o", str(tmp_path / "c.pdf")]) == 0 and (tmp_path / "c.pdf").read_bytes()[:5] == b"%PDF-"
    assert plot.main([*logs, "-o", str(tmp_path / "c.svg")]) == 0 and b"<svg" in (tmp_path / "c.svg").read_bytes()[:400]
    with pytest.raises(SystemExit):
        plot.main([*logs, "-o", str(tmp_path / "c.jpg")])
    assert "the figure is written as .png, .pdf, .svg" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plot.main([*logs, "--ylim", "0", "5", "-o", str(tmp_path / "d.png")])
    assert "the loss axis is logarithmic, its limits must be positive" in capsys.readouterr().err
    assert not (tmp_path / "c.jpg").exists() and not (tmp_path / "d.png").exists()

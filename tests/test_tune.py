"""tune.py: the coordinate descent against a known bowl of the fields (a fake runner), resume, divergence and
crashes, the report and its figure, one real tiny tune on the CPU, and the study's cells."""
import json
import math
from collections import deque
from pathlib import Path

import numpy as np
import pytest

import sweep
import tune
from conftest import tiny_args, write_learnable_shards


def searches_for(*runs: tuple[str, list[str]], common=()) -> list[tune.Search]:
    return tune.make_searches(list(runs), list(common))


def serial(outcome):
    """A fake runner that runs one point at a time, in the order asked, outcome(point) setting its result;
    records every point it runs."""
    asked = []

    def run(points, finished):
        queue = deque(points)
        while queue:
            point = queue.popleft()
            asked.append(point)
            outcome(point)
            queue.extend(finished(point))
        return True

    return run, asked


def bowl(optimum: dict[str, float]):
    """A fake runner: final loss sum_f (log(value_f / optimum_f))^2 + 3."""
    def outcome(p):
        p.status = "ok"
        p.final_val_loss = 3 + 0.001 * p.seed + sum(math.log(p.values[k] / v) ** 2 for k, v in optimum.items()
                                                    if k in p.values)
    return serial(outcome)


def test_the_search_ends_within_one_grid_step_of_the_bowls_minimum(tmp_path):
    rng = np.random.default_rng()
    (search,) = searches_for(("M", ["muon_lr", "head_lr", "adam_beta2"]))
    optimum = {"muon_lr": 0.05 * math.exp(rng.uniform(-1.5, 1.5)), "head_lr": 0.22 * math.exp(rng.uniform(-1.5, 1.5)),
               "adam_beta2": 0.95}
    runner, asked = bowl(optimum)
    state = tune.State(tmp_path, {"test": 1})
    trace = tune.tune([search], (0.5, 1, 2), 3, 2, state, runner, report=lambda line: None)["M"]
    for name in ("muon_lr", "head_lr"):
        assert abs(math.log(trace["best"][name] / optimum[name])) <= math.log(2**0.5) / 2 + 1e-9, (name, trace["best"])
    assert trace["best"]["adam_beta2"] == 0.95
    # momentum-like fields move 1 - value: 0.95 -> 0.975 and 0.9, never past 1
    assert {p.values["adam_beta2"] for p in asked} >= {0.9, 0.975} and max(p.values["adam_beta2"] for p in asked) < 1
    assert [p.seed for p in trace["finals"]] == [1, 2]


def test_an_optimum_past_the_grid_is_followed_three_steps_and_the_report_says_when_it_lies_further(tmp_path):
    """A bowl whose minimum lies 8 to 11 times below the start: one round brackets it (two steps past the grid's
    edge, and a third that is worse) and picks the grid value nearest it, where a plain grid would stop at half the
    start; 64 times below, the search stops three steps out and the report says the chosen value is at the edge."""
    (search,) = searches_for(("M", ["muon_lr"]))
    optimum = 0.05 / 2 ** np.random.default_rng().uniform(3, 3.45)
    runner, asked = bowl({"muon_lr": optimum})
    trace = tune.tune([search], (0.5, 1, 2), 1, 1, tune.State(tmp_path, {}), runner, report=print)["M"]
    assert abs(math.log2(trace["best"]["muon_lr"] / optimum)) <= 0.5 + 1e-9
    assert "edge:" not in tune.format_report(search, trace)
    runner, asked = bowl({"muon_lr": 0.05 / 64})
    (tmp_path / "far").mkdir()
    trace = tune.tune([search], (0.5, 1, 2), 1, 1, tune.State(tmp_path / "far", {}), runner, report=print)["M"]
    assert sorted(p.values["muon_lr"] for p in asked if p.seed == 0) == [0.003125, 0.00625, 0.0125, 0.025, 0.05, 0.1]
    assert "edge: muon_lr chose the smallest value tried, 0.003125" in tune.format_report(search, trace)


def test_the_final_seeds_are_new_runs_and_the_searchs_own_run_stays_out_of_their_mean(tmp_path):
    """The search's seed-0 runs are lucky here (0.05 below the bowl, as a search's winner tends to be): the final
    seeds are 1 .. K, their mean is the bowl's, and the report gives the seed-0 run's loss apart."""
    rng = np.random.default_rng()
    (search,) = searches_for(("M", ["muon_lr"]))
    noise = {seed: rng.normal(0, 0.002) for seed in range(1, 5)}

    def outcome(p):
        p.status = "ok"
        p.final_val_loss = 3 + math.log(p.values["muon_lr"] / 0.05) ** 2 + (noise[p.seed] if p.seed else -0.05)

    runner, asked = serial(outcome)
    trace = tune.tune([search], (0.5, 1, 2), 1, 4, tune.State(tmp_path, {}), runner, report=print)["M"]
    assert [p.seed for p in trace["finals"]] == [1, 2, 3, 4] and trace["search_loss"] == pytest.approx(2.95)
    text = tune.format_report(search, trace)
    assert f"final seeds 1-4: 4 ok, mean {3 + np.mean(list(noise.values())):.4f}" in text
    assert "the search's own run of these values (seed 0, left out of the mean: picked for being low): 2.9500" in text


def test_a_later_round_moves_every_field_at_once(tmp_path):
    """Round one asks for one field's points at a time; round two asks for every field's fine points together,
    each holding the other fields at round one's best, then for every field's step past its edge together, and
    keeps each field's own best. A bowl whose minimum lies 2^(0.3 to 0.4) from the start in each field, either
    way: round one keeps the start, round two picks the 2^1/2 step towards the minimum in every field."""
    rng = np.random.default_rng()
    (search,) = searches_for(("M", ["muon_lr", "head_lr", "embed_lr"]))
    sides = {name: rng.choice((-1, 1)) for name in search.fields}
    optimum = {name: search.start[name] * 2 ** (sides[name] * rng.uniform(0.3, 0.4)) for name in search.fields}
    descent, batches = tune.descend(search, (0.5, 1, 2), 2, 1), []
    asked = next(descent)
    try:
        while True:
            batches.append(asked)
            for p in asked:
                p.status = "ok"
                p.final_val_loss = 3 + sum(math.log(p.values[k] / v) ** 2 for k, v in optimum.items())
            asked = descent.send({p.key: p for p in asked})
    except StopIteration as end:
        trace = end.value
    assert [len(b) for b in batches] == [3, 3, 3, 7, 3, 1]
    for batch in batches[3:5]:
        assert all(sum(p.values[k] != search.start[k] for k in search.fields) <= 1 for p in batch)
    assert trace["best"] == {name: search.moved(name, search.start[name], 2 ** (sides[name] / 2))
                             for name in search.fields}
    assert trace["search_loss"] is None  # the three fields' new values were never run together


def test_each_search_moves_on_without_waiting_for_the_others(tmp_path):
    """A runner that keeps one search's first points running: the other search still goes through all its
    fields and its final seeds."""
    slow, fast = searches_for(("A", ["adam_lr"]), ("M", ["muon_lr", "head_lr"]))
    held, order = [], []

    def run(points, finished):
        queue = deque(points)
        while queue:
            point = queue.popleft()
            if point.run == "A" and queue:
                held.append(point)  # still running
                continue
            point.status, point.final_val_loss = "ok", 3 + sum(math.log(v) ** 2 for v in point.values.values())
            order.append(point.run)
            queue.extend(finished(point))
            if not queue:
                queue.extend(held)
                held.clear()
        return True

    traces = tune.tune([slow, fast], (0.5, 1, 2), 1, 2, tune.State(tmp_path, {}), run, report=print)
    assert set(traces) == {"A", "M"} and order.index("A") == order.count("M")


def test_a_time_limit_starts_no_run_that_would_end_after_it(tmp_path, capsys):
    """A configuration whose last run took longer than the limit: nothing starts, the command exits 3 and the
    state is as it was; without a limit, the same command would run it."""
    common = ["--preset=tiny"]
    plan = {"runs": [["A", ["adam_lr"]]], "grid": [0.5, 1.0, 2.0], "rounds": 1, "final_seeds": 1,
            "common_args": common}
    state = tune.State(tmp_path, plan)
    state.points["x"] = tune.Point("A", {"adam_lr": 0.01}, 0, "ok", 5.0, "x.txt", None, 1, wall_s=120.0)
    state.save()
    before = (tmp_path / "tune.json").read_text()
    argv = ["--out", str(tmp_path), "--run", "A", "--search", "adam_lr", "--rounds", "1", "--final_seeds", "1",
            "--cpu", "--time_limit", "60", "--", *common]
    assert tune.main(argv) == 3
    assert "--time_limit 60 s reached, 2 run(s) still to do" in capsys.readouterr().err
    assert (tmp_path / "tune.json").read_text() == before and not list(tmp_path.glob("*.out"))
    assert tune.main([*argv[:-4], "--time_limit", "0", "--", *common]) == 2


def test_a_runs_expected_time_follows_how_many_runs_shared_its_gpu():
    """The time limit's estimate: the longest finished run of the configuration among those that shared their GPU
    with the fewest runs at or above the number asked; past the most seen, scaled in proportion; runs recorded
    without their sharing only when no run has it; other configurations and failed runs never."""
    def ok(run, sharing, wall_s, status="ok"):
        return tune.Point(run, {"adam_lr": wall_s}, 0, status, 5.0, None, None, 1, wall_s=wall_s, sharing=sharing)
    points = [ok("A", 4, 215.0), ok("A", 4, 290.0), ok("A", 8, 410.0), ok("A", 8, 460.0), ok("A", None, 999.0),
              ok("M", 2, 1000.0), ok("A", 1, 5000.0, status="failed")]
    assert [tune.expected_s(points, "A", n) for n in (1, 2, 4, 5, 8)] == [290.0, 290.0, 290.0, 460.0, 460.0]
    assert tune.expected_s(points, "A", 16) == 920.0
    assert tune.expected_s([ok("A", None, 120.0), ok("A", None, 90.0)], "A", 1) == 120.0
    assert tune.expected_s(points, "B", 1) is None


def test_the_same_command_again_runs_nothing_more(tmp_path):
    searches = searches_for(("M", ["muon_lr"]), ("A", ["adam_lr"]))
    runner, asked = bowl({"muon_lr": 0.1})
    tune.tune(searches, (0.5, 1, 2), 2, 3, tune.State(tmp_path, {"p": 1}), runner, report=lambda line: None)
    first = len(asked)
    again, asked_again = bowl({"muon_lr": 0.1})
    traces = tune.tune(searches, (0.5, 1, 2), 2, 3, tune.State(tmp_path, {"p": 1}), again, report=lambda line: None)
    assert first > 0 and asked_again == [] and traces["M"]["best"]["muon_lr"] == 0.1
    with pytest.raises(tune.TuneError, match="holds another tune"):
        tune.State(tmp_path, {"p": 2})


def test_a_diverged_point_is_the_worst_and_a_crash_is_tried_once_more(tmp_path):
    """The largest lr diverges: the search goes on and never picks it; a run that crashes once is run again."""
    (search,) = searches_for(("M", ["muon_lr"]))
    calls = []

    def outcome(p):
        calls.append((p.values["muon_lr"], p.seed))
        first_try = calls.count((p.values["muon_lr"], p.seed)) == 1
        if p.values["muon_lr"] >= 0.1:
            p.status, p.final_val_loss = "diverged", math.nan
        elif p.values["muon_lr"] == 0.025 and first_try:
            p.status, p.error = "failed", "crashed"
        else:
            p.status, p.final_val_loss = "ok", 4 - p.values["muon_lr"]

    notes = []
    run, _ = serial(outcome)
    trace = tune.tune([search], (0.5, 1, 2), 1, 1, tune.State(tmp_path, {}), run, report=notes.append)["M"]
    assert trace["best"]["muon_lr"] == 0.05 and math.isinf(trace["tried"]["muon_lr"][0.1])
    assert calls.count((0.025, 0)) == 2
    assert notes == ["trying a crashed run once more: M {'muon_lr': 0.025} seed=0"]


def test_the_status_of_a_finished_run_from_its_log(tmp_path):
    from test_results_tools import curve_log, write_log

    ok = curve_log(tmp_path / "ok.txt", [(0, 10.8), (20, 4.0)], num_steps=20)
    assert tune.point_status(ok, 0) == ("ok", 4.0, None)
    up = curve_log(tmp_path / "up.txt", [(20, 9.9)], num_steps=20)  # above its first training loss, 4.05
    assert tune.point_status(up, 0)[0] == "diverged"
    nan = write_log(tmp_path / "nan.txt", ["step:1/20 train_loss:nan lr_mult:1.0000 train_time:9ms step_avg:9.00ms",
                                           "stopped: loss is nan at step 1"])
    assert tune.point_status(nan, 1)[0] == "diverged"
    assert tune.point_status(tmp_path / "none.txt", 1) == ("failed", None, "no log (exit 1)")


def test_the_report_marks_choices_within_the_seeds_spread_and_draws_the_figure(tmp_path):
    (search,) = searches_for(("M", ["muon_lr", "head_lr"]))
    runner, _ = bowl({"muon_lr": 0.05, "head_lr": 0.44})
    trace = tune.tune([search], (0.5, 1, 2), 1, 3, tune.State(tmp_path, {}), runner, report=lambda line: None)["M"]
    text = tune.format_report(search, trace)
    assert "| muon_lr | 0.05 | 0.05 (3.4805) | 0.025: 3.9609, 0.1: 3.9609 | 0.4805 | no |" in text  # head_lr at 0.22
    assert "| head_lr | 0.22 | 0.44 (3.0000) | 0.22: 3.4805, 0.88: 3.4805 | 0.4805 | no |" in text
    assert "edge:" not in text
    assert "final seeds 1-3: 3 ok, mean 3.0020, 95% CI 2.9995 to 3.0045, seed-to-seed std 0.0010" in text
    tune.draw(search, trace, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"


def test_report_from_the_folder_alone_finished_or_not(tmp_path, capsys):
    """`tune.py --out DIR --report` reads the plan from DIR/tune.json: an unfinished tune lists its points so far
    (exit 1), a finished one prints its table and draws its figure (exit 0)."""
    common = ["--preset=tiny"]
    (search,) = searches_for(("M", ["muon_lr"]), common=common)
    plan = {"runs": [["M", ["muon_lr"]]], "grid": [0.5, 1.0, 2.0], "rounds": 1, "final_seeds": 2, "common_args": common}
    runner, _ = bowl({"muon_lr": 0.1})

    def first_batch_only(points, finished):
        for point in points:
            point.status, point.final_val_loss = "ok", 3 + math.log(point.values["muon_lr"] / 0.1) ** 2
            finished(point)
        return False  # interrupted before the next points
    with pytest.raises(KeyboardInterrupt):
        tune.tune([search], (0.5, 1.0, 2.0), 1, 2, tune.State(tmp_path, plan), first_batch_only, report=print)
    assert tune.main(["--out", str(tmp_path), "--report"]) == 1
    out = capsys.readouterr()
    assert "run: M (unfinished: 3 point(s) so far)" in out.out and "| 0.1 | 0 | ok | 3.0000 |" in out.out
    assert "not finished" in out.err and not list(tmp_path.glob("*.png"))
    tune.tune([search], (0.5, 1.0, 2.0), 1, 2, tune.State(tmp_path, plan), runner, report=print)
    assert tune.main(["--out", str(tmp_path), "--report"]) == 0
    assert "| muon_lr | 0.05 | 0.1 (3.0000) |" in capsys.readouterr().out
    assert (tmp_path / "tune_M.png").exists()
    assert tune.main(["--out", str(tmp_path / "elsewhere"), "--report"]) == 2


@pytest.mark.parametrize("argv, message", [
    (["--run", "M"], "no --search field"),
    (["--run", "M", "--search", "no_such"], "is not a number field"),
    (["--run", "M", "--search", "tied_embed"], "is not a number field"),
    (["--run", "A", "--search", "head_lr"], "head_lr starts at 0.0"),
    (["--run", "M --muon_lr=-1", "--search", "muon_lr"], "--muon_lr=-1.0 is out of range"),
    (["--study", "interaction", "--run", "M"], "--study brings its own runs"),
])
def test_bad_input_is_refused_before_anything_runs(tmp_path, capsys, argv, message):
    assert tune.main(["--out", str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_the_study_has_four_cells_each_searched_from_its_stated_start(capsys, tmp_path):
    """AdamW and Muon, each with A's architecture and with M's; every cell has its fields and a line on where its
    starting values come from; the dry run prints the first batch."""
    cells = [(spec, fields) for spec, fields, _ in tune.STUDY["interaction"]]
    searches = tune.make_searches(cells, [])
    archs = [(Path(s.spec.script).stem[-1], "tied_embed=true" in s.spec.label or s.spec.label.startswith("A --head"))
             for s in searches]
    assert sorted(archs) == [("A", False), ("A", True), ("M", False), ("M", True)]
    assert all(why for _, _, why in tune.STUDY["interaction"])
    assert tune.main(["--study", "interaction", "--out", str(tmp_path / "s"), "--dry_run", "--cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 * 3 + 1 and lines[-1].startswith("# then 4 search(es) of 2 round(s), 5 final seeds")


def test_a_real_tiny_tune_on_the_cpu(tmp_path, capsys, monkeypatch):
    """One field, two values, one final seed, through sweep.py's machinery and the real script (two runs at once):
    the lower final loss wins, tune.json holds the three points with their wall times, and the same command again
    runs nothing. (In 4 steps the larger lr wins, and a grid of 0.5 and 1 never goes past its upper edge.)"""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    train, val = write_learnable_shards(tmp_path, 30_000, 2_000)
    common = [a for a in tiny_args(train, val, "unused", num_iterations=4, val_loss_every=0, val_tokens=1024,
                                   warmup_compile_steps=0) if not a.startswith(("--log_dir", "--preset"))]
    argv = ["--out", str(tmp_path / "out"), "--run", "A --preset=tiny", "--search", "adam_lr", "--grid", "0.5,1",
            "--rounds", "1", "--final_seeds", "1", "--cpu", "--jobs_per_gpu", "2", "--", *common]
    assert tune.main(argv) == 0
    out = capsys.readouterr().out
    points = json.loads((tmp_path / "out" / "tune.json").read_text())["points"]
    searched = [p for p in points if p["seed"] == 0]
    assert sorted(p["values"]["adam_lr"] for p in searched) == [0.005, 0.01] and {p["status"] for p in points} == {"ok"}
    best = min(searched, key=lambda p: p["final_val_loss"])["values"]["adam_lr"]
    assert [(p["seed"], p["values"]["adam_lr"]) for p in points if p["seed"]] == [(1, best)]  # the final seed
    assert f"| adam_lr | 0.01 | {best:g} (" in out and (tmp_path / "out" / "tune_A_preset-tiny.png").exists()
    assert out.count("[1/2]") == out.count("[2/2]") == out.count("[3/3]") == 1 and all(p["wall_s"] > 0 for p in points)
    assert tune.main(argv) == 0 and "[1/" not in capsys.readouterr().out

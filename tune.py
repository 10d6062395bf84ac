r"""Tune a configuration's fields by coordinate descent, then measure the winner over seeds: one command.

    python tune.py --out DIR --run SPEC [--search FIELD ...] [--run SPEC [--search FIELD ...] ...] \
        [--grid 0.5,1,2] [--rounds N] [--final_seeds K] [--gpus ID ...] [--time_limit S] [--dry_run] \
        -- COMMON_ARGS
    python tune.py --out DIR --report      # a finished tune's tables and figures; an unfinished one's points so far
    python tune.py --study interaction --out DIR -- --train_files=... --val_files=... --num_iterations=300

A --run is what sweep.py takes: a baseline letter (A, M) or a script path, with that configuration's own
--field=value arguments; each --run is searched on its own, over the --search fields that follow it (a --search
before any --run is searched in every run). A field starts at the run's value (its own argument, else the
script's default) and must be positive there.

Coordinate descent: for each field in turn, runs the grid times the field's current best value (--grid, factors;
for a field whose range is [0, 1), a momentum or a beta, the grid moves 1 - value instead), keeps the value of the
lowest final validation loss, and moves to the next field. Later rounds use the finer grid 2^-1/2, 1, 2^1/2
around the best and move every field at once (each field's points hold the others at their best, and each field
keeps its own best value): the runs of a round in one go instead of one field after another, as the fine steps
are small. A best value at the edge of a round's values is not yet an optimum: the round goes one grid step
further out that way, up to 3 steps, and the report says which chosen values are still at an edge. Then
--final_seeds new seeds of the winner, 1 .. K (the search's own run, seed 0, was picked for being low, its noise
included, and would bias the mean down). A point that diverged (a NaN stop, or a final loss above its first
training loss) counts as the worst and never stops the search; a run that crashed is reported and tried once more.
Each run's search moves on its own: its next points start as soon as its last ones are in, beside the other
searches' runs, so that the GPUs stay busy.

Noise: the final seeds' spread is the run-to-run noise; the report marks each chosen value whose margin over its
nearest neighbour on the grid is within that spread, and shows the neighbours' losses.

Resumable: every point is recorded in DIR/tune.json (run, values, seed, final val loss, status, log, wall time,
runs sharing its GPU); the same command again reads the finished points and runs only what is missing. Runs go
through sweep.py's machinery: one single-GPU process per run, K at a time on K GPUs (--gpus, --jobs_per_gpu), a
progress line per finished run, the logs in DIR (DIR/tune_last_command.json: the last command's runs, as
sweep.py's manifest).
--time_limit S (a scheduler's job limit, say): no run starts that would end more than S seconds after the
command started, judged by its configuration's finished runs that shared their GPU with as many runs or more
(expected_s); the runs in flight finish, then the command exits 3 and the same command continues. --report
(DIR alone: its tune.json holds the plan) prints a table per run (the chosen value of each field, the final seeds'
mean and 95% interval) and draws DIR/tune_<run>.png (final loss against each field's values, log x, the chosen
value marked); for an unfinished tune it lists the points so far and exits 1.

--study interaction: the optimizer x architecture 2x2 of docs/interaction.md, every cell tuned on its own (STUDY
below: the fields and where each starting value comes from), five final seeds a cell; bench/interaction.py
--study DIR turns it into the table and the figure.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import sys
import time
import zlib
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

import sweep
from runlog import LogError, parse_log

STATE = "tune.json"
FINE_GRID = (2**-0.5, 1.0, 2**0.5)
MAX_EXTEND = 3  # grid steps a round may go past its grid's edge after an optimum that is not bracketed
ROUNDS, FINAL_SEEDS = 2, 5

# The 2x2 of docs/interaction.md: (run spec, searched fields, where the starting values come from). Each cell's
# starting values are its --field=value arguments, or the script's defaults (the remix scripts' values).
STUDY = {
    "interaction": [
        ("A --head_lr=0.0021", ["adam_lr", "head_lr", "weight_decay"],
         "AdamW, A's architecture: the remix A's lr 0.0021 and weight decay 0.1; the tied weight's head_lr starts "
         "at the same 0.0021"),
        ("A --tied_embed=false --logit_softcap=30 --head_lr=0.22 --embed_lr=0.6 --head_weight_decay=0 "
         "--embed_weight_decay=0", ["adam_lr", "embed_lr", "head_lr", "weight_decay"],
         "AdamW, M's architecture: the remix A's lr and weight decay for the blocks; the remix M's Adam lrs for "
         "the output layer (0.22) and embedding (0.6), which it does not decay"),
        ("M --tied_embed=true --logit_softcap=0 --head_lr=0.0021", ["muon_lr", "head_lr"],
         "Muon, A's architecture: the remix M's Muon lr 0.05; the tied weight starts at the remix A's AdamW lr "
         "0.0021 (the remix M's 0.22 diverged in the untuned 2x2)"),
        ("M --muon_weight_decay=0.05 --adam_weight_decay=0.001", ["muon_lr", "head_lr", "embed_lr",
                                                                   "muon_weight_decay", "adam_weight_decay"],
         "Muon, M's architecture: the remix M's lrs (Muon 0.05, output layer 0.22, embedding 0.6); weight decays "
         "from modded-nanogpt's optimization track, record #36 (Muon 0.05, Adam 0.001)"),
    ],
}


class TuneError(ValueError):
    """Bad input, refused before any run starts."""


def canonical(value: float) -> float:
    """Six significant digits: the same point reads the same in tune.json and on the command line."""
    return float(f"{value:.6g}")


@dataclass
class Search:
    """One run spec's coordinate descent."""

    spec: sweep.Spec
    fields: list[str]
    start: dict[str, float]
    unit_interval: set[str] = field(default_factory=set)  # fields searched on 1 - value

    def moved(self, name: str, value: float, factor: float) -> float:
        if name in self.unit_interval:
            return canonical(1 - (1 - value) * factor)
        return canonical(value * factor)


@dataclass
class Point:
    """One run: a search's values at one seed, and what came of it."""

    run: str
    values: dict[str, float]
    seed: int
    status: str = "pending"  # then "ok", "diverged" or "failed"
    final_val_loss: float | None = None
    log: str | None = None
    error: str | None = None
    tries: int = 0
    wall_s: float | None = None  # s, the run's process from start to end
    sharing: int | None = None  # the most runs on its GPU at once while it ran, itself included

    @property
    def key(self) -> str:
        return json.dumps([self.run, sorted(self.values.items()), self.seed])

    @property
    def loss(self) -> float:
        """What the search compares: a diverged or failed point is the worst."""
        return self.final_val_loss if self.status == "ok" else math.inf


def descend(search: Search, grid: Sequence[float], rounds: int, final_seeds: int
            ) -> Generator[list[Point], dict[str, Point], dict[str, Any]]:
    """The coordinate descent of one search: yields the points it needs next, receives them run (by key),
    returns the trace (per field, every evaluated (value, loss); the chosen values; the search's own loss there, if
    it ran them together; the final points). The first round moves one field at a time; later rounds move every
    field at once around the best so far."""
    best = dict(search.start)
    tried: dict[str, dict[float, float]] = {name: {} for name in search.fields}
    own: float | None = None
    for r in range(rounds):
        groups = [[name] for name in search.fields] if r == 0 else [list(search.fields)]
        for names in groups:
            losses = yield from perturb(search, best, names, grid if r == 0 else FINE_GRID)
            moved = [name for name in names if pick(losses[name], best[name]) != best[name]]
            for name in names:
                best[name] = pick(losses[name], best[name])
                tried[name].update(losses[name])
            # the new best was run only if at most one field moved: two fields' best values were never run together
            last = (moved or names)[0]
            own = losses[last][best[last]] if len(moved) <= 1 else None
    # new seeds: the search's own run at the winner was picked for its low loss, noise included (winner's curse)
    finals = [Point(search.spec.label, dict(best), seed) for seed in range(1, final_seeds + 1)]
    done = yield finals
    return {"best": best, "tried": tried, "search_loss": own, "finals": [done[p.key] for p in finals]}


def perturb(search: Search, best: dict[str, float], names: list[str], factors: Sequence[float]
            ) -> Generator[list[Point], dict[str, Point], dict[str, dict[float, float]]]:
    """Each named field over factors times its best value, the other fields at their best, all of them at once;
    a field whose lowest loss is at an edge of its values goes a grid step further out (up to MAX_EXTEND).
    Returns each field's losses by value."""
    losses: dict[str, dict[float, float]] = {name: {} for name in names}
    values = {name: sorted({search.moved(name, best[name], f) for f in factors} | {best[name]}) for name in names}
    for extension in range(MAX_EXTEND + 1):
        points = {name: [Point(search.spec.label, {**best, name: v}, 0) for v in vs] for name, vs in values.items()}
        done = yield list({p.key: p for field_points in points.values() for p in field_points}.values())
        for name, field_points in points.items():
            losses[name].update({p.values[name]: done[p.key].loss for p in field_points})
        further = {name: beyond(search, name, pick(losses[name], best[name]), losses[name], factors) for name in values}
        values = {name: vs for name, vs in further.items() if vs}
        if not values or extension == MAX_EXTEND:
            break
    return losses


def pick(losses: dict[float, float], current: float) -> float:
    """The value of the lowest loss; on a tie, the current value."""
    return min(losses, key=lambda v: (losses[v], v != current))


def beyond(search: Search, name: str, best: float, losses: dict[float, float], factors: Sequence[float]
           ) -> list[float]:
    """The next value past the edge of a round's values when the best is at that edge (an optimum not yet
    bracketed), else none: one grid step further out."""
    low, high = min(losses), max(losses)
    if best not in (low, high) or len(losses) < 2 or not math.isfinite(losses[best]):
        return []
    steps = {search.moved(name, best, f) for f in (min(factors), max(factors))}
    return sorted(v for v in steps if (v < low if best == low else v > high))


class State:
    """DIR/tune.json: the plan and every point run so far."""

    def __init__(self, out: Path, plan: dict[str, Any]):
        self.path, self.plan = out / STATE, plan
        self.points: dict[str, Point] = {}
        if self.path.exists():
            saved = json.loads(self.path.read_text(encoding="utf-8"))
            if saved.get("plan") != plan:
                raise TuneError(f"--out {out}: holds another tune ({self.path}); give another --out, or that tune's "
                                f"own command")
            for entry in saved["points"]:
                point = Point(**entry)
                self.points[point.key] = point

    def save(self) -> None:
        tmp = self.path.with_name(f".{STATE}.tmp")
        entries = [vars(p) for p in self.points.values()]
        tmp.write_text(json.dumps({"plan": self.plan, "points": entries}, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)


# Runs the points; calls finished(point) as each one ends, which returns the points to run next; returns False if
# interrupted. A point it did not start (a time limit) stays pending.
Runner = Callable[[list[Point], Callable[[Point], list[Point]]], bool]


class TimeLimit(Exception):
    """The runs still needed would not finish within the command's --time_limit."""


def tune(searches: list[Search], grid: Sequence[float], rounds: int, final_seeds: int, state: State, runner: Runner,
         report: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Every search moves on its own: as soon as the points it asked for are in, its next ones start beside the
    other searches' runs (a crash is tried once more); points already in the state are not run again. Returns
    each search's trace by run label."""
    searching = {s.spec.label: descend(s, grid, rounds, final_seeds) for s in searches}
    wanted: dict[str, list[Point]] = {}
    traces: dict[str, dict[str, Any]] = {}
    in_flight: set[str] = set()

    def to_run(point: Point) -> bool:
        saved = state.points.get(point.key)
        return saved is None or (saved.status == "failed" and saved.tries < 2)

    def advance(label: str, points: list[Point] | None) -> list[Point]:
        """Feeds the search what it asked for until it asks for points not run yet; returns them."""
        try:
            asked = next(searching[label]) if points is None else searching[label].send(
                {p.key: state.points[p.key] for p in points})
            while not any(to_run(p) for p in asked):
                asked = searching[label].send({p.key: state.points[p.key] for p in asked})
        except StopIteration as end:
            traces[label] = end.value
            return []
        wanted[label] = asked
        todo = [state.points.get(p.key, p) for p in asked if to_run(p)]
        in_flight.update(p.key for p in todo)
        return todo

    def finished(point: Point) -> list[Point]:
        in_flight.discard(point.key)
        point.tries += 1
        state.points[point.key] = point
        state.save()
        if point.status == "failed" and point.tries < 2:
            report(f"trying a crashed run once more: {point.run} {point.values} seed={point.seed}")
            in_flight.add(point.key)
            return [point]
        if any(p.key in in_flight or to_run(p) for p in wanted[point.run]):
            return []
        return advance(point.run, wanted[point.run])

    first = [p for label in searching for p in advance(label, None)]
    if first and not runner(first, finished):
        state.save()
        raise KeyboardInterrupt
    if len(traces) < len(searches):
        raise TimeLimit(f"{sum(to_run(p) for points in wanted.values() for p in points)} run(s) still to do")
    return traces


def point_status(log_path: Path | None, exit_code: int | None) -> tuple[str, float | None, str | None]:
    """A finished run's status from its log: ok, diverged (NaN stop, or a final loss above its first training
    loss) or failed (a crash: no complete log)."""
    if log_path is None or not log_path.exists():
        return "failed", None, f"no log (exit {exit_code})"
    try:
        run = parse_log(log_path, allow_incomplete=True)
    except LogError as e:
        return "failed", None, str(e)
    final = run.val[-1][1] if run.val else None
    if run.stopped:
        return "diverged", final, run.stopped
    if not run.complete or final is None:
        return "failed", final, f"unfinished log (exit {exit_code})"
    first = next((loss for _, loss in run.train_losses if math.isfinite(loss)), math.inf)
    if not math.isfinite(final) or final > first:
        return "diverged", final, f"final val loss {final:.4f} above the first training loss {first:.4f}"
    return "ok", final, None


def sweep_runner(searches: list[Search], common: list[str], state: State, devices: list[str | None],
                 jobs_per_gpu: int, deadline: float | None = None) -> Runner:
    """Points run as sweep.py runs its jobs: one process per run on its own GPU (or the CPU). With a deadline
    (time.monotonic()), a run starts only if expected_s says it would end by then beside the runs on its GPU (the
    runs in flight there, slowed by it, would end no later than a whole run at that sharing)."""
    specs, out = {s.spec.label: s.spec for s in searches}, state.path.parent
    points: dict[int, Point] = {}

    def job_for(point: Point) -> sweep.Job:
        spec = specs[point.run]
        overrides = [f"--{k}={v}" for k, v in sorted(point.values.items())]
        own = [a for a in spec.args if a.split("=")[0][2:] not in point.values]
        name = f"{sweep.slugify([Path(spec.script).stem, *overrides])[:90]}_{zlib.crc32(point.key.encode()):08x}"
        shutil.rmtree(out / sweep.STAGING / name, ignore_errors=True)  # what an interrupted try left
        argv = [sys.executable, spec.script, *common, *own, *overrides, f"--seed={point.seed}",
                f"--log_dir={out / sweep.STAGING / name}"]
        points[len(points)] = point
        return sweep.Job(index=len(points) - 1, spec=spec, seed=point.seed, name=name, argv=argv)

    def run(first: list[Point], finished: Callable[[Point], list[Point]]) -> bool:
        def then(job: sweep.Job) -> list[sweep.Job]:
            point = points[job.index]
            point.status, point.final_val_loss, point.error = point_status(job.log, job.exit_code)
            point.log = os.path.relpath(job.log, out) if job.log else None
            point.wall_s = None if job.wall_s is None else round(job.wall_s, 1)
            point.sharing = job.sharing
            return [job_for(p) for p in finished(point)]

        def fits(job: sweep.Job, sharing: int) -> bool:
            expected = expected_s(state.points.values(), points[job.index].run, sharing)
            return deadline is None or expected is None or time.monotonic() + expected <= deadline

        meta = {"tune": str(out / STATE), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        jobs = [job_for(p) for p in first]
        return sweep.Sweep(jobs, devices, jobs_per_gpu, out, meta, lambda line: print(line, flush=True),
                           manifest="tune_last_command.json").run(then, fits)

    return run


def expected_s(points: Iterable[Point], run: str, sharing: int) -> float | None:
    """How long a run of this configuration would take with `sharing` runs on its GPU, from its finished runs: the
    longest of those that shared their GPU with the fewest runs at or above `sharing`; past the most seen, the
    longest of those scaled in proportion (an over-estimate: the start-up does not scale). Runs recorded without
    their sharing count only when none has it: then the longest of them. None before any run has finished."""
    took = [(p.sharing, p.wall_s) for p in points if p.run == run and p.status == "ok" and p.wall_s]
    known = [(n, s) for n, s in took if n]
    if not known:
        return max((s for _, s in took), default=None)
    at_or_above = [n for n, _ in known if n >= sharing]
    nearest = min(at_or_above) if at_or_above else max(n for n, _ in known)
    longest = max(s for n, s in known if n == nearest)
    return longest if at_or_above else longest * sharing / nearest


def nothing_to_run(points: list[Point], finished: Callable[[Point], list[Point]]) -> bool:
    """--report's runner: a point not run yet means the tune is not finished."""
    raise TuneError(f"{len(points)} point(s) not run yet")


# -----------------------------------------------------------------------------
# The report


def interval(losses: Sequence[float]) -> tuple[float, float, float, float]:
    """Mean, sample standard deviation and 95% t interval of the losses (nan where undefined)."""
    a = np.asarray(losses, dtype=float)
    if len(a) < 2:
        return float(a.mean()) if len(a) else math.nan, math.nan, math.nan, math.nan
    half = float(scipy_stats.t.ppf(0.975, len(a) - 1)) * a.std(ddof=1) / math.sqrt(len(a))
    return float(a.mean()), float(a.std(ddof=1)), float(a.mean()) - half, float(a.mean()) + half


def format_report(search: Search, trace: dict[str, Any]) -> str:
    finals = [p.final_val_loss for p in trace["finals"] if p.status == "ok"]
    mean, spread, lo, hi = interval(finals)
    lines = [f"run: {search.spec.label}", "| field | start | chosen | nearest neighbours (value: final val loss) | "
             "margin | within the seeds' spread |", "|---|---|---|---|---|---|"]
    for name in search.fields:
        tried, chosen = trace["tried"][name], trace["best"][name]
        values = sorted(tried)
        i = values.index(chosen)
        neighbours = [values[j] for j in (i - 1, i + 1) if 0 <= j < len(values)]
        margin = min((tried[v] - tried[chosen] for v in neighbours), default=math.nan)
        shown = ", ".join(f"{v:g}: {tried[v]:.4f}" for v in neighbours)
        noisy = "yes" if margin <= spread else ("no" if math.isfinite(spread) else "-")
        lines.append(f"| {name} | {search.start[name]:g} | {chosen:g} ({tried[chosen]:.4f}) | {shown} | "
                     f"{margin:.4f} | {noisy} |")
    for name in search.fields:
        tried, chosen = trace["tried"][name], trace["best"][name]
        if len(tried) > 1 and chosen in (min(tried), max(tried)):
            side = "smallest" if chosen == min(tried) else "largest"
            lines.append(f"edge: {name} chose the {side} value tried, {chosen:g}: the optimum may lie beyond it")
    seeds = f"seeds 1-{len(trace['finals'])}" if len(trace["finals"]) > 1 else "seed 1"
    lines.append(f"final {seeds}: {len(finals)} ok, mean {mean:.4f}, 95% CI {lo:.4f} to "
                 f"{hi:.4f}, seed-to-seed std {spread:.4f}")
    own = trace.get("search_loss")
    lines.append("the search's own run of these values (seed 0, left out of the mean: picked for being low): " +
                 (f"{own:.4f}" if own is not None else "none (fields that moved together were never run together)"))
    return "\n".join(lines)


def format_progress(search: Search, state: State) -> str:
    """An unfinished tune: the points of this run so far, lowest final loss first."""
    points = sorted((p for p in state.points.values() if p.run == search.spec.label), key=lambda p: p.loss)
    lines = [f"run: {search.spec.label} (unfinished: {len(points)} point(s) so far)",
             "| " + " | ".join(search.fields) + " | seed | status | final val loss |",
             "|" + "---|" * (len(search.fields) + 3)]
    for p in points:
        loss = f"{p.final_val_loss:.4f}" if p.final_val_loss is not None else "-"
        lines.append("| " + " | ".join(f"{p.values[name]:g}" for name in search.fields) +
                     f" | {p.seed} | {p.status} | {loss} |")
    return "\n".join(lines)


def saved_plan(out: Path) -> dict[str, Any]:
    """The plan that DIR/tune.json was made with: its runs, fields, grid, rounds, final seeds and common arguments."""
    path = out / STATE
    if not path.exists():
        raise TuneError(f"--out {out}: no tune there ({path} not found)")
    return json.loads(path.read_text(encoding="utf-8"))["plan"]


def finished_traces(out: Path) -> list[tuple[Search, dict[str, Any]]]:
    """A finished tune's searches and traces, replayed from DIR/tune.json alone (what --report shows): TuneError if
    a point the tune needs is not there yet."""
    saved = saved_plan(out)
    searches = make_searches([(spec, list(fields)) for spec, fields in saved["runs"]], saved["common_args"])
    traces = tune(searches, saved["grid"], saved["rounds"], saved["final_seeds"], State(out, saved), nothing_to_run,
                  report=lambda _: None)
    return [(search, traces[search.spec.label]) for search in searches]


def draw(search: Search, trace: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4 * len(search.fields), 3.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(search.fields), squeeze=False)[0]
    for ax, name in zip(axes, search.fields):
        tried = trace["tried"][name]
        finite = sorted((v, loss) for v, loss in tried.items() if math.isfinite(loss))
        ax.plot([v for v, _ in finite], [loss for _, loss in finite], "o-", color="tab:blue")
        worst = [v for v, loss in tried.items() if not math.isfinite(loss)]
        if finite and worst:
            ax.plot(worst, [max(loss for _, loss in finite)] * len(worst), "x", color="tab:red", label="diverged")
            ax.legend(fontsize=8)
        chosen = trace["best"][name]
        ax.axvline(chosen, color="tab:orange", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel(f"{name} (chosen {chosen:g})")
        ax.set_ylabel("final validation loss")
    fig.suptitle(search.spec.label, fontsize=10)
    fig.savefig(path, format="png")


# -----------------------------------------------------------------------------
# The command line


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[tuple[str, list[str]]], list[str]]:
    argv = list(argv)
    common = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="tune.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder of tune.json, the logs and the figures")
    parser.add_argument("--run", action="append", default=[], metavar="SPEC", help="a configuration, as sweep.py's")
    parser.add_argument("--search", action="append", default=[], metavar="FIELD",
                        help="a field to tune, of the --run before it (of every run, before any --run)")
    parser.add_argument("--study", choices=sorted(STUDY), help="a study's runs and fields (see STUDY)")
    parser.add_argument("--grid", default="0.5,1,2", help="first-round factors of a field's value (default 0.5,1,2)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"rounds over the fields (default {ROUNDS})")
    parser.add_argument("--final_seeds", type=int, default=FINAL_SEEDS,
                        help=f"new seeds of each winner, 1 .. K (default {FINAL_SEEDS})")
    devices = parser.add_mutually_exclusive_group()
    devices.add_argument("--gpus", nargs="+", metavar="ID", help="GPUs to run on (default: all; else the CPU)")
    devices.add_argument("--cpu", action="store_true", help="run on the CPU")
    parser.add_argument("--jobs_per_gpu", type=int, default=1, metavar="J", help="runs at a time per GPU (default 1)")
    parser.add_argument("--time_limit", type=float, metavar="S",
                        help="start no run that would end more than S seconds after the command's start, judged by "
                             "its configuration's finished runs with as many runs on their GPU (runs in flight "
                             "finish); exit 3")
    parser.add_argument("--dry_run", action="store_true", help="print the first batch's commands and stop")
    parser.add_argument("--report", action="store_true", help="the tables and figures of DIR's tune.json; run nothing")
    args = parser.parse_args(own)
    runs: list[tuple[str, list[str]]] = []
    everywhere: list[str] = []
    order = [(m.group(1), a) for a in own for m in [re.match(r"--(run|search)(?:=(.*))?$", a)] if m]
    values = {"run": iter(args.run), "search": iter(args.search)}
    for kind, _ in order:
        value = next(values[kind])
        if kind == "run":
            runs.append((value, []))
        elif runs:
            runs[-1][1].append(value)
        else:
            everywhere.append(value)
    if args.study:
        if runs or everywhere:
            raise TuneError("--study brings its own runs and fields: give no --run or --search with it")
        runs = [(spec, list(fields)) for spec, fields, _ in STUDY[args.study]]
    runs = [(spec, everywhere + fields) for spec, fields in runs]
    return args, runs, common


def make_searches(runs: list[tuple[str, list[str]]], common: list[str]) -> list[Search]:
    """Each run's search, its fields checked against its script's configuration and its start values read."""
    if not runs:
        raise TuneError("no --run given: name at least one configuration (or a --study)")
    specs = sweep.make_specs([spec for spec, _ in runs])
    searches = []
    for spec, (_, fields) in zip(specs, runs):
        if not fields:
            raise TuneError(f"--run {spec.label!r}: no --search field")
        if len(set(fields)) != len(fields):
            raise TuneError(f"--run {spec.label!r}: a field is searched twice")
        module = sweep._script_module(spec.script)
        try:
            cfg = module.parse_config([*common, *spec.args])
        except module.ConfigError as e:
            raise TuneError(f"--run {spec.label!r}: {e}".replace("\n", "; ")) from None
        start = {}
        for name in fields:
            value = getattr(cfg, name, None)
            if name not in module.LIMITS or isinstance(value, bool):
                raise TuneError(f"--run {spec.label!r}: --search {name} is not a number field of {spec.script}")
            if not value > 0:
                raise TuneError(f"--run {spec.label!r}: {name} starts at {value!r}; a multiplicative grid needs a "
                                f"positive start (give --{name}=VALUE in the run)")
            start[name] = canonical(float(value))
        unit = {name for name in fields if module.LIMITS[name] == "[0, 1)"}
        searches.append(Search(spec, fields, start, unit))
    return searches


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args, runs, common = parse(argv)
        if args.report and not runs:  # the folder's own plan: the command needs only --out
            saved = saved_plan(args.out)
            runs, common = [(spec, list(fields)) for spec, fields in saved["runs"]], saved["common_args"]
            args.grid, args.rounds, args.final_seeds = ",".join(map(str, saved["grid"])), saved["rounds"], \
                saved["final_seeds"]
        grid = [float(f) for f in args.grid.split(",")]
        if not grid or min(grid) <= 0 or args.rounds < 1 or args.final_seeds < 1 or args.jobs_per_gpu < 1:
            raise TuneError("--grid takes positive factors; --rounds, --final_seeds and --jobs_per_gpu at least 1")
        if args.time_limit is not None and not args.time_limit > 0:
            raise TuneError(f"--time_limit {args.time_limit:g}: give a positive number of seconds")
        sweep.check_field_args(common, "the arguments after --")
        searches = make_searches(runs, common)
        out: Path = args.out
        plan = {"runs": [[s.spec.label, s.fields] for s in searches], "grid": grid, "rounds": args.rounds,
                "final_seeds": args.final_seeds, "common_args": common}
        if not out.exists() and args.report:
            raise TuneError(f"--out {out}: no tune there")
        state = State(out, plan)
    except (TuneError, sweep.SweepError, ValueError) as e:
        print(f"tune.py: error: {e}", file=sys.stderr)
        return 2
    if args.gpus is not None and not sweep.listed_gpus() and not os.environ.get("CUDA_VISIBLE_DEVICES", "").strip():
        print("tune.py: error: --gpus: this machine has no GPU; run on the CPU with --cpu", file=sys.stderr)
        return 2
    gpus = sweep.detect_gpus() if args.gpus is None and not args.cpu else (args.gpus or [])
    devices: list[str | None] = list(gpus) if gpus else [None]
    if args.dry_run:
        for search in searches:
            first = next(descend(search, grid, args.rounds, args.final_seeds))
            for point in first:
                overrides = " ".join(f"--{k}={v}" for k, v in sorted(point.values.items()))
                print(f"{search.spec.label} | {overrides} --seed={point.seed}")
        print(f"# then {len(searches)} search(es) of {args.rounds} round(s), {args.final_seeds} final seeds each, on "
              f"{', '.join(sweep.device_label(d) for d in devices)}")
        return 0
    if args.report:
        runner: Runner = nothing_to_run
    else:
        out.mkdir(parents=True, exist_ok=True)
        deadline = None if args.time_limit is None else time.monotonic() + args.time_limit
        runner = sweep_runner(searches, common, state, devices, args.jobs_per_gpu, deadline)
    handlers = {signal.SIGTERM: signal.signal(signal.SIGTERM, sweep._raise_interrupt),
                signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler)}
    try:
        traces = tune(searches, grid, args.rounds, args.final_seeds, state, runner)
    except TuneError as e:
        for search in searches:
            print(format_progress(search, state) + "\n")
        print(f"tune.py: {e}: the tune is not finished; its command without --report runs what is missing",
              file=sys.stderr)
        return 1
    except TimeLimit as e:
        print(f"tune.py: --time_limit {args.time_limit:g} s reached, {e}; the same command continues from "
              f"{state.path}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"tune.py: interrupted; the same command continues from {state.path}", file=sys.stderr)
        return 130
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    for search in searches:
        print(format_report(search, traces[search.spec.label]) + "\n")
        figure = out / f"tune_{search.spec.slug}.png"
        draw(search, traces[search.spec.label], figure)
        print(f"figure: {figure}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Statistics of training logs: a per-group table, or a comparison of two groups of runs.

Usage:

    python stats.py LOG [LOG ...]
    python stats.py logs/*.txt --target 3.28
    python stats.py logs/M_*.txt --label baseline --against logs/M2_*.txt --label idea --seed 1

Each run counts once (runlog.load_runs: a file given twice, a copy of a log and a run with its continuations
are one run). Without --against, runs are grouped by configuration: every field but the seed and where outputs
go ("A", "M", variants such as "M (tied_embed=True)" or, for groups of one baseline that differ, the fields in
which they differ, "M (muon_lr=0.1)"), modded-nanogpt logs by their code (--label names those). For each group
the table shows: number of
runs; the step counts they were run for; how many finished (ended without a NaN stop and have
a final val loss, the runs the loss statistics use); mean and sample std (ddof=1) of the final
val loss; the p-value of a one-sided one-sample t-test (scipy.stats.ttest_1samp,
alternative="less") that the mean final loss is below the target; mean total training time of
the finished runs; how many runs reached the target; and their mean time to reach it,
interpolated between validation points.

With --against, the logs before it are the base group and the logs after it the new group (a --label after
either names that group); each uses its complete runs only (ended without a NaN stop, finite final val loss).
A run on both sides is refused; groups that differ in steps, batch or validation get a warning that says how.
Printed, as new - base:
  - final val loss: difference of means, 95% Welch t interval (Welch-Satterthwaite degrees of
    freedom) and the two-sided p-value of scipy.stats.ttest_ind(equal_var=False);
  - steps and time to the target (interpolated between validation points) when every run
    reaches it: difference of means with a 95% percentile bootstrap interval (10,000
    resamples of each group with replacement, seeded by --seed);
  - total training time: difference of means with a 95% Welch interval (the speedrun's measure when
    every run stops at a fixed step count);
  - the loss slope d(loss)/d(step) of the base runs near the target (least squares through
    the last 4 validation points up to the first one at or below the target, or the last 4
    where a run does not reach it, one intercept per run) and the loss difference converted to
    steps at that slope, with the conversion's assumptions;
  - a verdict line, e.g. "new is lower than base by 0.0123 (95% CI 0.0051 to 0.0195), p = 0.004".
Intervals and tests need at least 2 runs per side; with fewer only the difference is printed.

Unfinished logs (the run was killed or is still running) and files that are not training logs
are reported in one line each on stderr and left out; --strict makes either an error (exit 1).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from runlog import (
    TARGET_LOSS,
    LogError,
    Run,
    add_log_options,
    check_log_options,
    final_val_loss,
    group_sort_key,
    load_runs,
    steps_to_target,
    time_to_target,
    total_train_time_ms,
)

CONFIDENCE = 0.95
SIGNIFICANCE = 1 - CONFIDENCE
BOOTSTRAP_RESAMPLES = 10_000
SLOPE_POINTS = 4
NEEDS_TWO = "an interval needs at least 2 runs per side"


def summarize(runs: Sequence[Run], target: float = TARGET_LOSS) -> list[dict[str, Any]]:
    """One row per group, in the order A, A variants, M, M variants, then foreign groups.

    Keys: group, runs, steps (sorted distinct step counts), finished, loss_mean, loss_std,
    p_value, train_time_ms, reached, time_to_target_ms. Missing values are None
    (loss_std and p_value need at least two finished runs).
    """
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)

    rows = []
    for group in sorted(groups, key=group_sort_key):
        members = groups[group]
        finished = complete_runs(members)
        losses = np.array([final_val_loss(r) for r in finished], dtype=float)
        times = [total_train_time_ms(r) for r in finished]
        reach_times = [t for t in (time_to_target(r, target) for r in members) if t is not None]
        rows.append({
            "group": group,
            "runs": len(members),
            "steps": sorted({r.num_steps for r in members if r.num_steps is not None}),
            "finished": len(finished),
            "loss_mean": float(losses.mean()) if len(losses) else None,
            "loss_std": float(losses.std(ddof=1)) if len(losses) >= 2 else None,
            "p_value": (
                float(scipy_stats.ttest_1samp(losses, popmean=target, alternative="less").pvalue)
                if len(losses) >= 2 else None
            ),
            "train_time_ms": float(np.mean(times)) if times else None,
            "reached": len(reach_times),
            "time_to_target_ms": float(np.mean(reach_times)) if reach_times else None,
        })
    return rows


def complete_runs(runs: Sequence[Run]) -> list[Run]:
    """The runs that ended without a stop and have a finite final val loss."""
    return [r for r in runs if r.complete and _finite(final_val_loss(r))]


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: Sequence[dict[str, Any]], target: float = TARGET_LOSS) -> str:
    """Plain-text table of summarize() rows, with a short legend underneath."""
    header = ["group", "runs", "steps", "finished", "final val loss", "std", f"p(mean<{target:g})",
              "train time [s]", f"reached {target:g}", f"time to {target:g} [s]"]
    table = [header]
    for row in rows:
        table.append([
            row["group"],
            str(row["runs"]),
            ",".join(str(s) for s in row["steps"]) or "-",
            str(row["finished"]),
            _fmt(row["loss_mean"], ".4f"),
            _fmt(row["loss_std"], ".4f"),
            _fmt(row["p_value"], ".3g"),
            _fmt(None if row["train_time_ms"] is None else row["train_time_ms"] / 1000, ".1f"),
            f"{row['reached']}/{row['runs']}",
            _fmt(None if row["time_to_target_ms"] is None else row["time_to_target_ms"] / 1000, ".1f"),
        ])
    lines = _align(table)
    lines += [
        "",
        "final val loss: mean (and sample std, ddof=1) over finished runs (ended without a NaN stop);",
        f"p: one-sided one-sample t-test that the mean final val loss is below {target:g} (needs >= 2 runs);",
        f"time to {target:g}: mean over the runs that reached it, interpolated between validation points.",
    ]
    return "\n".join(lines)


def _align(table: list[list[str]], text_columns: tuple[int, ...] = (0,)) -> list[str]:
    """Numbers right-aligned, the `text_columns` left-aligned; a dashed rule under the header."""
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = []
    for k, r in enumerate(table):
        cells = [c.ljust(w) if i in text_columns else c.rjust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


# ---------------------------------------------------------------- two-group comparison


@dataclass
class Difference:
    """new_mean - base_mean with an interval; lo/hi/p are None where they cannot be computed
    (`note` says why). df: Welch-Satterthwaite degrees of freedom (Welch intervals only)."""

    base_mean: float
    new_mean: float
    diff: float
    lo: float | None = None
    hi: float | None = None
    p: float | None = None
    df: float | None = None
    note: str = ""


def welch_difference(base: Sequence[float], new: Sequence[float], confidence: float = CONFIDENCE) -> Difference:
    """Difference of means new - base, its Welch t interval and two-sided Welch t-test p-value."""
    a, b = np.asarray(base, dtype=float), np.asarray(new, dtype=float)
    result = Difference(float(a.mean()), float(b.mean()), float(b.mean() - a.mean()))
    if len(a) < 2 or len(b) < 2:
        result.note = NEEDS_TWO
        return result
    var_a, var_b = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(var_a + var_b)
    if se == 0:
        result.note = "no spread within either group, so no interval or test"
        return result
    result.df = float((var_a + var_b) ** 2 / (var_a**2 / (len(a) - 1) + var_b**2 / (len(b) - 1)))
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, result.df)) * se
    result.lo, result.hi = result.diff - half, result.diff + half
    result.p = float(scipy_stats.ttest_ind(b, a, equal_var=False).pvalue)
    return result


def bootstrap_difference(
    base: Sequence[float],
    new: Sequence[float],
    *,
    seed: int,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
) -> Difference:
    """Difference of means new - base with a percentile bootstrap interval: each group is
    resampled with replacement `resamples` times from a generator seeded with `seed`."""
    a, b = np.asarray(base, dtype=float), np.asarray(new, dtype=float)
    result = Difference(float(a.mean()), float(b.mean()), float(b.mean() - a.mean()))
    if len(a) < 2 or len(b) < 2:
        result.note = NEEDS_TWO
        return result
    rng = np.random.default_rng(seed)
    means_a = a[rng.integers(0, len(a), size=(resamples, len(a)))].mean(axis=1)
    means_b = b[rng.integers(0, len(b), size=(resamples, len(b)))].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(means_b - means_a, [tail, 100 - tail])
    result.lo, result.hi = float(lo), float(hi)
    return result


@dataclass
class Slope:
    """d(val loss)/d(step) of a group near the target, from `points` validation points per run."""

    slope: float
    runs: int
    reached: int
    points: int


def loss_slope(runs: Sequence[Run], target: float = TARGET_LOSS, points: int = SLOPE_POINTS) -> Slope | None:
    """Least-squares slope d(loss)/d(step) with one intercept per run (so the runs' offsets do
    not tilt it), through each run's last `points` finite validation points up to and including
    the first one at or below `target`, or its last `points` where it never gets there.
    None if no run has two such points."""
    sxy = sxx = 0.0
    used = reached = 0
    for run in runs:
        curve = [(float(s), loss) for s, loss, _ in run.val if math.isfinite(loss)]
        crossing = next((i for i, (_, loss) in enumerate(curve) if loss <= target), None)
        if crossing is None:
            window = curve[-points:]
        else:
            window = curve[max(0, crossing - points + 1):crossing + 1]
            if len(window) < 2:
                window = curve[:points]
        if len(window) < 2:
            continue
        steps, losses = np.array([s for s, _ in window]), np.array([loss for _, loss in window])
        steps_c = steps - steps.mean()
        sxy += float(steps_c @ (losses - losses.mean()))
        sxx += float(steps_c @ steps_c)
        used += 1
        reached += crossing is not None
    if used == 0 or sxx == 0:
        return None
    return Slope(sxy / sxx, used, reached, points)


def steps_equivalent(loss_difference: float, slope: float) -> float:
    """Steps along a straight loss curve of `slope` per step that change the loss by `loss_difference`."""
    return loss_difference / slope


def group_name(runs: Sequence[Run]) -> str:
    """The runs' common group label, or their file names when they come from several groups."""
    labels = {r.group for r in runs}
    return labels.pop() if len(labels) == 1 else "[" + ", ".join(r.path.name for r in runs) + "]"


def verdict(base_name: str, new_name: str, loss: Difference, significance: float = SIGNIFICANCE) -> str:
    """One sentence on the final val loss difference new - base, e.g.
    "B is lower than A by 0.0123 (95% CI 0.0051 to 0.0195), p = 0.004"."""
    if loss.p is None or loss.lo is None or loss.hi is None:
        return f"{new_name} - {base_name} = {loss.diff:.4f} ({loss.note})"
    level = f"{CONFIDENCE:.0%} CI"
    p = f"p = {loss.p:.2g}"
    if loss.p < significance and loss.diff < 0:
        return (f"{new_name} is lower than {base_name} by {-loss.diff:.4f} "
                f"({level} {-loss.hi:.4f} to {-loss.lo:.4f}), {p}")
    if loss.p < significance and loss.diff > 0:
        return (f"{new_name} is higher than {base_name} by {loss.diff:.4f} "
                f"({level} {loss.lo:.4f} to {loss.hi:.4f}), {p}")
    return (f"no significant difference: {new_name} - {base_name} = {loss.diff:.4f} "
            f"({level} {loss.lo:.4f} to {loss.hi:.4f}), {p}")


@dataclass
class Comparison:
    """Everything compare() measures; format_comparison() prints it."""

    base_name: str
    new_name: str
    base_runs: list[Run]
    new_runs: list[Run]
    target: float
    seed: int
    loss: Difference
    steps: Difference | None
    time_ms: Difference | None
    steps_reached: tuple[int, int]
    time_reached: tuple[int, int]
    slope: Slope | None
    train_ms: Difference | None = None
    mismatches: list[str] | None = None


# what makes two groups' final losses and times measure different things
COMPARED_FIELDS = {"num_iterations": "steps", "batch_tokens": "tokens per step", "val_tokens": "validation tokens",
                   "val_files": "validation files"}


def mismatches(base_runs: Sequence[Run], new_runs: Sequence[Run]) -> list[str]:
    """How the two groups' runs differ in length, batch or validation, one line each."""
    lines = []
    for field_name, what in COMPARED_FIELDS.items():
        values = [sorted({str(r.config.get(field_name, r.num_steps if field_name == "num_iterations" else "?"))
                          for r in runs}) for runs in (base_runs, new_runs)]
        if values[0] != values[1]:
            lines.append(f"warning: the groups differ in {what} ({field_name}: base {', '.join(values[0])}; "
                         f"new {', '.join(values[1])}); their losses and times are not like for like")
    return lines


def compare(base_runs: Sequence[Run], new_runs: Sequence[Run], target: float = TARGET_LOSS,
            seed: int = 0, names: tuple[str | None, str | None] = (None, None)) -> Comparison:
    """Compare two groups of complete runs (see the module docstring); `names` overrides the groups' own.
    Raises ValueError if a group is empty or a run is in both."""
    if not base_runs or not new_runs:
        raise ValueError("each group needs at least one complete run")
    if shared := {r.run_id for r in base_runs} & {r.run_id for r in new_runs}:
        raise ValueError(f"run {sorted(shared)[0]} is on both sides of --against: a group cannot be compared "
                         "with itself")
    base_name, new_name = names[0] or group_name(base_runs), names[1] or group_name(new_runs)
    if base_name == new_name:
        base_name, new_name = f"base {base_name}", f"new {new_name}"
    loss = welch_difference([final_val_loss(r) for r in base_runs], [final_val_loss(r) for r in new_runs])

    def to_target(measure) -> tuple[Difference | None, tuple[int, int]]:
        base = [measure(r, target) for r in base_runs]
        new = [measure(r, target) for r in new_runs]
        reached = (sum(v is not None for v in base), sum(v is not None for v in new))
        if reached != (len(base), len(new)):
            return None, reached
        return bootstrap_difference(base, new, seed=seed), reached

    steps, steps_reached = to_target(steps_to_target)
    time_ms, time_reached = to_target(time_to_target)
    train_ms = welch_difference([total_train_time_ms(r) for r in base_runs], [total_train_time_ms(r) for r in new_runs])
    return Comparison(base_name, new_name, list(base_runs), list(new_runs), target, seed, loss, steps, time_ms,
                      steps_reached, time_reached, loss_slope(base_runs, target), train_ms,
                      mismatches(base_runs, new_runs))


def _interval(d: Difference | None, spec: str, scale: float = 1.0) -> str:
    if d is None or d.lo is None or d.hi is None:
        return "-"
    return f"{d.lo / scale:{spec}} to {d.hi / scale:{spec}}"


def format_comparison(c: Comparison) -> str:
    """The comparison as a small table, the slope conversion and the verdict line."""
    n_base, n_new = len(c.base_runs), len(c.new_runs)
    lines = [
        f"base: {c.base_name} ({n_base} complete run{'s' if n_base != 1 else ''})",
        f"new:  {c.new_name} ({n_new} complete run{'s' if n_new != 1 else ''})",
        *(c.mismatches or []),
        "",
    ]
    table = [["", "base mean", "new mean", "new - base", f"{CONFIDENCE:.0%} CI", "method"]]
    loss_method = (f"Welch t (df {c.loss.df:.1f}), p = {c.loss.p:.2g}" if c.loss.p is not None
                   else c.loss.note)
    table.append(["final val loss", f"{c.loss.base_mean:.4f}", f"{c.loss.new_mean:.4f}", f"{c.loss.diff:+.4f}",
                  _interval(c.loss, "+.4f"), loss_method])
    bootstrap = f"bootstrap ({BOOTSTRAP_RESAMPLES:,} resamples, seed {c.seed})"
    for label, d, reached, spec, scale in (
        (f"steps to {c.target:g}", c.steps, c.steps_reached, ".1f", 1.0),
        (f"time to {c.target:g} [s]", c.time_ms, c.time_reached, ".2f", 1000.0),
    ):
        if d is None:
            table.append([label, "-", "-", "-", "-",
                          f"not reached by all runs (base {reached[0]}/{n_base}, new {reached[1]}/{n_new})"])
        else:
            table.append([label, f"{d.base_mean / scale:{spec}}", f"{d.new_mean / scale:{spec}}",
                          f"{d.diff / scale:+{spec}}", _interval(d, "+" + spec, scale),
                          d.note or bootstrap])
    if c.train_ms is not None:
        d = c.train_ms
        method = f"Welch t (df {d.df:.1f}), p = {d.p:.2g}" if d.p is not None else d.note
        table.append(["train time [s]", f"{d.base_mean / 1000:.2f}", f"{d.new_mean / 1000:.2f}",
                      f"{d.diff / 1000:+.2f}", _interval(d, "+.2f", 1000.0), method])
    lines += _align(table, text_columns=(0, len(table[0]) - 1))
    lines.append("")
    lines += _slope_lines(c)
    lines += ["", verdict(c.base_name, c.new_name, c.loss)]
    return "\n".join(lines)


def _slope_lines(c: Comparison) -> list[str]:
    """The loss difference in steps of base's curve, with the conversion's assumptions."""
    s = c.slope
    if s is None:
        return ["loss difference in steps: no slope (no base run has two finite validation points)"]
    where = (f"the last {s.points} validation points up to the first at or below {c.target:g}" if s.reached == s.runs
             else f"the last {s.points} validation points up to the first at or below {c.target:g}, or the "
                  f"last {s.points} of a run that does not reach it ({s.reached} of {s.runs} do)")
    lines = [f"base loss slope near {c.target:g}: {s.slope:.3g} per step (least squares through {where}, "
             f"in each of {s.runs} base run{'s' if s.runs != 1 else ''}, one intercept per run)"]
    if s.slope >= 0:
        lines.append("loss difference in steps: not converted (base's loss does not fall there)")
        return lines
    steps = steps_equivalent(c.loss.diff, s.slope)
    interval = ""
    if c.loss.lo is not None and c.loss.hi is not None:
        ends = sorted((steps_equivalent(c.loss.lo, s.slope), steps_equivalent(c.loss.hi, s.slope)))
        interval = f" ({CONFIDENCE:.0%} CI {ends[0]:+.1f} to {ends[1]:+.1f})"
    if steps >= 0:
        meaning = f"base would need about {steps:.1f} more steps to reach new's final loss (new is ahead)"
    else:
        meaning = f"new's final loss is what base had about {-steps:.1f} steps before its end (new is behind)"
    base_steps = sorted({r.num_steps for r in c.base_runs if r.num_steps is not None})
    new_steps = sorted({r.num_steps for r in c.new_runs if r.num_steps is not None})
    lines += [
        f"loss difference in steps: {c.loss.diff:+.4f} / {s.slope:.3g} per step = {steps:+.1f} steps{interval}: "
        f"{meaning}",
        "  assumes: base's curve is a straight line of this slope around its final loss; both groups run "
        f"the same number of steps (base {_steps(base_steps)}, new {_steps(new_steps)}); the interval leaves "
        "out the slope's own uncertainty",
    ]
    return lines


def _steps(counts: list[int]) -> str:
    return ",".join(str(n) for n in counts) or "?"


def _complete_or_report(runs: list[Run], side: str) -> list[Run]:
    kept = complete_runs(runs)
    kept_ids = {id(r) for r in kept}
    for run in runs:
        if id(run) not in kept_ids:
            why = f"stopped ({run.stopped})" if run.stopped else "no finite final val loss"
            print(f"left out {run.path} from the {side} group: {why}", file=sys.stderr)
    return kept


class GroupLabel(argparse.Action):
    """--label names the group it follows: the base logs', or after --against the new ones'."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, "new_label" if namespace.against is not None else "label", values)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Per-group statistics of training logs, or (with --against) a comparison of two groups.",
        epilog="Unfinished logs and files that are not training logs are reported on stderr and left out.",
    )
    parser.add_argument("logs", nargs="+", help="training log files (with --against: the base group)")
    parser.add_argument("--against", nargs="+", metavar="NEW_LOG",
                        help="compare the logs before this option (base) with these (new)")
    parser.add_argument("--label", action=GroupLabel, default=None,
                        help="the name of the group whose logs it follows (with --against: after the new logs, the "
                             "new group's); without --against, of modded-nanogpt logs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (default 0)")
    add_log_options(parser)
    parser.set_defaults(new_label=None)
    args = parser.parse_args(argv)
    check_log_options(parser, args)
    options = dict(strict=args.strict, batch_tokens=args.batch_tokens)
    try:
        runs = load_runs(args.logs, **options, label=None if args.against else args.label)
        new_runs = load_runs(args.against, **options) if args.against else None
    except LogError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if new_runs is None:
        if not runs:
            print("error: no parsable logs", file=sys.stderr)
            return 1
        print(format_table(summarize(runs, args.target), args.target))
        return 0
    base, new = _complete_or_report(runs, "base"), _complete_or_report(new_runs, "new")
    for side, group in (("base", base), ("new (--against)", new)):
        if not group:
            print(f"error: no complete runs among the {side} logs", file=sys.stderr)
            return 1
    try:
        comparison = compare(base, new, args.target, args.seed, (args.label, args.new_label))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_comparison(comparison))
    return 0


if __name__ == "__main__":
    sys.exit(main())

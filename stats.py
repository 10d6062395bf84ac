"""Per-group statistics of training logs: final val loss, a t-test against the target, timings.

Usage:

    python stats.py LOG [LOG ...]
    python stats.py logs/*.txt --target 3.28

Runs are grouped as A, M, or variants such as "M (tied_embed=True)". For each group the
table shows: number of runs; the step counts they were run for; how many finished (ended
without a NaN stop and have a final val loss, the runs the loss statistics use); mean and
sample std (ddof=1) of the final val loss; the p-value of a one-sided one-sample t-test
(scipy.stats.ttest_1samp, alternative="less") that the mean final loss is below the
target; mean total training time of the finished runs; how many runs reached the target;
and their mean time to reach it, interpolated between validation points.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from runlog import (
    TARGET_LOSS,
    LogError,
    Run,
    final_val_loss,
    group_sort_key,
    load_runs,
    time_to_target,
    total_train_time_ms,
)


def summarize(runs: Sequence[Run], target: float = TARGET_LOSS) -> list[dict[str, Any]]:
    """One row per group, in the order A, A variants, M, M variants.

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
        finished = [r for r in members if r.complete and _finite(final_val_loss(r))]
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
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = []
    for k, r in enumerate(table):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += [
        "",
        "final val loss: mean (and sample std, ddof=1) over finished runs (ended without a NaN stop);",
        f"p: one-sided one-sample t-test that the mean final val loss is below {target:g} (needs >= 2 runs);",
        f"time to {target:g}: mean over the runs that reached it, interpolated between validation points.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Per-group statistics of training logs.")
    parser.add_argument("logs", nargs="+", help="training log files")
    parser.add_argument("--target", type=float, default=TARGET_LOSS, help="target val loss (default 3.28)")
    parser.add_argument("--skip-bad", action="store_true", help="warn about and skip logs that cannot be parsed")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.logs, skip_bad=args.skip_bad)
    except LogError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not runs:
        print("error: no parsable logs", file=sys.stderr)
        return 1
    print(format_table(summarize(runs, args.target), args.target))
    return 0


if __name__ == "__main__":
    sys.exit(main())

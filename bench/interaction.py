"""Optimizer x architecture: the final validation loss of each cell of a 2 x 2 of runs, and the interaction.

    python bench/interaction.py log/arch_2x2/*.txt -o img/arch_2x2.png
    python bench/interaction.py --study DIR -o img/arch_2x2_tuned.png     # a `tune.py --study interaction` folder

With --study, the runs are the study's final seeds of each tuned cell, the table shows each cell's tuned values,
and Muon's gain over AdamW at each architecture is given as a loss difference (Welch interval) and in steps: the
difference over the slope of AdamW's own validation curves near their end (stats.loss_slope, the last 4 points).

Each log of train_gpt_A.py (AdamW) or train_gpt_M.py (Muon) falls in a cell by its optimizer and its
architecture: A's (tied embedding, plain logits) or M's (untied, logit soft-cap 30). Per cell: the runs,
their mean final validation loss and its 95% t interval, and the devices the runs came from (a note
when they differ: the same seed does not repeat exactly across GPU models). The interaction is how much
more Muon gains from M's architecture than AdamW does, (Muon@M - Muon@A) - (AdamW@M - AdamW@A): negative
means the architecture helps Muon more (or hurts it less). Its interval uses the cells' variances (Welch-
Satterthwaite degrees of freedom); so do the two main effects printed with it. The figure draws each
optimizer's cells against the architecture, with their intervals (logarithmic loss axis).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats as scipy_stats

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tune  # noqa: E402
from runlog import Run, final_val_loss, load_runs, parse_log  # noqa: E402
from stats import loss_slope, steps_equivalent, welch_difference  # noqa: E402

OPTIMIZERS = {"A": "AdamW", "M": "Muon"}
ARCHITECTURES = {
    (True, 0.0): "A's architecture (tied, plain logits)",
    (False, 30.0): "M's architecture (untied, soft-cap 30)",
}
CONFIDENCE = 0.95


@dataclass
class Estimate:
    mean: float
    lo: float
    hi: float
    df: float


def cell_of(run: Run) -> tuple[str, str] | None:
    """(optimizer, architecture) of a run, or None for a run outside the 2 x 2."""
    arch = ARCHITECTURES.get((bool(run.config.get("tied_embed")), float(run.config.get("logit_softcap", -1))))
    return (OPTIMIZERS[run.baseline], arch) if run.baseline in OPTIMIZERS and arch else None


def contrast(groups: Sequence[Sequence[float]], weights: Sequence[float]) -> Estimate:
    """sum_i w_i mean_i with a t interval from the groups' own variances (Welch-Satterthwaite)."""
    means = [float(np.mean(g)) for g in groups]
    parts = [w * w * np.var(g, ddof=1) / len(g) for g, w in zip(groups, weights, strict=True)]
    variance = sum(parts)
    df = variance**2 / sum(p * p / (len(g) - 1) for p, g in zip(parts, groups, strict=True))
    half = float(scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, df)) * math.sqrt(variance)
    value = sum(w * m for w, m in zip(weights, means, strict=True))
    return Estimate(value, value - half, value + half, df)


def counted(run: Run) -> tuple[str, str] | None:
    """The cell of a run that counts (complete, with a final validation loss), else None."""
    return cell_of(run) if run.complete and final_val_loss(run) is not None else None


def analyse(runs: Sequence[Run]) -> tuple[dict[tuple[str, str], list[float]], dict[str, Estimate]]:
    cells: dict[tuple[str, str], list[float]] = {}
    for run in runs:
        if (cell := counted(run)) is not None:
            cells.setdefault(cell, []).append(final_val_loss(run))
    arch_a, arch_m = ARCHITECTURES.values()
    order = [("AdamW", arch_a), ("AdamW", arch_m), ("Muon", arch_a), ("Muon", arch_m)]
    missing = [c for c in order if len(cells.get(c, [])) < 2]
    if missing:
        raise ValueError(
            f"every cell needs at least 2 complete runs; too few in: {', '.join(f'{o} with {a}' for o, a in missing)}"
        )
    groups = [cells[c] for c in order]
    effects = {
        "interaction (Muon@M - Muon@A) - (AdamW@M - AdamW@A)": contrast(groups, [1, -1, -1, 1]),
        "architecture, M's - A's (mean over optimizers)": contrast(groups, [-0.5, 0.5, -0.5, 0.5]),
        "optimizer, Muon - AdamW (mean over architectures)": contrast(groups, [-0.5, -0.5, 0.5, 0.5]),
    }
    return {c: cells[c] for c in order}, effects


def study_runs(folder: str) -> tuple[list[Run], dict[str, dict[str, float]]]:
    """The final-seed runs of a `tune.py --study interaction` folder, and each run spec's tuned values: the winners
    that tune.py's own replay of the folder finds (what its --report shows)."""
    try:
        found = tune.finished_traces(Path(folder))
    except tune.TuneError as e:
        raise ValueError(f"{folder}: the study is not finished ({e})") from None
    runs, tuned = [], {}
    for search, trace in found:
        tuned[search.spec.label] = trace["best"]
        runs += [parse_log(os.path.join(folder, p.log)) for p in trace["finals"] if p.status == "ok"]
    return runs, tuned


def muon_gains(runs: Sequence[Run]) -> list[str]:
    """Per architecture, Muon - AdamW in final loss (Welch) and in steps of AdamW's own curves near their end."""
    lines = ["", "| architecture | Muon - AdamW, final val loss | 95% CI | AdamW's slope near the end | in steps |",
             "|---|---|---|---|---|"]
    for arch in ARCHITECTURES.values():
        adamw = [r for r in runs if cell_of(r) == ("AdamW", arch) and r.complete]
        muon = [r for r in runs if cell_of(r) == ("Muon", arch) and r.complete]
        d = welch_difference([final_val_loss(r) for r in adamw], [final_val_loss(r) for r in muon])
        slope = loss_slope(adamw, target=-math.inf)
        steps = f"{steps_equivalent(d.diff, slope.slope):+.0f}" if slope and slope.slope < 0 else "-"
        ci = f"{d.lo:+.4f} to {d.hi:+.4f}" if d.lo is not None else d.note
        per_step = f"{slope.slope:.3g} per step" if slope else "-"
        lines.append(f"| {arch} | {d.diff:+.4f} | {ci} | {per_step} | {steps} |")
    lines.append("in steps: the loss difference over AdamW's slope, how many more steps AdamW's curve would take to "
                 "reach Muon's final loss (positive: Muon is ahead)")
    return lines


def devices(runs: Sequence[Run]) -> dict[tuple[str, str], Counter[str]]:
    """Per cell, the devices its counted runs ran on (their logs' device line) and how many ran on each."""
    found: dict[tuple[str, str], Counter[str]] = {}
    for run in runs:
        if (cell := counted(run)) is not None:
            found.setdefault(cell, Counter())[run.device or "unknown"] += 1
    return found


def format_report(cells: dict[tuple[str, str], list[float]], effects: dict[str, Estimate],
                  gpus: dict[tuple[str, str], Counter[str]]) -> str:
    lines = ["| optimizer | architecture | runs | final val loss, mean | 95% CI | device (runs) |",
             "|---|---|---|---|---|---|"]
    for (opt, arch), losses in cells.items():
        est = contrast([losses], [1])
        ran_on = ", ".join(f"{name} ({n})" for name, n in sorted(gpus[(opt, arch)].items()))
        lines.append(f"| {opt} | {arch} | {len(losses)} | {est.mean:.4f} | {est.lo:.4f} to {est.hi:.4f} | {ran_on} |")
    kinds = sorted({name for counts in gpus.values() for name in counts})
    if len(kinds) > 1:
        lines.append(f"note: the runs come from {len(kinds)} devices ({', '.join(kinds)}); a run does not repeat "
                     "exactly on another GPU model, so a difference between cells as small as that may be the device's")
    lines += ["", "| effect | estimate | 95% CI | df |", "|---|---|---|---|"]
    lines += [f"| {name} | {e.mean:+.4f} | {e.lo:+.4f} to {e.hi:+.4f} | {e.df:.1f} |" for name, e in effects.items()]
    return "\n".join(lines)


def plot(cells: dict[tuple[str, str], list[float]], out: str, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(7.5, 4.8), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    archs = list(ARCHITECTURES.values())
    for opt, color in (("AdamW", "tab:blue"), ("Muon", "tab:orange")):
        means, errs = [], []
        for i, arch in enumerate(archs):
            losses = cells[(opt, arch)]
            est = contrast([losses], [1])
            means.append(est.mean)
            errs.append(est.hi - est.mean)
            ax.scatter([i] * len(losses), losses, color=color, alpha=0.35, s=14)
        ax.errorbar(
            range(len(archs)), means, yerr=errs, color=color, marker="o", capsize=5, label=f"{opt} (mean, 95% CI)"
        )
    ax.set_xticks(range(len(archs)), [a.replace(" (", "\n(") for a in archs])
    ax.set_xlim(-0.4, len(archs) - 0.6)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: f"{y:g}" if str(y)[0] in "2357" else ""))
    ax.set_ylabel("validation loss at the last step (log scale)")
    ax.set_title(title, fontsize=10)
    ax.legend()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, format="png")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="*", help="train_gpt_A.py / train_gpt_M.py logs")
    parser.add_argument("--study", default=None, metavar="DIR", help="a `tune.py --study interaction` folder")
    parser.add_argument("-o", "--output", default=None, help="write the figure to this PNG")
    parser.add_argument("--title", default="optimizer x architecture", help="the figure's title")
    args = parser.parse_args(argv)
    if bool(args.logs) == bool(args.study):
        parser.error("give logs, or --study DIR")
    try:
        runs, tuned = study_runs(args.study) if args.study else (load_runs(args.logs), {})
        cells, effects = analyse(runs)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for spec, values in tuned.items():
        print(f"tuned: {spec}: " + ", ".join(f"{k}={v:g}" for k, v in sorted(values.items())))
    print(format_report(cells, effects, devices(runs)))
    if args.study:
        print("\n".join(muon_gains(runs)))
    if args.output:
        plot(cells, args.output, args.title)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

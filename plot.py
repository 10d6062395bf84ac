"""Plot validation-loss curves of training logs against training time and tokens seen.

Usage:

    python plot.py LOG [LOG ...] -o img/curves.png
    python plot.py logs/*.txt --ylim 3.2 4.5 --no-reference
    python plot.py logs/*.txt --linear-y --reference other_curves.csv
    python plot.py logs/*.txt --reference

One curve per log, coloured by group (A, M, variants such as "M (tied_embed=True)", and
modded-nanogpt logs, see runlog.py). The published 8xH100 reference curves from
reference/published_curves.csv are drawn dashed when the longest run comes near their token
range (reaches at least 10% of their last token count); otherwise they would squash the runs
against x=0, so they are left out with a one-line note on stderr. --reference [CSV] draws
reference curves (the published ones, or CSV's) in any case; --no-reference never. The loss
axis is logarithmic unless --linear-y is given; the target loss is drawn as a horizontal line.

Unfinished logs (the run was killed or is still running) and files that are not training
logs are reported in one line each on stderr and left out; --allow-incomplete plots
unfinished runs too, and --strict makes a skipped log an error (exit 1).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from runlog import TARGET_LOSS, LogError, Run, add_log_options, check_log_options, group_sort_key, load_runs

DEFAULT_REFERENCE = Path(__file__).resolve().parent / "reference" / "published_curves.csv"
REFERENCE_BATCH_TOKENS = 524_288
# The reference curves are drawn by default only if the longest run reaches this fraction of their tokens.
REFERENCE_NEAR_FRACTION = 0.1
BASELINE_COLORS = {"A": "tab:blue", "M": "tab:orange"}
FORMATS = ("png", "pdf", "svg")  # the figure's file formats, by the output's ending
VARIANT_COLORS = ["tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray"]
LOSS_TICKS = [2.5, 2.8, 3.0, 3.2, 3.4, 3.6, 3.8, 4.0, 4.5, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 15.0, 20.0]

Curve = list[tuple[int, float, float]]


def load_reference(path: str | Path) -> dict[str, Curve]:
    """Read a csv with columns script,step,val_loss,train_time_ms into {script: [(step, loss, ms), ...]}."""
    path = Path(path)
    required = {"script", "step", "val_loss", "train_time_ms"}
    curves: dict[str, Curve] = {}
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = required - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{path}: reference csv lacks columns {sorted(missing)}")
            for lineno, row in enumerate(reader, start=2):
                try:
                    point = (int(row["step"]), float(row["val_loss"]), float(row["train_time_ms"]))
                except (TypeError, ValueError):
                    raise ValueError(f"{path}:{lineno}: malformed reference row {row}") from None
                curves.setdefault(row["script"], []).append(point)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read reference csv ({exc.strerror or exc})") from None
    return {script: sorted(points) for script, points in curves.items()}


def run_tokens(run: Run) -> float:
    """Tokens seen at the run's last validation point (the end of its plotted curve)."""
    return float(max((run.tokens_at(s) for s, _, _ in run.val), default=0))


def reference_tokens(curves: dict[str, Curve]) -> float:
    """Tokens seen at the last point of the longest reference curve."""
    return float(max((s * REFERENCE_BATCH_TOKENS for points in curves.values() for s, _, _ in points), default=0))


def reference_is_near(runs: Sequence[Run], curves: dict[str, Curve],
                      fraction: float = REFERENCE_NEAR_FRACTION) -> bool:
    """Whether the longest run reaches at least `fraction` of the reference curves' token range."""
    return max((run_tokens(r) for r in runs), default=0.0) >= fraction * reference_tokens(curves)


def _tokens_text(tokens: float) -> str:
    return f"{tokens / 1e9:.2f}B" if tokens >= 1e9 else f"{tokens / 1e6:.1f}M"


def group_colors(groups: Sequence[str]) -> dict[str, str]:
    """Fixed colours for A and M, the variant palette in order for everything else."""
    colors = {}
    variants = iter(VARIANT_COLORS * (1 + len(groups) // len(VARIANT_COLORS)))
    for group in sorted(groups, key=group_sort_key):
        colors[group] = BASELINE_COLORS.get(group) or next(variants)
    return colors


def _time_axis(max_ms: float) -> tuple[float, str]:
    return (60_000.0, "training time (minutes)") if max_ms >= 120_000 else (1000.0, "training time (seconds)")


def _token_axis(max_tokens: float) -> tuple[float, str]:
    return (1e9, "tokens seen (billions)") if max_tokens >= 1e9 else (1e6, "tokens seen (millions)")


def _set_loss_ticks(ax, log_y: bool) -> None:
    """Readable plain-number ticks on a log loss axis (matplotlib's defaults label only powers of ten)."""
    if not log_y:
        return
    lo, hi = ax.get_ylim()
    min_gap = 0.06 * math.log(hi / lo)
    ticks: list[float] = []
    for t in LOSS_TICKS:
        if lo <= t <= hi and (not ticks or math.log(t / ticks[-1]) >= min_gap):
            ticks.append(t)
    if len(ticks) >= 3:
        ax.yaxis.set_major_locator(FixedLocator(ticks))
        ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))


def curves_figure(
    runs: Sequence[Run],
    *,
    reference: str | Path | None = DEFAULT_REFERENCE,
    force_reference: bool = False,
    note: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
    target: float = TARGET_LOSS,
    log_y: bool = True,
    ylim: tuple[float, float] | None = None,
    title: str | None = None,
) -> Figure:
    """The figure of val loss vs training time (left) and vs tokens seen (right) for `runs`.

    reference: csv of reference curves, drawn dashed (None leaves them out). They are drawn if
    force_reference is true or the longest run reaches REFERENCE_NEAR_FRACTION of their tokens;
    otherwise `note` gets one line saying they were left out and why.
    """
    if not runs:
        raise ValueError("no runs to plot")
    ref_curves = load_reference(reference) if reference is not None else {}
    if ref_curves and not force_reference and not reference_is_near(runs, ref_curves):
        longest = max(run_tokens(r) for r in runs)
        note(f"left out the reference curves of {Path(reference).name}: the longest run reaches "
             f"{_tokens_text(longest)} tokens, under {REFERENCE_NEAR_FRACTION:.0%} of their "
             f"{_tokens_text(reference_tokens(ref_curves))} (--reference draws them anyway)")
        ref_curves = {}

    series: list[tuple[str, list[float], list[float], list[float], str]] = []
    for run in runs:
        ms = [t for _, _, t in run.val]
        tokens = [float(run.tokens_at(s)) for s, _, _ in run.val]
        series.append((run.group, ms, tokens, [loss for _, loss, _ in run.val], run.stopped or ""))
    max_ms = max([t for _, ms, _, _, _ in series for t in ms] + [p[2] for c in ref_curves.values() for p in c] + [1.0])
    max_tokens = max(
        [x for _, _, tok, _, _ in series for x in tok]
        + [p[0] * REFERENCE_BATCH_TOKENS for c in ref_curves.values() for p in c]
        + [1.0]
    )
    time_div, time_label = _time_axis(max_ms)
    token_div, token_label = _token_axis(max_tokens)

    counts: dict[str, int] = {}
    for run in runs:
        counts[run.group] = counts.get(run.group, 0) + 1
    colors = group_colors(list(counts))

    fig = Figure(figsize=(13, 5.2), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax_time, ax_tokens = fig.subplots(1, 2, sharey=True)
    for group, ms, tokens, losses, stopped in series:
        width, alpha = (1.8, 1.0) if counts[group] == 1 else (1.0, 0.55)
        for ax, xs, div in ((ax_time, ms, time_div), (ax_tokens, tokens, token_div)):
            x = [v / div for v in xs]
            ax.plot(x, losses, color=colors[group], linewidth=width, alpha=alpha)
            finite = [(xv, lv) for xv, lv in zip(x, losses, strict=True) if math.isfinite(lv)]
            if stopped and finite:
                ax.plot(*finite[-1], marker="x", markersize=9, color=colors[group])

    handles = [
        Line2D([], [], color=colors[g], linewidth=1.8, label=f"{g}: {counts[g]} run{'s' if counts[g] != 1 else ''}")
        for g in sorted(counts, key=group_sort_key)
    ]
    for script in sorted(ref_curves):
        points = ref_curves[script]
        color = BASELINE_COLORS.get(script, "black")
        label = f"published reference {script} (8xH100)"
        losses = [loss for _, loss, _ in points]
        ax_time.plot([t / time_div for _, _, t in points], losses, "--", color=color, linewidth=1.4, alpha=0.9)
        ax_tokens.plot([s * REFERENCE_BATCH_TOKENS / token_div for s, _, _ in points], losses, "--",
                       color=color, linewidth=1.4, alpha=0.9)
        handles.append(Line2D([], [], color=color, linestyle="--", linewidth=1.4, label=label))
    if any(stopped for *_, stopped in series):
        handles.append(Line2D([], [], color="black", marker="x", linestyle="none", label="stopped (loss is nan)"))
    handles.append(Line2D([], [], color="black", linestyle=":", linewidth=1.2, label=f"target {target:g}"))

    for ax, xlabel in ((ax_time, time_label), (ax_tokens, token_label)):
        ax.axhline(target, color="black", linestyle=":", linewidth=1.2)
        ax.set_xlabel(xlabel)
        ax.grid(True, which="major", alpha=0.3)
        ax.set_xlim(left=0)
        if log_y:
            ax.set_yscale("log")
    if ylim is not None:
        ax_time.set_ylim(*ylim)
    ax_time.set_ylabel("validation loss" + (" (log scale)" if log_y else ""))
    _set_loss_ticks(ax_time, log_y)
    ax_time.set_title("val loss vs training time")
    ax_tokens.set_title("val loss vs tokens seen")
    ax_tokens.legend(handles=handles, loc="upper right", fontsize=9)
    fig.suptitle(title or f"Validation loss (target {target:g})")
    return fig


def plot_runs(runs: Sequence[Run], out_path: str | Path, **options) -> Path:
    """Draw curves_figure(runs, **options) into `out_path`, PNG, PDF or SVG by its ending (parent folders
    created); returns the path."""
    fig = curves_figure(runs, **options)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format=out.suffix.lower().lstrip(".") or "png")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plot validation loss curves from training logs.")
    parser.add_argument("logs", nargs="+", help="training log files")
    parser.add_argument("-o", "--output", default="img/curves.png",
                        help=f"the figure: {', '.join(FORMATS)} by its ending (default img/curves.png)")
    reference = parser.add_mutually_exclusive_group()
    reference.add_argument("--reference", nargs="?", const=str(DEFAULT_REFERENCE), default=None, metavar="CSV",
                           help="draw reference curves (from CSV, default the published 8xH100 ones) even when no "
                                "run comes near their token range; put it after the logs")
    reference.add_argument("--no-reference", action="store_true", help="leave the reference curves out")
    parser.add_argument("--linear-y", action="store_true", help="linear instead of log scale on the loss axis")
    parser.add_argument("--ylim", nargs=2, type=float, metavar=("LO", "HI"), help="loss axis limits, e.g. 3.2 4.5")
    parser.add_argument("--title", help="figure title")
    parser.add_argument("--allow-incomplete", action="store_true",
                        help="also plot unfinished runs (no '=== end of run ===' or final val line)")
    add_log_options(parser, "group label of modded-nanogpt logs (default modded-nanogpt:<file stem>)")
    args = parser.parse_args(argv)
    check_log_options(parser, args)
    if Path(args.output).suffix.lower().lstrip(".") not in FORMATS:
        parser.error(f"-o {args.output}: the figure is written as {', '.join('.' + f for f in FORMATS)}, by its ending")
    if args.ylim and not args.linear_y and min(args.ylim) <= 0:
        parser.error(f"--ylim {args.ylim[0]:g} {args.ylim[1]:g}: the loss axis is logarithmic, its limits must be "
                     "positive (or add --linear-y)")
    try:
        runs = load_runs(args.logs, strict=args.strict, allow_incomplete=args.allow_incomplete,
                         batch_tokens=args.batch_tokens, label=args.label)
        if not runs:
            raise ValueError("no logs left to plot")
        out = plot_runs(
            runs,
            args.output,
            reference=None if args.no_reference else (args.reference or DEFAULT_REFERENCE),
            force_reference=args.reference is not None,
            target=args.target,
            log_y=not args.linear_y,
            ylim=tuple(args.ylim) if args.ylim else None,
            title=args.title,
        )
    except (LogError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({len(runs)} run{'s' if len(runs) != 1 else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The one parser of the training log format written by train_gpt_A.py / train_gpt_M.py.

Usage as a module (plot.py and stats.py do this):

    from runlog import parse_log, final_val_loss, time_to_target
    run = parse_log("logs/A_20261123-203000_1a2b3c.txt")
    print(run.group, final_val_loss(run), time_to_target(run))

Usage from the shell, one summary line per log:

    python runlog.py LOG [LOG ...]

A log is: header lines (run_id, baseline, script, date, command), the embedded
source between "=== source: ... ===" and "=== end of source ===", a "config: {json}"
line, environment lines (python, torch, cuda, device, world_size, grad_accum_steps,
optional resumed_from, nvidia-smi block), then "=== training ===" followed by step
lines and "=== end of run ===". Only lines after "=== training ===" are data; the
embedded source is never parsed.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TARGET_LOSS = 3.28

# Architecture fields and their defaults per baseline; a run whose config differs
# from its baseline's defaults in any of these is a variant with its own group.
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "A": {"tied_embed": True, "logit_softcap": 0.0},
    "M": {"tied_embed": False, "logit_softcap": 30.0},
}

SOURCE_START = "=== source: "
SOURCE_END = "=== end of source ==="
TRAINING_START = "=== training ==="
RUN_END = "=== end of run ==="

_VAL_RE = re.compile(r"step:(\d+)/(\d+) val_loss:(\S+) train_time:(\d+(?:\.\d*)?)ms step_avg:\S+ms")
_TRAIN_RE = re.compile(r"step:(\d+)/(\d+) train_time:(\d+(?:\.\d*)?)ms step_avg:\S+ms")
_PEAK_RE = re.compile(r"peak memory allocated: (\d+) MiB reserved: (\d+) MiB")
_RESUMED_RE = re.compile(r"(.*\S)\s+step:(\d+)")


class LogError(ValueError):
    """A file that cannot be read as a complete training log."""

    def __init__(self, path: str | Path, problem: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {problem}")
        self.path = str(path)
        self.problem = problem


@dataclass
class Run:
    """One parsed training log."""

    path: Path
    run_id: str
    baseline: str
    group: str
    config: dict[str, Any]
    script: str = ""
    date: str = ""
    command: str = ""
    python: str | None = None
    torch: str | None = None
    cuda: str | None = None
    device: str | None = None
    world_size: int | None = None
    grad_accum_steps: int | None = None
    resumed_from: str | None = None
    resumed_step: int | None = None
    num_steps: int | None = None
    train: list[tuple[int, float]] = field(default_factory=list)
    val: list[tuple[int, float, float]] = field(default_factory=list)
    peak_allocated_mib: int | None = None
    peak_reserved_mib: int | None = None
    stopped: str | None = None
    complete: bool = False

    @property
    def batch_tokens(self) -> int:
        return int(self.config["batch_tokens"])

    def tokens_at(self, step: int) -> int:
        """Tokens seen after `step` optimizer steps."""
        return step * self.batch_tokens


def group_label(baseline: str, config: dict[str, Any]) -> str:
    """"A", "M", or e.g. "M (tied_embed=True)" when architecture fields differ from the defaults."""
    diffs = []
    for key, default in ARCH_DEFAULTS[baseline].items():
        if key in config and not _same_value(config[key], default):
            diffs.append(f"{key}={_format_value(config[key])}")
    return f"{baseline} ({', '.join(diffs)})" if diffs else baseline


def group_sort_key(label: str) -> tuple[str, bool, str]:
    """Order groups as A, A variants, M, M variants."""
    return (label[:1], label not in ARCH_DEFAULTS, label)


def _same_value(value: Any, default: Any) -> bool:
    if isinstance(value, bool) or isinstance(default, bool):
        return isinstance(value, bool) and isinstance(default, bool) and value == default
    return value == default


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return repr(float(value))
    return str(value)


def _split_key_value(line: str) -> tuple[str, str] | None:
    key, sep, value = line.partition(": ")
    if not sep or not key or " " in key:
        return None
    return key, value


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LogError(path, "not a training log (not UTF-8 text)") from None
    except OSError as exc:
        raise LogError(path, f"cannot read file ({exc.strerror or exc})") from None
    if not text.strip():
        raise LogError(path, "empty file, not a training log")
    return text.splitlines()


def _find_source_end(lines: list[str], start: int) -> int | None:
    """Index of the last "=== end of source ===" line that is followed by a config line.

    Taking the last one keeps a source that itself contains these lines (say, a docstring
    describing the log format) from being mistaken for the end of the source section.
    """
    for i in range(len(lines) - 2, start - 1, -1):
        if lines[i] == SOURCE_END and lines[i + 1].startswith("config:"):
            return i
    return None


def parse_log(path: str | Path, *, allow_incomplete: bool = False) -> Run:
    """Parse one training log. Raises LogError naming `path` if it is empty, foreign or truncated.

    With allow_incomplete=True a log without "=== end of run ===" (a run still in
    progress or killed) is accepted and returned with complete=False.
    """
    path = Path(path)
    lines = _read_lines(path)

    if not lines[0].startswith("run_id:"):
        shown = lines[0] if len(lines[0]) <= 60 else lines[0][:57] + "..."
        raise LogError(path, f"not a training log (first line should start with 'run_id:', found {shown!r})", 1)

    header: dict[str, str] = {}
    i = 0
    while i < len(lines) and not lines[i].startswith(SOURCE_START):
        kv = _split_key_value(lines[i])
        if kv is None:
            raise LogError(path, f"malformed header line {lines[i]!r} (expected 'key: value')", i + 1)
        header[kv[0]] = kv[1]
        i += 1
    for key in ("run_id", "baseline"):
        if key not in header:
            raise LogError(path, f"truncated or malformed log: header has no '{key}:' line")
    baseline = header["baseline"]
    if baseline not in ARCH_DEFAULTS:
        raise LogError(path, f"unknown baseline {baseline!r} (expected one of {sorted(ARCH_DEFAULTS)})")
    if i == len(lines):
        raise LogError(path, f"truncated log: no '{SOURCE_START}...' line after the header")

    source_end = _find_source_end(lines, i + 1)
    if source_end is None:
        raise LogError(path, f"truncated log: no '{SOURCE_END}' line followed by a 'config:' line")
    i = source_end + 1
    config_text = lines[i][len("config:"):].strip()
    try:
        config = json.loads(config_text)
    except json.JSONDecodeError as exc:
        raise LogError(path, f"config line is not valid JSON ({exc.msg})", i + 1) from None
    if not isinstance(config, dict):
        raise LogError(path, "config line is not a JSON object", i + 1)
    if not isinstance(config.get("batch_tokens"), int) or config["batch_tokens"] <= 0:
        raise LogError(path, "config has no positive integer 'batch_tokens'", i + 1)
    i += 1

    run = Run(
        path=path,
        run_id=header["run_id"],
        baseline=baseline,
        group=group_label(baseline, config),
        config=config,
        script=header.get("script", ""),
        date=header.get("date", ""),
        command=header.get("command", ""),
    )
    i = _parse_environment(path, lines, i, run)
    _parse_training(path, lines, i, run, allow_incomplete)
    return run


def _parse_environment(path: Path, lines: list[str], i: int, run: Run) -> int:
    """Read the lines between config and "=== training ==="; return the index after that marker."""
    in_nvidia_smi = False
    while i < len(lines) and lines[i] != TRAINING_START:
        line = lines[i]
        if line == "nvidia-smi:":
            in_nvidia_smi = True
        elif not in_nvidia_smi and (kv := _split_key_value(line)) is not None:
            key, value = kv
            if key in ("python", "torch", "cuda", "device"):
                setattr(run, key, value)
            elif key in ("world_size", "grad_accum_steps"):
                if not value.isdigit():
                    raise LogError(path, f"{key} is not an integer: {value!r}", i + 1)
                setattr(run, key, int(value))
            elif key == "resumed_from":
                match = _RESUMED_RE.fullmatch(value)
                run.resumed_from = match.group(1) if match else value
                run.resumed_step = int(match.group(2)) if match else None
        i += 1
    if i == len(lines):
        raise LogError(path, f"truncated log: no '{TRAINING_START}' line")
    return i + 1


def _parse_training(path: Path, lines: list[str], i: int, run: Run, allow_incomplete: bool) -> None:
    """Read step lines after "=== training ===" up to "=== end of run ===" into `run`."""
    ended = False
    for lineno in range(i + 1, len(lines) + 1):
        line = lines[lineno - 1]
        if line == RUN_END:
            ended = True
            break
        if match := _VAL_RE.fullmatch(line):
            try:
                loss = float(match.group(3))
            except ValueError:
                raise LogError(path, f"val_loss is not a number in {line!r}", lineno) from None
            run.val.append((int(match.group(1)), loss, float(match.group(4))))
            run.num_steps = int(match.group(2))
        elif match := _TRAIN_RE.fullmatch(line):
            run.train.append((int(match.group(1)), float(match.group(3))))
            run.num_steps = int(match.group(2))
        elif match := _PEAK_RE.fullmatch(line):
            run.peak_allocated_mib = int(match.group(1))
            run.peak_reserved_mib = int(match.group(2))
        elif line.startswith("stopped:"):
            run.stopped = line[len("stopped:"):].strip()
        elif line.startswith("step:"):
            raise LogError(path, f"malformed step line {line!r}", lineno)
    if not ended and not allow_incomplete:
        raise LogError(path, f"truncated log: no '{RUN_END}' line (run killed or still running?)")
    run.complete = ended and run.stopped is None


def final_val_loss(run: Run) -> float | None:
    """Validation loss of the last validation line, or None if there is none."""
    return run.val[-1][1] if run.val else None


def total_train_time_ms(run: Run) -> float | None:
    """Training time at the last logged step (train or val line), or None if no steps were logged."""
    times = [t for _, t in run.train] + [t for _, _, t in run.val]
    return max(times) if times else None


def time_to_target(run: Run, target: float = TARGET_LOSS) -> float | None:
    """Training time (ms) at which val loss first reaches <= target, linearly interpolated
    between the validation points around the crossing; None if never reached."""
    previous: tuple[int, float, float] | None = None
    for point in run.val:
        _, loss, time_ms = point
        if loss <= target:
            if previous is None or not math.isfinite(previous[1]):
                return time_ms
            _, loss0, time0 = previous
            return time0 + (loss0 - target) / (loss0 - loss) * (time_ms - time0)
        previous = point
    return None


def load_runs(
    paths: Iterable[str | Path],
    *,
    skip_bad: bool = False,
    allow_incomplete: bool = False,
    warn: Callable[[str], None] = lambda msg: print(f"warning: {msg}", file=sys.stderr),
) -> list[Run]:
    """Parse several logs; with skip_bad, logs that raise LogError are reported through `warn` and left out."""
    runs = []
    for path in paths:
        try:
            runs.append(parse_log(path, allow_incomplete=allow_incomplete))
        except LogError as exc:
            if not skip_bad:
                raise
            warn(f"skipping {exc}")
    return runs


def summary_line(run: Run, target: float = TARGET_LOSS) -> str:
    """One human-readable line describing a run."""
    last_step = max([s for s, _ in run.train] + [s for s, _, _ in run.val], default=0)
    loss = final_val_loss(run)
    total = total_train_time_ms(run)
    reached = time_to_target(run, target)
    status = "complete" if run.complete else (f"stopped ({run.stopped})" if run.stopped else "incomplete")
    parts = [
        str(run.path),
        run.run_id,
        run.group,
        f"device={run.device}",
        f"steps={last_step}/{run.num_steps if run.num_steps is not None else '?'}",
        f"final_val_loss={loss:.4f}" if loss is not None else "final_val_loss=-",
        f"train_time={total / 1000:.1f}s" if total is not None else "train_time=-",
        f"time_to_{target:g}={reached / 1000:.1f}s" if reached is not None else f"time_to_{target:g}=-",
        status,
    ]
    if run.resumed_from is not None:
        parts.append(f"resumed_from={run.resumed_from}")
    return "  ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print a one-line summary of each training log.")
    parser.add_argument("logs", nargs="+", help="training log files")
    parser.add_argument("--target", type=float, default=TARGET_LOSS, help="target val loss (default 3.28)")
    parser.add_argument("--allow-incomplete", action="store_true", help="accept logs without '=== end of run ==='")
    args = parser.parse_args(argv)
    failed = 0
    for path in args.logs:
        try:
            print(summary_line(parse_log(path, allow_incomplete=args.allow_incomplete), args.target))
        except LogError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

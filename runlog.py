"""The one parser of training logs: those of train_gpt_A.py / train_gpt_M.py, and modded-nanogpt's.

Usage as a module (plot.py and stats.py do this):

    from runlog import load_runs, parse_log, final_val_loss, time_to_target
    run = parse_log("logs/A_20261123-203000_1a2b3c.txt")
    print(run.group, final_val_loss(run), time_to_target(run))
    runs = load_runs(paths)  # leaves out unfinished and unparsable logs, one stderr line each

Usage from the shell, one summary line per log:

    python runlog.py LOG [LOG ...]
    python runlog.py records/*/*.txt --label record --batch_tokens 393216

A train_gpt log is: header lines (run_id, baseline, script, date, command), the embedded
source between "=== source: ... ===" and "=== end of source ===", a "config: {json}"
line, environment lines (python, torch, cuda, device, world_size, grad_accum_steps,
optional resumed_from, nvidia-smi block), then "=== training ===" followed by step
lines and "=== end of run ===". Only lines after "=== training ===" are data; the
embedded source is never parsed. Step lines:

    step:12/300 train_loss:5.1234 lr_mult:0.8000 train_time:1234ms step_avg:102.83ms
    step:12/300 val_loss:5.0123 train_time:1234ms step_avg:102.83ms

train_loss and lr_mult are optional (older logs lack them); train_loss may be nan or inf.
The log has ended at "=== end of run ==="; it is complete if it ended without a "stopped:" line.

A modded-nanogpt log (the speedrun's records and reference logs) is the training script's
source, a line of 100 "=", environment lines ("Running Python 3.12.7 ...", "Running PyTorch
2.6.0 compiled for CUDA 12.6", an nvidia-smi table), another line of 100 "=", then step lines
as above (without lr_mult) and "peak memory allocated: X MiB reserved: Y MiB". Only the step
lines after the last 100-"=" line are data; other lines there are ignored. Such a log has no
config: its tokens per step are taken as 524,288 unless given (batch_tokens=, --batch_tokens),
and Run.batch_tokens_assumed says the default was used; its group is "modded-nanogpt:<file
stem>" unless a label is given. It has ended (and is complete) once it holds the final
validation line, step N/N.
"""

from __future__ import annotations

import argparse
import hashlib
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

TRAIN_GPT_FORMAT = "train_gpt"
MODDED_FORMAT = "modded-nanogpt"
MODDED_SEPARATOR = "=" * 100
# modded-nanogpt's long-standing batch: 8 GPUs x 64 sequences x 1024 tokens.
DEFAULT_FOREIGN_BATCH_TOKENS = 524_288

SOURCE_START = "=== source: "
SOURCE_END = "=== end of source ==="
TRAINING_START = "=== training ==="
RUN_END = "=== end of run ==="

_VAL_RE = re.compile(r"step:(\d+)/(\d+) val_loss:(\S+) train_time:(\d+(?:\.\d*)?)ms step_avg:\S+ms")
_TRAIN_RE = re.compile(
    r"step:(\d+)/(\d+)(?: train_loss:(\S+))?(?: lr_mult:(\S+))? train_time:(\d+(?:\.\d*)?)ms step_avg:\S+ms"
)
_STEP_FIELD_RE = re.compile(r"(\d+)/(\d+)")
_TIME_FIELD_RE = re.compile(r"(\d+(?:\.\d*)?)(ms|s)")  # modded-nanogpt's optimization track writes seconds
_INTERRUPTED_RE = re.compile(r"interrupted at step \d+ by \S+;.*")
# Fields that say where outputs go and how to resume, not what is computed: a group of runs is every field but
# these and the seed.
OUTPUT_FIELDS = ("seed", "log_dir", "checkpoint_dir", "checkpoint_every", "keep_checkpoints", "resume",
                 "resume_changes", "preset")
_PEAK_RE = re.compile(r"peak memory allocated: (\d+) MiB reserved: (\d+) MiB")
_RESUMED_RE = re.compile(r"(.*\S)\s+step:(\d+)(?:\s+run:(\S+))?")
_SMI_GPU_RE = re.compile(r"\|\s+\d+\s+(\S.*?)\s+(?:On|Off)\s+\|")


class LogError(ValueError):
    """A file that cannot be read as a complete training log."""

    def __init__(self, path: str | Path, problem: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {problem}")
        self.path = str(path)
        self.problem = problem


@dataclass
class Run:
    """One parsed training log.

    train holds (step, train_time_ms) for every training step line; train_losses and lr_mults
    hold (step, value) for the step lines that carry train_loss / lr_mult (nan and inf kept).
    ended: the log reached its end ("=== end of run ===", or step N/N's validation line in a
    modded-nanogpt log); complete: it ended without a "stopped:" line.
    """

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
    resumed_run: str | None = None  # the run id of the log this one continues
    num_steps: int | None = None
    train: list[tuple[int, float]] = field(default_factory=list)
    val: list[tuple[int, float, float]] = field(default_factory=list)
    train_losses: list[tuple[int, float]] = field(default_factory=list)
    lr_mults: list[tuple[int, float]] = field(default_factory=list)
    peak_allocated_mib: int | None = None
    peak_reserved_mib: int | None = None
    stopped: str | None = None
    ended: bool = False
    complete: bool = False
    log_format: str = TRAIN_GPT_FORMAT
    batch_tokens_assumed: bool = False
    interrupted: str | None = None  # the line of a run stopped by SIGINT or SIGTERM
    fast_ops: str | None = None  # the log's "fast_ops:" line: which implementation each op had
    group_key: tuple = ()  # runs with equal keys are one configuration: see group_key()

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
    """Order groups as A, A variants, M, M variants (then foreign groups such as modded-nanogpt:...)."""
    return (label[:1], label not in ARCH_DEFAULTS, label)


def _same_value(value: Any, default: Any) -> bool:
    if isinstance(value, bool) or isinstance(default, bool):
        return isinstance(value, bool) and isinstance(default, bool) and value == default
    return value == default


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
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


def parse_log(
    path: str | Path,
    *,
    allow_incomplete: bool = False,
    batch_tokens: int | None = None,
    label: str | None = None,
) -> Run:
    """Parse one train_gpt or modded-nanogpt log. Raises LogError naming `path` if it is empty,
    foreign or truncated.

    With allow_incomplete=True a log that has not ended (a run still in progress or killed) is
    accepted and returned with ended=complete=False. batch_tokens and label apply to
    modded-nanogpt logs only (which have no config): tokens per step (default 524,288, then
    recorded as assumed) and group label (default "modded-nanogpt:<file stem>").
    """
    path = Path(path)
    if path.suffix == ".jsonl" and path.with_suffix(".txt").is_file():
        path = path.with_suffix(".txt")  # the text log says more (how the run ended, where it was resumed from)
    lines = _read_lines(path)
    if path.suffix == ".jsonl":
        run = _parse_records(path, lines)
    elif lines[0].startswith("run_id:"):
        run = _parse_train_gpt(path, lines)
        if path.with_suffix(".jsonl").is_file():
            _take_exact_values(run, path.with_suffix(".jsonl"))
    elif any(line.rstrip() == MODDED_SEPARATOR for line in lines):
        run = _parse_modded(path, lines, batch_tokens, label)
    else:
        shown = lines[0] if len(lines[0]) <= 60 else lines[0][:57] + "..."
        raise LogError(
            path,
            f"not a training log (first line should start with 'run_id:', found {shown!r}; "
            "no line of 100 '=' as in a modded-nanogpt log either)",
            1,
        )
    if not run.ended and not allow_incomplete:
        end = f"'{RUN_END}' line" if run.log_format == TRAIN_GPT_FORMAT else "final validation line (step N/N)"
        raise LogError(path, f"truncated log: no {end} (run killed or still running?), {progress(run)}")
    return run


def _records(path: Path, lines: list[str]) -> list[dict[str, Any]]:
    records = []
    for lineno, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if lineno < len(lines):  # the last line may be half-written by a killed run
                raise LogError(path, "not a JSON Lines record", lineno) from None
    if not records or not isinstance(records[0], dict) or "config" not in records[0]:
        raise LogError(path, "not a run's records (the first should hold its config)", 1)
    return records


def _parse_records(path: Path, lines: list[str]) -> Run:
    """A run from its <run_id>.jsonl alone: the records of its step and validation lines, exact."""
    first, *steps = _records(path, lines)
    config = first["config"]
    run = Run(path=path, run_id=first.get("run_id", path.stem), baseline=first.get("baseline", "?"), group="",
              config=config, python=first.get("python"), torch=first.get("torch"), cuda=first.get("cuda"))
    if run.baseline not in ARCH_DEFAULTS:
        raise LogError(path, f"unknown baseline {run.baseline!r}")
    run.group = group_label(run.baseline, config)
    run.group_key = (TRAIN_GPT_FORMAT, run.baseline, json.dumps({k: v for k, v in config.items()
                                                                 if k not in OUTPUT_FIELDS}, sort_keys=True))
    run.num_steps = config.get("num_iterations")
    for record in steps:
        _add_record(run, record)
    run.ended = run.complete = any(step == run.num_steps for step, _, _ in run.val)
    return run


def _add_record(run: Run, record: dict[str, Any]) -> None:
    step, ms = int(record["step"]), float(record["train_time_ms"])
    if "val_loss" in record:
        run.val.append((step, float(record["val_loss"]), ms))
    else:
        run.train.append((step, ms))
        run.train_losses.append((step, float(record["train_loss"])))
        run.lr_mults.append((step, float(record["lr_mult"])))


def _take_exact_values(run: Run, records_path: Path) -> None:
    """The text log's rounded losses and times replaced by its records' exact ones, where they hold every point."""
    try:
        shadow = Run(path=records_path, run_id=run.run_id, baseline=run.baseline, group="", config=run.config)
        for record in _records(records_path, _read_lines(records_path))[1:]:
            _add_record(shadow, record)
    except (LogError, KeyError, ValueError, TypeError):
        return
    if [s for s, _, _ in shadow.val] == [s for s, _, _ in run.val] and len(shadow.train) == len(run.train):
        run.val, run.train, run.train_losses = shadow.val, shadow.train, shadow.train_losses


def _parse_train_gpt(path: Path, lines: list[str]) -> Run:
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
    run.group_key = (TRAIN_GPT_FORMAT, baseline, json.dumps({k: v for k, v in config.items() if k not in OUTPUT_FIELDS},
                                                           sort_keys=True))
    i = _parse_environment(path, lines, i, run)
    _parse_training(path, lines, i, run)
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
            if key in ("python", "torch", "cuda", "device", "fast_ops"):
                setattr(run, key, value)
            elif key in ("world_size", "grad_accum_steps"):
                if not value.isdigit():
                    raise LogError(path, f"{key} is not an integer: {value!r}", i + 1)
                setattr(run, key, int(value))
            elif key == "resumed_from":
                match = _RESUMED_RE.fullmatch(value)
                run.resumed_from = match.group(1) if match else value
                run.resumed_step = int(match.group(2)) if match else None
                run.resumed_run = match.group(3) if match else None
        i += 1
    if i == len(lines):
        raise LogError(path, f"truncated log: no '{TRAINING_START}' line")
    return i + 1


def _number(path: Path, name: str, text: str, line: str, lineno: int) -> float:
    try:
        return float(text)
    except ValueError:
        raise LogError(path, f"{name} is not a number in {line!r}", lineno) from None


def _parse_training(path: Path, lines: list[str], i: int, run: Run) -> None:
    """Read step lines after "=== training ===" up to "=== end of run ===" into `run`."""
    ended = False
    for lineno in range(i + 1, len(lines) + 1):
        line = lines[lineno - 1]
        if line == RUN_END:
            ended = True
            break
        if match := _VAL_RE.fullmatch(line):
            loss = _number(path, "val_loss", match.group(3), line, lineno)
            run.val.append((int(match.group(1)), loss, float(match.group(4))))
            run.num_steps = int(match.group(2))
        elif match := _TRAIN_RE.fullmatch(line):
            step = int(match.group(1))
            run.train.append((step, float(match.group(5))))
            if match.group(3) is not None:
                run.train_losses.append((step, _number(path, "train_loss", match.group(3), line, lineno)))
            if match.group(4) is not None:
                run.lr_mults.append((step, _number(path, "lr_mult", match.group(4), line, lineno)))
            run.num_steps = int(match.group(2))
        elif match := _PEAK_RE.fullmatch(line):
            run.peak_allocated_mib = int(match.group(1))
            run.peak_reserved_mib = int(match.group(2))
        elif line.startswith("stopped:"):
            run.stopped = line[len("stopped:"):].strip()
        elif _INTERRUPTED_RE.fullmatch(line):
            run.interrupted = line
        elif line.startswith("step:") and lineno < len(lines):
            # The file's last line may be half-written by a killed run; anywhere else it is an error.
            raise LogError(path, f"malformed step line {line!r}", lineno)
    run.ended = ended
    run.complete = ended and run.stopped is None


def _parse_modded(path: Path, lines: list[str], batch_tokens: int | None, label: str | None) -> Run:
    separators = [i for i, line in enumerate(lines) if line.rstrip() == MODDED_SEPARATOR]
    if batch_tokens is not None and batch_tokens <= 0:
        raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
    run = Run(
        path=path,
        run_id=path.stem,
        baseline=MODDED_FORMAT,
        group=label or f"{MODDED_FORMAT}:{path.stem}",
        config={"batch_tokens": batch_tokens or DEFAULT_FOREIGN_BATCH_TOKENS},
        log_format=MODDED_FORMAT,
        batch_tokens_assumed=batch_tokens is None,
        group_key=(MODDED_FORMAT, hashlib.sha1("\n".join(lines[: separators[0]]).encode()).hexdigest()),
    )
    gpus: list[str] = []
    for line in lines[separators[0] + 1:]:
        if line.startswith("Running Python ") and len(line.split()) > 2:
            run.python = line.split()[2]
        elif line.startswith("Running PyTorch ") and len(line.split()) > 2:
            run.torch = line.split()[2]
            if " compiled for CUDA " in line:
                run.cuda = line.split(" compiled for CUDA ")[1].split()[0]
        elif match := _SMI_GPU_RE.match(line):
            gpus.append(match.group(1))
    if gpus and len(set(gpus)) == 1:
        run.device = f"{gpus[0]} x{len(gpus)}"
    elif gpus:
        run.device = ", ".join(gpus)

    for line in lines[separators[-1] + 1:]:
        line = line.strip()
        if match := _PEAK_RE.fullmatch(line):
            run.peak_allocated_mib = int(match.group(1))
            run.peak_reserved_mib = int(match.group(2))
        elif line.startswith("step:"):
            _add_modded_step(run, line)
    if run.python is None and run.torch is None and last_step(run) is None:
        raise LogError(path, "not a training log (a line of 100 '=' but no 'Running Python' line and no step "
                             "line after it, as a modded-nanogpt log would have)")
    run.ended = run.complete = run.num_steps is not None and any(s == run.num_steps for s, _, _ in run.val)
    return run


def _add_modded_step(run: Run, line: str) -> None:
    """Record one `step:` line of a modded-nanogpt log; lines without a step and a time are ignored."""
    fields = dict(token.partition(":")[::2] for token in line.split())
    step_match = _STEP_FIELD_RE.fullmatch(fields.get("step", ""))
    time_match = _TIME_FIELD_RE.fullmatch(fields.get("train_time", ""))
    if not step_match or not time_match:
        return
    step = int(step_match.group(1))
    time_ms = float(time_match.group(1)) * (1000.0 if time_match.group(2) == "s" else 1.0)
    try:
        val_loss = float(fields["val_loss"]) if "val_loss" in fields else None
        train_loss = float(fields["train_loss"]) if "train_loss" in fields else None
    except ValueError:
        return
    run.num_steps = int(step_match.group(2))
    if val_loss is not None:
        run.val.append((step, val_loss, time_ms))
        return
    run.train.append((step, time_ms))
    if train_loss is not None:
        run.train_losses.append((step, train_loss))


def last_step(run: Run) -> int | None:
    """The highest step of any step line, or None if there is none."""
    return max([s for s, _ in run.train] + [s for s, _, _ in run.val], default=None)


def progress(run: Run) -> str:
    """"last step 123/2500", "interrupted at step ... (resume with ...)", or "no step logged"."""
    if run.interrupted:
        return run.interrupted
    step = last_step(run)
    if step is None:
        return "no step logged"
    return f"last step {step}/{run.num_steps if run.num_steps is not None else '?'}"


def final_val_loss(run: Run) -> float | None:
    """Validation loss of the last validation line, or None if there is none."""
    return run.val[-1][1] if run.val else None


def final_train_loss(run: Run) -> float | None:
    """Training loss of the last step line that carries one (may be nan or inf), or None."""
    return run.train_losses[-1][1] if run.train_losses else None


def total_train_time_ms(run: Run) -> float | None:
    """Training time at the last logged step (train or val line), or None if no steps were logged."""
    times = [t for _, t in run.train] + [t for _, _, t in run.val]
    return max(times) if times else None


def _crossing(run: Run, target: float, x: Callable[[tuple[int, float, float]], float]) -> float | None:
    """x (step or time) at which val loss first reaches <= target, interpolated linearly between
    the validation points around the crossing; None if never reached."""
    previous: tuple[int, float, float] | None = None
    for point in run.val:
        loss = point[1]
        if loss <= target:
            if previous is None or not math.isfinite(previous[1]):
                return float(x(point))
            loss0 = previous[1]
            return x(previous) + (loss0 - target) / (loss0 - loss) * (x(point) - x(previous))
        previous = point
    return None


def time_to_target(run: Run, target: float = TARGET_LOSS) -> float | None:
    """Training time (ms) at which val loss first reaches <= target, linearly interpolated
    between the validation points around the crossing; None if never reached."""
    return _crossing(run, target, lambda point: point[2])


def steps_to_target(run: Run, target: float = TARGET_LOSS) -> float | None:
    """Step (fractional) at which val loss first reaches <= target, linearly interpolated
    between the validation points around the crossing; None if never reached."""
    return _crossing(run, target, lambda point: point[0])


def _print_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def load_runs(
    paths: Iterable[str | Path],
    *,
    strict: bool = False,
    allow_incomplete: bool = False,
    batch_tokens: int | None = None,
    label: str | None = None,
    warn: Callable[[str], None] = _print_stderr,
) -> list[Run]:
    """Parse several logs into runs, each counted once, grouped by configuration (label_groups).

    The same file given twice, a copy of a log (the same run id) and a run with its continuations (a log
    resumed from its checkpoint, which carries the run before it) are one run; `warn` says what was merged.
    Then an unfinished log (not ended: the run was killed or interrupted, or is still running) is reported as
    "skipped unfinished log PATH (last step S/N)", and a log that cannot be parsed (empty, foreign, broken) as
    "skipped PATH: problem"; both are left out. strict=True raises LogError for either instead.
    allow_incomplete=True keeps unfinished logs (ended=False). batch_tokens and label are passed to parse_log.
    """
    parsed = []
    for path in paths:
        try:
            parsed.append(parse_log(path, allow_incomplete=True, batch_tokens=batch_tokens, label=label))
        except LogError as exc:
            if strict:
                raise
            warn(f"skipped {exc}")
    runs = []
    for run in distinct_runs(parsed, warn):
        if not run.ended and not allow_incomplete:
            if strict:
                parse_log(run.path, batch_tokens=batch_tokens, label=label)  # raises, naming what is missing
            warn(f"skipped unfinished log {run.path} ({progress(run)})")
            continue
        runs.append(run)
    label_groups(runs, label)
    return runs


def distinct_runs(runs: Sequence[Run], warn: Callable[[str], None] = _print_stderr) -> list[Run]:
    """Each run once: a path given twice and a copy of a log (the same run id) are counted once, and a log that
    another log continues (resumed from its checkpoint) is merged into that continuation, whose validation
    points it lends where the continuation lacks them (logs from before continuations carried their past)."""
    by_id: dict[str, Run] = {}
    for run in runs:
        if run.run_id in by_id:
            first = by_id[run.run_id]
            same = first.path.resolve() == run.path.resolve()
            warn(f"counted once: {run.path} is " + ("given twice" if same else f"a copy of {first.path} (run id "
                                                                             f"{run.run_id})"))
            continue
        by_id[run.run_id] = run
    for run in list(by_id.values()):
        parent = by_id.get(run.resumed_run or "")
        if parent is None or parent is run:
            continue
        earlier = [point for point in parent.val if point[0] < (run.resumed_step or 0) and
                   all(point[0] != own[0] for own in run.val)]
        run.val = sorted(earlier + run.val)
        del by_id[parent.run_id]
        warn(f"merged {parent.path} into its continuation {run.path} (resumed at step {run.resumed_step})")
    return list(by_id.values())


def label_groups(runs: Sequence[Run], label: str | None = None) -> None:
    """Set each run's group from its group_key: runs of one configuration (every field but the seed and where
    outputs go; for modded-nanogpt logs, the same code) share a group. A baseline's only group is named as
    before ("M", or "M (tied_embed=True)" for an architecture variant); several groups of one baseline are named
    by the fields in which they differ ("M (muon_lr=0.1)"). modded-nanogpt groups take `label` when given."""
    by_baseline: dict[str, dict[tuple, Run]] = {}
    for run in runs:
        by_baseline.setdefault(run.baseline, {}).setdefault(run.group_key, run)
    names: dict[tuple, str] = {}
    for baseline, groups in by_baseline.items():
        if baseline == MODDED_FORMAT:
            for n, (key, run) in enumerate(groups.items()):
                base = label or f"{MODDED_FORMAT}:{run.path.stem}"
                names[key] = base if len(groups) == 1 or not label else f"{base} ({n + 1})"
            continue
        configs = {key: json.loads(key[2]) for key in groups}
        varying = {k for c in configs.values() for k in c if len({json.dumps(o.get(k)) for o in configs.values()}) > 1}
        for key, config in configs.items():
            arch = [k for k, v in ARCH_DEFAULTS[baseline].items() if k in config and not _same_value(config[k], v)]
            shown = arch + sorted(varying - set(ARCH_DEFAULTS[baseline]))
            named = ", ".join(f"{k}={_format_value(config.get(k))}" for k in shown)
            names[key] = f"{baseline} ({named})" if named else baseline
    for run in runs:
        run.group = names[run.group_key]


def _fmt_loss(name: str, value: float | None) -> str:
    return f"{name}={value:.4f}" if value is not None else f"{name}=-"


def summary_line(run: Run, target: float = TARGET_LOSS) -> str:
    """One human-readable line describing a run."""
    total = total_train_time_ms(run)
    reached = time_to_target(run, target)
    status = "complete" if run.complete else (f"stopped ({run.stopped})" if run.stopped else "incomplete")
    parts = [
        str(run.path),
        run.run_id,
        run.group,
        f"device={run.device}",
        f"steps={last_step(run) or 0}/{run.num_steps if run.num_steps is not None else '?'}",
        _fmt_loss("final_val_loss", final_val_loss(run)),
        _fmt_loss("train_loss", final_train_loss(run)),
        f"train_time={total / 1000:.1f}s" if total is not None else "train_time=-",
        f"time_to_{target:g}={reached / 1000:.1f}s" if reached is not None else f"time_to_{target:g}=-",
        status,
    ]
    if run.resumed_from is not None:
        parts.append(f"resumed_from={run.resumed_from}")
    if run.batch_tokens_assumed:
        parts.append(f"batch_tokens={run.batch_tokens} (assumed)")
    return "  ".join(parts)


def add_log_options(parser: argparse.ArgumentParser, label_help: str | None = None) -> None:
    """The options of every tool that reads logs: --strict, --target and the settings of logs without a config
    (modded-nanogpt's): --batch_tokens, and --label unless the tool names its groups itself (label_help None)."""
    parser.add_argument("--strict", action="store_true",
                        help="an unfinished or unparsable log is an error (exit 1) instead of being skipped")
    parser.add_argument("--skip-bad", action="store_true",
                        help="accepted for old command lines: skipping such logs is now the default")
    parser.add_argument("--target", type=finite_float, default=TARGET_LOSS, help="target val loss (default 3.28)")
    parser.add_argument("--batch_tokens", type=int, default=None, metavar="N",
                        help="tokens per step of modded-nanogpt logs, which do not record it "
                             f"(default {DEFAULT_FOREIGN_BATCH_TOKENS:,}, marked as assumed)")
    if label_help is not None:
        parser.add_argument("--label", default=None, help=label_help)


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
    return value


def check_log_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.batch_tokens is not None and args.batch_tokens <= 0:
        parser.error(f"--batch_tokens must be positive, got {args.batch_tokens}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print a one-line summary of each training log "
                                                 "(train_gpt or modded-nanogpt format).")
    parser.add_argument("logs", nargs="+", help="training log files")
    parser.add_argument("--allow-incomplete", action="store_true",
                        help="accept logs that have not ended (no '=== end of run ===' or final val line)")
    add_log_options(parser, "group label of modded-nanogpt logs (default modded-nanogpt:<file stem>)")
    args = parser.parse_args(argv)
    check_log_options(parser, args)
    failed = 0
    for path in args.logs:
        try:
            run = parse_log(path, allow_incomplete=args.allow_incomplete, batch_tokens=args.batch_tokens,
                            label=args.label)
            print(summary_line(run, args.target))
        except LogError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

r"""Run training configurations x seeds: one run after another on one GPU, or one single-GPU run
per GPU in parallel, with a progress line per finished run and every log in one folder.

Usage:

    python sweep.py --seeds 0 1 2 --out logs/sweep_arch \
        --run "A" --run "A --tied_embed=false --logit_softcap=30" \
        --run "M" --run "M --tied_embed=true --logit_softcap=0" \
        -- --train_files='data/dev/wiki_train_*.bin' --val_files='data/dev/wiki_val_*.bin' --num_iterations=300
    python sweep.py --num_seeds 8 --run M --gpus 0 1 2 3 --out logs/m8      # 4 runs at a time
    python sweep.py --num_seeds 2 --run A --cpu -- --preset=tiny            # on CPU, one at a time
    python sweep.py --num_seeds 2 --run A --run M --dry_run                 # print the commands only
    python stats.py logs/sweep_arch/*.txt                                   # statistics of a sweep

A run spec (--run) is a baseline letter (A: train_gpt_A.py, M: train_gpt_M.py, next to this
file) or the path of a training script, then that configuration's own --field=value arguments.
Arguments after "--" go to every run, before the run's own (so a run's own value wins). sweep.py
adds --seed=S and --log_dir; a spec or shared argument that sets either is refused.

Order: the first seed of every configuration, then the next seed, and so on, so a sweep cut
short still has matched pairs. Each seed starts one configuration further on (seed 0: A, B, C;
seed 1: B, C, A; ...): with as many configurations as GPUs, a configuration still visits every
GPU instead of running on the same one for every seed.

Devices: --gpus (default: the entries of CUDA_VISIBLE_DEVICES if it is set, else the GPUs
`nvidia-smi -L` lists, else the CPU). Every run is one process that sees one GPU through
CUDA_VISIBLE_DEVICES; with K GPUs and --jobs_per_gpu J, K*J runs go at a time, each new run on
the least busy GPU.

Output folder (--out):
    OUT/<baseline>_<time>_<id>.txt   the logs: every run whose log runlog.parse_log reads
                                     (a run stopped by a NaN loss included)
    OUT/<run name>.out               the run's stdout and stderr, e.g. M_tied_embed-true_seed1.out
    OUT/sweep.json                   manifest, rewritten after every finished run: per run the
                                     configuration, seed, command, exit code, log, device, wall
                                     time (paths relative to OUT)
    OUT/.runs/<run name>/            the run's --log_dir while it runs (the scripts name their
                                     log, so one folder per run tells whose log is whose); the
                                     log then moves up to OUT, unless it does not parse (a killed
                                     or crashed run), then it stays here
One folder holds one sweep: an OUT that holds another sweep's sweep.json is refused, and the same command
again completes its own sweep (after Ctrl-C, say): the runs that finished are kept, the others run again.
Every run's arguments go through its script's parse_config (scripts that define one) before anything
starts, so that a field out of range is refused at once; --gpus on a machine without GPUs is refused.

Exit code: 0 if every run succeeded, 1 if any failed (failures do not stop the other runs), 2 for
bad input (refused before anything starts), 130 after Ctrl-C or SIGTERM (running runs are killed,
the manifest keeps what finished).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from runlog import parse_log

ROOT = Path(__file__).resolve().parent
BASELINE_SCRIPTS = {"A": ROOT / "train_gpt_A.py", "M": ROOT / "train_gpt_M.py"}
RESERVED_FIELDS = ("seed", "log_dir")  # sweep.py sets these per run
MANIFEST = "sweep.json"
STAGING = ".runs"
POLL_S = 0.05
KILL_GRACE_S = 10.0
# A run is one process: variables torchrun sets would make the script join a process group.
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
_FIELD_ARG_RE = re.compile(r"--([A-Za-z_][A-Za-z0-9_]*)=(.*)", re.DOTALL)


class SweepError(ValueError):
    """Bad input, found before any run starts."""


@dataclass(frozen=True)
class Spec:
    """One configuration: a script and its own --field=value arguments."""

    label: str
    script: str
    args: tuple[str, ...]
    slug: str


@dataclass
class Job:
    """One run of one configuration with one seed."""

    index: int
    spec: Spec
    seed: int
    name: str
    argv: list[str]
    device: str | None = None  # a CUDA_VISIBLE_DEVICES entry; None on CPU
    proc: subprocess.Popen | None = None
    out_file: IO[str] | None = None
    started: float = 0.0
    wall_s: float | None = None
    sharing: int = 0  # the most runs on its device at once while it ran, itself included
    exit_code: int | None = None
    status: str = "pending"  # then "ok", "failed" or "interrupted"
    log: Path | None = None
    final_val_loss: float | None = None
    final_step: int | None = None
    error: str | None = None


def device_label(device: str | None) -> str:
    return "cpu" if device is None else f"gpu={device}"


def visible_devices(device: str | None) -> str:
    # An empty CUDA_VISIBLE_DEVICES hides every GPU, so a CPU run is a CPU run on a GPU machine too.
    return "" if device is None else device


def detect_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES's entries if set, else `nvidia-smi -L`'s indices."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [d.strip() for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    return listed_gpus()


def listed_gpus() -> list[str]:
    """The indices of the GPUs `nvidia-smi -L` lists ([] without nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return re.findall(r"^GPU (\d+):", listing, flags=re.MULTILINE)


def check_fields(specs: Sequence[Spec], seeds: Sequence[int], common: Sequence[str]) -> None:
    """Every run's arguments through its script's own parse_config, before anything runs: a field out of range
    in the last run of a sweep is refused now, not hours later. Scripts without parse_config are not imported."""
    for spec in specs:
        source = Path(spec.script).read_text(encoding="utf-8", errors="replace")
        if "def parse_config(" not in source:
            continue
        module = _script_module(spec.script)
        for seed in seeds:
            try:
                module.parse_config([*common, *spec.args, f"--seed={seed}"])
            except module.ConfigError as exc:
                raise SweepError(f"--run {spec.label!r} with --seed={seed}: {exc}".replace("\n", "; ")) from None


def _script_module(path: str):
    """A training script imported as a module (the scripts do nothing on import)."""
    sys.path.insert(0, str(Path(path).resolve().parent))
    try:
        spec = importlib.util.spec_from_file_location(f"sweep_check_{Path(path).stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # inspect (the scripts' help) finds the module's source through it
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.pop(0)


def check_field_args(args: Sequence[str], where: str) -> None:
    """Every argument is --field=value (the scripts' only form) and none sets a reserved field."""
    for arg in args:
        match = _FIELD_ARG_RE.fullmatch(arg)
        if match is None:
            raise SweepError(f"{where}: {arg!r} is not --field=value (the training scripts take only that form)")
        if match.group(1) in RESERVED_FIELDS:
            raise SweepError(f"{where} sets --{match.group(1)}, which sweep.py sets for every run "
                             f"(seeds: --seeds/--num_seeds; log folder: --out)")


def slugify(tokens: Sequence[str]) -> str:
    """A file-name-safe name of a configuration: M --tied_embed=true -> M_tied_embed-true."""
    parts = [re.sub(r"[^A-Za-z0-9._-]+", "_", t.lstrip("-").replace("=", "-")).strip("_") for t in tokens]
    return "_".join(p for p in parts if p)[:80] or "run"


def parse_spec(text: str) -> Spec:
    try:
        tokens = shlex.split(text)
    except ValueError as exc:
        raise SweepError(f"--run {text!r}: {exc}") from None
    if not tokens:
        raise SweepError("--run '': a run spec needs a baseline (A, M) or a script path")
    head, args = tokens[0], tokens[1:]
    if head in BASELINE_SCRIPTS:
        script, name = str(BASELINE_SCRIPTS[head]), head
    elif Path(head).is_file():
        script, name = head, Path(head).stem
    else:
        raise SweepError(f"--run {text!r}: {head!r} is neither a baseline "
                         f"({', '.join(BASELINE_SCRIPTS)}) nor a script file")
    check_field_args(args, f"--run {text!r}")
    return Spec(label=shlex.join(tokens), script=script, args=tuple(args), slug=slugify([name, *args]))


def make_specs(texts: Sequence[str]) -> list[Spec]:
    specs = [parse_spec(t) for t in texts]
    seen: dict[tuple[str, tuple[str, ...]], str] = {}
    for spec in specs:
        key = (spec.script, spec.args)
        if key in seen:
            raise SweepError(f"--run {spec.label!r} is the same configuration as --run {seen[key]!r}")
        seen[key] = spec.label
    # Two specs can slug alike (characters replaced, long names cut): number them apart.
    slugs = [s.slug for s in specs]
    return [Spec(s.label, s.script, s.args, f"{s.slug}_{k + 1}" if slugs.count(s.slug) > 1 else s.slug)
            for k, s in enumerate(specs)]


def plan(specs: Sequence[Spec], seeds: Sequence[int], common: Sequence[str], out: Path) -> list[Job]:
    """Every (configuration, seed) in run order: all configurations of a seed, then the next seed.

    The n-th seed starts at configuration n (mod their number): with as many configurations as
    GPUs, a fixed order would put a configuration on the same GPU for every seed.
    """
    jobs = []
    for n, seed in enumerate(seeds):
        for k in range(len(specs)):
            spec = specs[(n + k) % len(specs)]
            name = f"{spec.slug}_seed{seed}"
            argv = [sys.executable, spec.script, *common, *spec.args, f"--seed={seed}",
                    f"--log_dir={out / STAGING / name}"]
            jobs.append(Job(index=len(jobs), spec=spec, seed=seed, name=name, argv=argv))
    return jobs


def check_out(out: Path, jobs: Sequence[Job], plan_key: dict[str, Any]) -> list[Job]:
    """Refuse an --out that is a file, cannot be written, or holds another sweep. An --out that holds this same
    sweep, interrupted or with failed runs, is completed: returns the jobs it already finished (marked ok)."""
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise SweepError(f"--out {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise SweepError(f"--out {out}: {existing} cannot be written")
    if not (out / MANIFEST).exists():
        for job in jobs:
            for path in (out / f"{job.name}.out", out / STAGING / job.name):
                if path.exists():
                    raise SweepError(f"--out {out}: {path} already exists; give another --out")
        return []
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise SweepError(f"--out {out}: its {MANIFEST} cannot be read; give another --out") from None
    if {k: manifest.get(k) for k in plan_key} != plan_key:
        raise SweepError(f"--out {out}: already holds another sweep ({out / MANIFEST}); give another --out, or its "
                         f"own command to complete it")
    finished = {entry["name"]: entry for entry in manifest.get("runs", []) if entry.get("status") == "ok"
                and entry.get("log") and (out / entry["log"]).is_file()}
    done = []
    for job in jobs:
        if job.name in finished:
            entry = finished[job.name]
            job.status, job.exit_code, job.log = "ok", entry["exit_code"], out / entry["log"]
            job.wall_s, job.final_val_loss, job.final_step = (
                entry["wall_time_s"],
                entry["final_val_loss"],
                entry["final_step"],
            )
            job.device = None if entry["device"] == "cpu" else entry["CUDA_VISIBLE_DEVICES"]
            job.sharing = entry.get("sharing", 0)  # 0: a manifest written before it was kept
            done.append(job)
        else:  # a run to do again: what its killed or failed try left goes
            shutil.rmtree(out / STAGING / job.name, ignore_errors=True)
    return done


def child_env(device: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env["CUDA_VISIBLE_DEVICES"] = visible_devices(device)
    # Unbuffered, the .out file is live and the error line is its last line.
    env["PYTHONUNBUFFERED"] = "1"
    return env


def error_line(path: Path) -> str:
    """The run's last "error:" line, else its last non-empty output line."""
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no output)"
    errors = [ln for ln in lines if ln.startswith("error:")]
    line = errors[-1] if errors else (lines[-1] if lines else "(no output)")
    return line if len(line) <= 300 else line[:297] + "..."


class Sweep:
    """Runs the jobs on the devices, J at a time per device, and keeps the manifest."""

    def __init__(self, jobs: list[Job], devices: list[str | None], jobs_per_device: int, out: Path,
                 meta: dict[str, Any], report: Callable[[str], None], manifest: str = MANIFEST) -> None:
        self.jobs, self.devices, self.jobs_per_device = jobs, devices, jobs_per_device
        self.out, self.meta, self.report, self.manifest = out, meta, report, manifest
        self.running: list[Job] = []
        self.pending: deque[Job] = deque()
        self.then: Callable[[Job], list[Job]] | None = None
        self.done = 0

    def run(self, then: Callable[[Job], list[Job]] | None = None, fits: Callable[[Job], bool] | None = None) -> bool:
        """Run every job not yet done; returns False if interrupted (Ctrl-C or SIGTERM). then(job), called as each
        job ends, returns the jobs to run next (a tune's next points); a job that fits(job, sharing) turns down
        when a slot is free is not started (it stays pending): sharing is how many runs its device would then have,
        itself included."""
        self.pending, self.then = deque(j for j in self.jobs if j.status == "pending"), then
        self.done = len(self.jobs) - len(self.pending)
        self.write_manifest(interrupted=False)
        try:
            while self.pending or self.running:
                while self.pending and (slot := self.free_device()) is not None:
                    job = self.pending.popleft()
                    if fits is None or fits(job, self.load(self.devices[slot]) + 1):
                        self.start(job, self.devices[slot])
                time.sleep(POLL_S)
                for job in [j for j in self.running if j.proc is not None and j.proc.poll() is not None]:
                    self.running.remove(job)
                    self.finish(job)
        except KeyboardInterrupt:
            self.stop_all()
            self.write_manifest(interrupted=True)
            return False
        except Exception:
            self.stop_all()  # an error in a hook: no run outlives the sweep that started it
            self.write_manifest(interrupted=True)
            raise
        self.write_manifest(interrupted=False)
        return True

    def free_device(self) -> int | None:
        """Index of the least busy device with a free slot (ties: the first listed), or None if all are full."""
        load = [self.load(d) for d in self.devices]
        best = min(range(len(self.devices)), key=load.__getitem__)
        return best if load[best] < self.jobs_per_device else None

    def load(self, device: str | None) -> int:
        return sum(j.device == device for j in self.running)

    def start(self, job: Job, device: str | None) -> None:
        job.device = device
        (self.out / STAGING / job.name).mkdir(parents=True)
        job.out_file = open(self.out / f"{job.name}.out", "w", encoding="utf-8")
        job.started = time.monotonic()
        try:
            job.proc = subprocess.Popen(job.argv, stdout=job.out_file, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=child_env(device), start_new_session=True)
        except OSError as exc:
            job.out_file.write(f"error: cannot start {job.argv[0]}: {exc}\n")
            self.finish(job, exit_code=127)
            return
        self.running.append(job)
        sharing = self.load(device)
        for other in self.running:
            if other.device == device:
                other.sharing = max(other.sharing, sharing)

    def finish(self, job: Job, exit_code: int | None = None) -> None:
        job.wall_s = time.monotonic() - job.started
        job.exit_code = job.proc.returncode if exit_code is None else exit_code
        if job.out_file is not None:
            job.out_file.close()
        self.collect_log(job)
        _remove_empty_dirs(self.out / STAGING / job.name)
        if job.exit_code != 0:
            job.status, job.error = "failed", error_line(self.out / f"{job.name}.out")
        elif job.status != "ok":
            job.status = "failed"
        self.done += 1
        self.report(self.progress_line(job))
        self.write_manifest(interrupted=False)
        if self.then is not None:
            following = self.then(job)
            self.jobs.extend(following)
            self.pending.extend(following)

    def collect_log(self, job: Job) -> None:
        """Move the run's log up to OUT if it parses; status "ok" needs a complete log."""
        staging = self.out / STAGING / job.name
        logs = sorted(staging.glob("*.txt"))
        if len(logs) != 1:
            job.error = f"{len(logs)} logs in {staging}, expected one"
            return
        job.log = logs[0]
        try:
            run = parse_log(logs[0])
        except (ValueError, OSError) as exc:  # runlog's LogError is a ValueError
            job.error = f"the log does not parse: {exc}"
            return
        job.log = self.out / logs[0].name
        os.replace(logs[0], job.log)
        if logs[0].with_suffix(".jsonl").exists():  # the run's records for other tools go with it
            os.replace(logs[0].with_suffix(".jsonl"), job.log.with_suffix(".jsonl"))
        if run.val:
            job.final_step, job.final_val_loss = run.val[-1][0], run.val[-1][1]
        if run.complete:
            job.status = "ok"
        else:
            job.error = f"the log ends with stopped: {run.stopped}"

    def progress_line(self, job: Job) -> str:
        head = f"[{self.done}/{len(self.jobs)}] {job.spec.label} seed={job.seed} {device_label(job.device)}:"
        if job.status == "ok":
            result = ("no val_loss" if job.final_val_loss is None
                      else f"val_loss {job.final_val_loss:.4f} at step {job.final_step}")
            return f"{head} {result}, {job.wall_s:.1f} s, {job.log}"
        how = f"signal {-job.exit_code}" if job.exit_code < 0 else f"exit {job.exit_code}"
        return f"{head} FAILED ({how}): {job.error}, {job.wall_s:.1f} s, {self.out / f'{job.name}.out'}"

    def stop_all(self) -> None:
        """SIGTERM every running run's process group, SIGKILL what is left after the grace period."""
        for job in self.running:
            _signal_group(job.proc, signal.SIGTERM)
        deadline = time.monotonic() + KILL_GRACE_S
        try:
            while any(j.proc.poll() is None for j in self.running) and time.monotonic() < deadline:
                time.sleep(POLL_S)
        except KeyboardInterrupt:
            pass  # a second Ctrl-C: no more waiting, kill now
        for job in self.running:
            _signal_group(job.proc, signal.SIGKILL)
            job.proc.wait()
            job.wall_s = time.monotonic() - job.started
            job.exit_code = job.proc.returncode
            job.status = "interrupted"
            job.out_file.close()
            logs = sorted((self.out / STAGING / job.name).glob("*.txt"))
            job.log = logs[0] if logs else None
            _remove_empty_dirs(self.out / STAGING / job.name)
        self.report(f"interrupted: killed {len(self.running)} running run(s), "
                    f"{sum(j.status == 'pending' for j in self.jobs)} not started")
        self.running = []

    def write_manifest(self, interrupted: bool) -> None:
        runs = [self.manifest_entry(j) for j in self.jobs if j.status != "pending" and j not in self.running]
        finished = sum(r["status"] != "interrupted" for r in runs)
        data = {**self.meta, "planned": len(self.jobs), "finished": finished, "interrupted": interrupted, "runs": runs}
        tmp = self.out / f".{self.manifest}.tmp"
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        # Replaced in one step: a sweep killed while writing leaves the previous manifest, not half of one.
        os.replace(tmp, self.out / self.manifest)

    def manifest_entry(self, job: Job) -> dict[str, Any]:
        def rel(path: Path | None) -> str | None:
            return None if path is None else os.path.relpath(path, self.out)

        return {
            "configuration": job.spec.label,
            "seed": job.seed,
            "name": job.name,
            "status": job.status,
            "exit_code": job.exit_code,
            "log": rel(job.log),
            "output": rel(self.out / f"{job.name}.out"),
            "device": device_label(job.device),
            "CUDA_VISIBLE_DEVICES": visible_devices(job.device),
            "wall_time_s": None if job.wall_s is None else round(job.wall_s, 3),
            "sharing": job.sharing,
            "final_val_loss": job.final_val_loss,
            "final_step": job.final_step,
            "error": job.error,
            "command": job.argv,
        }


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    # Each run leads its own process group: the signal reaches its compile workers too.
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _remove_empty_dirs(*paths: Path) -> None:
    for path in paths:
        try:
            path.rmdir()
        except OSError:
            return


def summary(jobs: Sequence[Job], specs: Sequence[Spec]) -> str:
    """Per configuration: runs succeeded of planned, failed, mean final val loss of the succeeded runs."""
    rows = [["configuration", "done", "failed", "mean val_loss"]]
    for spec in specs:
        mine = [j for j in jobs if j.spec is spec]
        ok = [j for j in mine if j.status == "ok"]
        losses = [j.final_val_loss for j in ok if j.final_val_loss is not None and math.isfinite(j.final_val_loss)]
        rows.append([spec.label, f"{len(ok)}/{len(mine)}", str(sum(j.status == "failed" for j in mine)),
                     f"{sum(losses) / len(losses):.4f}" if losses else "-"])
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def dry_run_lines(jobs: Sequence[Job], devices: Sequence[str | None], jobs_per_device: int) -> list[str]:
    at_once = len(devices) * jobs_per_device
    where = "cpu" if devices == [None] else "gpu " + ", ".join(d for d in devices if d is not None)
    lines = [f"# {len(jobs)} runs, {at_once} at a time on {where}; devices as assigned if all runs take equal time"]
    for job in jobs:
        # Equal durations: each wave of len(devices) * J runs takes the devices round-robin.
        device = devices[job.index % len(devices)]
        lines.append(f"CUDA_VISIBLE_DEVICES={shlex.quote(visible_devices(device))} {shlex.join(job.argv)}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sweep.py",
        usage="%(prog)s (--seeds S [S ...] | --num_seeds N) --run SPEC [--run SPEC ...] [options] [-- ARGS...]",
        description="Run training configurations x seeds, one single-GPU process per run: one after another on "
                    "one GPU (or the CPU), K at a time on K GPUs. Arguments after -- go to every run.",
        epilog="Example: python sweep.py --seeds 0 1 2 --out logs/sweep_arch --run A "
               "--run 'M --tied_embed=true --logit_softcap=0' -- --num_iterations=300. "
               "Then: python stats.py logs/sweep_arch/*.txt. Exit code: 0 all runs succeeded, 1 some failed, "
               "2 bad input, 130 interrupted.",
    )
    parser.add_argument("--run", action="append", default=[], metavar="SPEC",
                        help="a configuration: baseline letter (A, M) or a script path, then its own --field=value "
                             "arguments, in one quoted string; repeat for several")
    seeds = parser.add_mutually_exclusive_group(required=True)
    seeds.add_argument("--seeds", type=int, nargs="+", metavar="S", help="the seeds to run")
    seeds.add_argument("--num_seeds", type=int, metavar="N", help="run seeds 0 .. N-1")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="folder of the logs, outputs and sweep.json (default logs/sweep_<time>)")
    devices = parser.add_mutually_exclusive_group()
    devices.add_argument("--gpus", nargs="+", metavar="ID",
                         help="CUDA_VISIBLE_DEVICES entries to run on, one run per GPU at a time (default: "
                              "CUDA_VISIBLE_DEVICES's entries if set, else the GPUs nvidia-smi -L lists, else CPU)")
    devices.add_argument("--cpu", action="store_true", help="run on the CPU, with no GPU visible")
    parser.add_argument("--jobs_per_gpu", type=int, default=1, metavar="J",
                        help="concurrent runs per GPU (or on the CPU), default 1; J>1 overlaps the compile time of "
                             "short runs, but then step times are not comparable between runs")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the commands with their CUDA_VISIBLE_DEVICES and exit")
    return parser


def configure(argv: Sequence[str]) -> tuple[argparse.Namespace, list[Spec], list[Job], list[str | None]]:
    """Parse and check everything; raises SweepError (or SystemExit from argparse) before anything runs."""
    argv = list(argv)
    common = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    args = build_parser().parse_args(own)
    if not args.run:
        raise SweepError("no --run given: name at least one configuration, e.g. --run A")
    if args.jobs_per_gpu < 1:
        raise SweepError(f"--jobs_per_gpu {args.jobs_per_gpu}: must be at least 1")
    if args.num_seeds is not None and args.num_seeds < 1:
        raise SweepError(f"--num_seeds {args.num_seeds}: must be at least 1")
    seeds = args.seeds if args.seeds is not None else list(range(args.num_seeds))
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"--seeds {' '.join(map(str, seeds))}: a seed is given twice")
    if args.gpus is not None:
        if bad := [g for g in args.gpus if not re.fullmatch(r"[A-Za-z0-9_:.-]+", g)]:
            raise SweepError(f"--gpus {bad[0]!r}: not a CUDA_VISIBLE_DEVICES entry (give one ID per argument)")
        if len(set(args.gpus)) != len(args.gpus):
            raise SweepError(f"--gpus {' '.join(args.gpus)}: a GPU is given twice")
    check_field_args(common, "the arguments after --")
    specs = make_specs(args.run)
    out = args.out if args.out is not None else Path("logs") / f"sweep_{time.strftime('%Y%m%d-%H%M%S')}"
    args.out = out
    jobs = plan(specs, seeds, common, out)
    args.plan_key = {"configurations": [s.label for s in specs], "seeds": seeds, "common_args": common}
    args.already_done = check_out(out, jobs, args.plan_key)
    check_fields(specs, seeds, common)
    if args.gpus is not None and not listed_gpus() and not os.environ.get("CUDA_VISIBLE_DEVICES", "").strip():
        raise SweepError(f"--gpus {' '.join(args.gpus)}: this machine has no GPU (nvidia-smi lists none); run on the "
                         "CPU with --cpu")
    gpus = detect_gpus() if args.gpus is None and not args.cpu else (args.gpus or [])
    devices: list[str | None] = list(gpus) if gpus else [None]
    args.common, args.seed_list = common, seeds
    return args, specs, jobs, devices


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args, specs, jobs, devices = configure(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), message already printed
        return int(exc.code or 0)
    except SweepError as exc:
        print(f"sweep.py: error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print("\n".join(dry_run_lines(jobs, devices, args.jobs_per_gpu)))
        return 0

    out: Path = args.out
    (out / STAGING).mkdir(parents=True, exist_ok=True)
    meta = {"cwd": os.getcwd(), "argv": ["sweep.py", *argv], "configurations": [s.label for s in specs],
            "seeds": args.seed_list, "common_args": args.common,
            "devices": [device_label(d) for d in devices], "jobs_per_gpu": args.jobs_per_gpu,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    print(f"sweep: {len(jobs)} runs ({_count(len(specs), 'configuration')} x {_count(len(args.seed_list), 'seed')}), "
          f"{len(devices) * args.jobs_per_gpu} at a time on {', '.join(meta['devices'])}; output in {out}", flush=True)
    if args.already_done:
        print(f"completing the sweep in {out}: {len(args.already_done)} of {len(jobs)} runs already done", flush=True)
    sweep = Sweep(jobs, devices, args.jobs_per_gpu, out, meta, lambda line: print(line, flush=True))

    # SIGTERM (a scheduler, kill) stops the sweep as Ctrl-C does, and Ctrl-C does so even where the sweep
    # was started with SIGINT ignored (a background job of a non-interactive shell); only the main
    # thread may set handlers.
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_interrupt),
                    signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler)}
    try:
        completed = sweep.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _remove_empty_dirs(out / STAGING)

    print()
    print(summary(jobs, specs))
    print(f"logs: {out}/*.txt (python stats.py {out}/*.txt); manifest: {out / MANIFEST}")
    if not completed:
        return 130
    return 0 if all(j.status == "ok" for j in jobs) else 1


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())

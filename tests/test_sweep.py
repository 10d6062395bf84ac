"""Tests of sweep.py: the orchestration with a stub training script, and one sweep of the real
train_gpt_A.py on CPU.

Run from the repository root:

    python -m pytest -q tests/test_sweep.py

The stub takes --field=value arguments as the training scripts do, appends a start and an end
record (its seed, tag, CUDA_VISIBLE_DEVICES, pid, times) to the file named by --record, sleeps
--sleep_ms (default a random 1-10 ms), then either fails (--fail=true: an "error:" line on
stderr, exit 1) or writes a minimal log of the format runlog.parse_log reads, with final val
loss 5 + seed / 100, into --log_dir.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import sweep  # noqa: E402
from runlog import parse_log  # noqa: E402

STUB = r'''
import json, os, random, sys, time, uuid

args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
seed = int(args["seed"])


def note(event):
    if "record" in args:
        entry = {"event": event, "seed": seed, "tag": args.get("tag", ""), "pid": os.getpid(),
                 "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "t": time.time()}
        with open(args["record"], "a") as f:
            f.write(json.dumps(entry) + "\n")


note("start")
time.sleep(float(args.get("sleep_ms", random.uniform(1, 10))) / 1000)
if args.get("fail") == "true" or os.path.exists(args.get("fail_if", "/nonexistent")):
    note("end")
    print("training...")
    print("error: failing on purpose", file=sys.stderr)
    sys.exit(1)
run_id = f"A_{time.strftime('%Y%m%d-%H%M%S')}_{uuid.uuid4().hex[:6]}"
config = {"batch_tokens": 1024, "num_iterations": 3, "seed": seed, "tag": args.get("tag", "")}
lines = [f"run_id: {run_id}", "baseline: A", "script: stub.py", "date: 2026-01-01T00:00:00Z",
         "command: stub.py " + " ".join(sys.argv[1:]), "=== source: stub.py ===", "# stub",
         "=== end of source ===", "config: " + json.dumps(config), "device: cpu", "=== training ===",
         "step:3/3 train_time:30ms step_avg:10.00ms",
         f"step:3/3 val_loss:{5 + seed / 100:.4f} train_time:30ms step_avg:10.00ms", "=== end of run ==="]
os.makedirs(args["log_dir"], exist_ok=True)
with open(os.path.join(args["log_dir"], run_id + ".txt"), "w") as f:
    f.write("\n".join(lines) + "\n")
print("log written")
note("end")
'''


@pytest.fixture(autouse=True)
def gpus(monkeypatch):
    """Six GPUs as nvidia-smi would list them (the tests run the stub, which needs none)."""
    monkeypatch.setattr(sweep, "listed_gpus", lambda: [str(i) for i in range(6)])


@pytest.fixture
def stub(tmp_path) -> str:
    path = tmp_path / "stub.py"
    path.write_text(STUB)
    return str(path)


@pytest.fixture
def record(tmp_path) -> Path:
    return tmp_path / "record.jsonl"


def run_sweep(capsys, *argv: str) -> tuple[int, str, str]:
    code = sweep.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def events(record: Path, event: str) -> list[dict]:
    return [e for e in map(json.loads, record.read_text().splitlines()) if e["event"] == event]


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one time."""
    points = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals], key=lambda p: (p[0], p[1]))
    depth = best = 0
    for _, step in points:
        depth += step
        best = max(best, depth)
    return best


def intervals_by_gpu(record: Path) -> dict[str, list[tuple[float, float]]]:
    starts = {e["pid"]: e for e in events(record, "start")}
    by_gpu: dict[str, list[tuple[float, float]]] = {}
    for end in events(record, "end"):
        by_gpu.setdefault(end["gpu"], []).append((starts[end["pid"]]["t"], end["t"]))
    return by_gpu


def test_runs_go_seed_by_seed_each_seed_one_configuration_further(capsys, tmp_path, stub, record):
    code, _, _ = run_sweep(capsys, "--seeds", 3, 1, "--out", tmp_path / "out", "--gpus", 0,
                           "--run", f"{stub} --tag=a", "--run", f"{stub} --tag=b", "--run", f"{stub} --tag=c",
                           "--", f"--record={record}")
    assert code == 0
    assert [(e["seed"], e["tag"]) for e in events(record, "start")] == [
        (3, "a"), (3, "b"), (3, "c"), (1, "b"), (1, "c"), (1, "a")]


def test_every_run_sees_exactly_one_listed_gpu(capsys, tmp_path, stub, record):
    run_sweep(capsys, "--num_seeds", 4, "--out", tmp_path / "out", "--gpus", 0, 1,
              "--run", f"{stub} --tag=a", "--run", f"{stub} --tag=b", "--", f"--record={record}")
    gpus = [e["gpu"] for e in events(record, "start")]
    assert (len(gpus), set(gpus) <= {"0", "1"}) == (8, True)


def test_at_most_jobs_per_gpu_runs_share_a_gpu(capsys, tmp_path, stub, record):
    run_sweep(capsys, "--num_seeds", 6, "--out", tmp_path / "out", "--gpus", 0, 1, "--jobs_per_gpu", 2,
              "--run", f"{stub} --tag=a", "--", f"--record={record}", "--sleep_ms=150")
    assert max(max_overlap(iv) for iv in intervals_by_gpu(record).values()) <= 2


def test_runs_on_different_gpus_overlap(capsys, tmp_path, stub, record):
    run_sweep(capsys, "--num_seeds", 2, "--out", tmp_path / "out", "--gpus", 0, 1,
              "--run", f"{stub} --tag=a", "--", f"--record={record}", "--sleep_ms=800")
    assert max_overlap([iv for ivs in intervals_by_gpu(record).values() for iv in ivs]) == 2


def test_cpu_runs_hide_every_gpu(capsys, tmp_path, stub, record):
    run_sweep(capsys, "--num_seeds", 2, "--out", tmp_path / "out", "--cpu",
              "--run", f"{stub} --tag=a", "--", f"--record={record}")
    assert [e["gpu"] for e in events(record, "start")] == ["", ""]


def test_one_progress_line_per_finished_run(capsys, tmp_path, stub):
    out = tmp_path / "out"
    _, stdout, _ = run_sweep(capsys, "--seeds", 0, 1, "--out", out, "--gpus", 0,
                             "--run", f"{stub} --tag=a", "--run", f"{stub} --tag=b")
    progress = [ln for ln in stdout.splitlines() if ln.startswith("[")]
    pattern = (rf"\[(\d)/4\] {re.escape(stub)} --tag=[ab] seed=[01] gpu=0: val_loss 5\.0[01]00 at step 3, "
               rf"\d+\.\d s, {re.escape(str(out))}/A_\S+\.txt")
    assert [re.fullmatch(pattern, ln).group(1) for ln in progress] == ["1", "2", "3", "4"]


def test_failed_run_reported_and_the_others_complete(capsys, tmp_path, stub):
    out = tmp_path / "out"
    code, stdout, _ = run_sweep(capsys, "--num_seeds", 2, "--out", out, "--gpus", 0,
                                "--run", f"{stub} --tag=good", "--run", f"{stub} --tag=bad --fail=true")
    failed = [ln for ln in stdout.splitlines() if "FAILED" in ln]
    assert (code, len(list(out.glob("*.txt"))), len(failed)) == (1, 2, 2)
    assert all("FAILED (exit 1): error: failing on purpose" in ln for ln in failed)


def test_manifest_records_every_run(capsys, tmp_path, stub):
    out = tmp_path / "out"
    run_sweep(capsys, "--seeds", 0, 1, "--out", out, "--gpus", 0,
              "--run", f"{stub} --tag=good", "--run", f"{stub} --tag=bad --fail=true")
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    summary = [(r["configuration"].split()[-1], r["seed"], r["status"], r["exit_code"], r["device"],
                r["CUDA_VISIBLE_DEVICES"], r["command"][-2], r["log"] is not None and
                parse_log(out / r["log"]).config["seed"]) for r in runs]
    assert summary == [("--tag=good", 0, "ok", 0, "gpu=0", "0", "--seed=0", 0),
                       ("--fail=true", 0, "failed", 1, "gpu=0", "0", "--seed=0", False),
                       ("--fail=true", 1, "failed", 1, "gpu=0", "0", "--seed=1", False),
                       ("--tag=good", 1, "ok", 0, "gpu=0", "0", "--seed=1", 1)]


def test_outputs_gathered_in_the_out_folder(capsys, tmp_path, stub):
    out = tmp_path / "out"
    run_sweep(capsys, "--num_seeds", 2, "--out", out, "--gpus", 0, "--run", f"{stub} --tag=x")
    assert sorted(p.suffix for p in out.iterdir()) == [".json", ".out", ".out", ".txt", ".txt"]


def test_summary_gives_mean_final_val_loss_per_configuration(capsys, tmp_path, stub):
    _, stdout, _ = run_sweep(capsys, "--seeds", 0, 2, "--out", tmp_path / "out", "--gpus", 0,
                             "--run", f"{stub} --tag=a", "--run", f"{stub} --tag=b --fail=true")
    rows = [ln.split()[-3:] for ln in stdout.splitlines() if ln.startswith(stub)]
    assert rows == [["2/2", "0", "5.0100"], ["0/2", "2", "-"]]


def test_dry_run_prints_commands_and_runs_nothing(capsys, tmp_path, stub):
    out = tmp_path / "out"
    code, stdout, _ = run_sweep(capsys, "--num_seeds", 2, "--out", out, "--gpus", 4, 5, "--dry_run",
                                "--run", f"{stub} --tag=a", "--run", f"{stub} --tag=b", "--", "--lr=0.1")
    commands = [ln for ln in stdout.splitlines() if not ln.startswith("#")]
    expected = [f"CUDA_VISIBLE_DEVICES={gpu} {sys.executable} {stub} --lr=0.1 --tag={tag} --seed={seed} "
                f"--log_dir={out}/.runs/stub_tag-{tag}_seed{seed}"
                for gpu, tag, seed in [(4, "a", 0), (5, "b", 0), (4, "b", 1), (5, "a", 1)]]
    assert (code, commands, out.exists()) == (0, expected, False)


@pytest.mark.parametrize("argv, message", [
    (["--num_seeds", "2", "--run", "X"], "neither a baseline"),
    (["--num_seeds", "2", "--run", "no/such/script.py"], "neither a baseline"),
    (["--num_seeds", "2", "--run", ""], "needs a baseline"),
    (["--num_seeds", "2"], "no --run"),
    (["--seeds", "0", "1", "0", "--run", "A"], "a seed is given twice"),
    (["--num_seeds", "0", "--run", "A"], "--num_seeds 0"),
    (["--num_seeds", "2", "--run", "A --seed=3"], "sets --seed"),
    (["--num_seeds", "2", "--run", "M --log_dir=elsewhere"], "sets --log_dir"),
    (["--num_seeds", "2", "--run", "A", "--", "--seed=3"], "sets --seed"),
    (["--num_seeds", "2", "--run", "A --lr 0.1"], "is not --field=value"),
    (["--num_seeds", "2", "--run", "A", "--run", "A"], "same configuration"),
    (["--num_seeds", "2", "--run", "A", "--jobs_per_gpu", "0"], "--jobs_per_gpu 0"),
    (["--num_seeds", "2", "--run", "A", "--gpus", "0", "0"], "a GPU is given twice"),
    (["--num_seeds", "2", "--run", "A", "--gpus", "0,1"], "not a CUDA_VISIBLE_DEVICES entry"),
    (["--num_seeds", "2", "--run", "A", "--gpus", "0", "--cpu"], "not allowed with"),
    (["--run", "A"], "required"),
])
def test_bad_input_refused_before_anything_starts(capsys, tmp_path, argv, message):
    out = tmp_path / "out"
    code, _, stderr = run_sweep(capsys, *argv, "--out", out)
    assert (code, message in stderr, out.exists()) == (2, True, False)


def test_folder_holding_another_sweep_refused(capsys, tmp_path):
    (tmp_path / "sweep.json").write_text("{}")
    code, _, stderr = run_sweep(capsys, "--num_seeds", 1, "--run", "A", "--out", tmp_path)
    assert (code, "already holds another sweep" in stderr) == (2, True)


def test_the_same_command_completes_its_own_sweep(capsys, tmp_path, stub, record):
    """Runs that finished are kept; the failed ones (here: while a file exists) run again, the others do not."""
    out, blocker = tmp_path / "out", tmp_path / "blocker"
    blocker.touch()
    argv = ["--seeds", 0, 1, "--out", out, "--gpus", 0, "--run", f"{stub} --tag=a", "--run", f"{stub} --tag=b "
            f"--fail_if={blocker}", "--", f"--record={record}"]
    assert run_sweep(capsys, *argv)[0] == 1
    blocker.unlink()
    code, stdout, _ = run_sweep(capsys, *argv)
    assert code == 0 and "completing the sweep in" in stdout and "2 of 4 runs already done" in stdout
    starts = [(e["tag"], e["seed"]) for e in events(record, "start")]
    assert sorted(starts[4:]) == [("b", 0), ("b", 1)] and len(starts) == 6
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert len(runs) == 4 and {r["status"] for r in runs} == {"ok"} and len(list(out.glob("*.txt"))) == 4


@pytest.mark.parametrize("run, message", [("M --muon_lr=-1", "--muon_lr=-1.0 is out of range"),
                                          ("A --muon_lr=0.1", "unknown field --muon_lr")])
def test_every_runs_fields_are_checked_before_anything_starts(capsys, tmp_path, run, message):
    out = tmp_path / "out"
    code, _, stderr = run_sweep(capsys, "--num_seeds", 2, "--run", "A", "--run", run, "--out", out)
    assert (code, message in stderr, out.exists()) == (2, True, False)


def test_gpus_on_a_machine_without_gpus_refused(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "listed_gpus", lambda: [])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    code, _, stderr = run_sweep(capsys, "--num_seeds", 1, "--run", "A", "--gpus", 0, "--out", tmp_path / "out")
    assert (code, "this machine has no GPU" in stderr) == (2, True)


def test_default_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert sweep.detect_gpus() == ["2", "3"]


def test_interrupt_kills_the_running_run_and_keeps_the_manifest(tmp_path, stub, record):
    out = tmp_path / "out"
    argv = [sys.executable, str(ROOT / "sweep.py"), "--num_seeds", "1", "--out", str(out), "--cpu",
            "--run", f"{stub} --tag=fast", "--run", f"{stub} --tag=slow --sleep_ms=60000", "--", f"--record={record}"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30  # generous: a loaded CI machine starts processes slowly
    while time.monotonic() < deadline and not (record.exists() and "slow" in record.read_text()):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=60)
    slow_pid = [e["pid"] for e in events(record, "start") if e["tag"] == "slow"][0]
    statuses = [r["status"] for r in json.loads((out / "sweep.json").read_text())["runs"]]
    assert (code, statuses, _alive(slow_pid)) == (130, ["ok", "interrupted"], False)


def test_interrupt_works_when_started_with_sigint_ignored(tmp_path, stub, record):
    """A background job of a non-interactive shell starts with SIGINT ignored; Ctrl-C must still stop
    the sweep (and its runs) rather than being lost."""
    out = tmp_path / "out"
    argv = [sys.executable, str(ROOT / "sweep.py"), "--num_seeds", "1", "--out", str(out), "--cpu",
            "--run", f"{stub} --tag=slow --sleep_ms=60000", "--", f"--record={record}"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (record.exists() and "slow" in record.read_text()):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=30)
    finally:
        proc.kill()
    assert code == 130


def test_each_run_records_how_many_runs_shared_its_device(tmp_path, stub, record):
    """fits(job, sharing) is asked with the runs its device would then hold, itself included; a job keeps the most
    runs its device held at once while it ran (in the manifest too): two at a time, then one at a time."""
    for per_device, expected in ((2, [1, 2]), (1, [1, 1])):
        out = tmp_path / f"out{per_device}"
        (out / sweep.STAGING).mkdir(parents=True)
        jobs = sweep.plan(sweep.make_specs([f"{stub} --tag=a", f"{stub} --tag=b"]), [0],
                          [f"--record={record}", "--sleep_ms=300"], out)
        asked = []
        runner = sweep.Sweep(jobs, [None], per_device, out, {}, lambda line: None)
        assert runner.run(fits=lambda job, sharing: asked.append(sharing) or True)
        manifest = json.loads((out / "sweep.json").read_text())["runs"]
        assert asked == expected and [j.sharing for j in jobs] == [max(expected)] * 2
        assert [r["sharing"] for r in manifest] == [max(expected)] * 2


def test_the_next_jobs_and_the_jobs_turned_down_and_an_error_in_a_hook(tmp_path, stub, record):
    """Sweep.run's hooks: jobs that then(job) returns run after it; a job that fits(job) turns down is not
    started; an error in a hook stops the runs in flight (none outlives the sweep) and reaches the caller."""
    out = tmp_path / "out"
    (out / sweep.STAGING).mkdir(parents=True)
    specs = sweep.make_specs([f"{stub} --tag=first", f"{stub} --tag=slow --sleep_ms=60000"])
    first, _ = sweep.plan(specs, [0], [f"--record={record}"], out)
    later = sweep.plan(sweep.make_specs([f"{stub} --tag=later", f"{stub} --tag=refused"]), [1],
                       [f"--record={record}"], out)
    runner = sweep.Sweep([first], [None], 2, out, {}, lambda line: None)
    assert runner.run(then=lambda job: later if job is first else [], fits=lambda job, _: "refused" not in job.name)
    assert [e["tag"] for e in events(record, "end")] == ["first", "later"] and later[1].status == "pending"

    def boom(job):
        raise RuntimeError("a bug in the hook")
    record.unlink()
    runner = sweep.Sweep(sweep.plan(specs, [2], [f"--record={record}"], out), [None], 2, out, {}, lambda line: None)
    with pytest.raises(RuntimeError, match="a bug in the hook"):
        runner.run(then=boom)
    slow_pid = [e["pid"] for e in events(record, "start") if e["tag"] == "slow"][0]
    assert not _alive(slow_pid) and json.loads((out / "sweep.json").read_text())["interrupted"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_real_script_two_seeds_on_cpu(capsys, tmp_path, monkeypatch):
    # One thread per run: the two runs share the CPU instead of fighting over it.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)  # the tiny preset's data paths resolve from the script's folder, not from here
    code, _, _ = run_sweep(capsys, "--seeds", 0, 1, "--out", out, "--cpu", "--jobs_per_gpu", 2, "--run", "A",
                           "--", "--preset=tiny", "--num_iterations=2", "--warmup_steps=0", "--val_loss_every=0",
                           "--warmup_compile_steps=0", "--val_tokens=1024")
    assert (code, sorted(parse_log(p).config["seed"] for p in out.glob("*.txt"))) == (0, [0, 1])

"""Checkpoint and exact resume (--checkpoint_every, --resume) of both training scripts, on CPU:
an interrupted and resumed run computes what the uninterrupted run computes, also when the
checkpoint was written by 2 gloo processes and resumed by 1; foreign, other-shape and truncated
checkpoints are refused before any training step; files are written atomically."""

import importlib.util
import multiprocessing as mp
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
BASELINES = ("A", "M")
STEPS = 8  # the uninterrupted run; the interrupted one stops at STEPS // 2
HALF = STEPS // 2
RTOL = 1e-5  # the tiny preset trains in float32: one process reproduces itself to rounding
MULTI_RTOL, MULTI_ATOL = 1e-4, 5e-5  # 2 processes sum gradients in another order; Adam scales that up


def load_module(name: str, path: Path):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def script(baseline: str):
    return load_module(f"train_gpt_{baseline}", ROOT / f"train_gpt_{baseline}.py")


def args_for(tmp: Path, **overrides) -> list[str]:
    fields = {
        "preset": "tiny",
        "train_files": SAMPLE / "sample_train_*.bin",
        "val_files": SAMPLE / "sample_val_*.bin",
        "num_iterations": STEPS,
        "val_loss_every": HALF,
        "val_tokens": 2048,
        "warmup_compile_steps": 1,
        "log_dir": tmp / "logs",
        "checkpoint_dir": tmp / "ckpt",
        **overrides,
    }
    return [f"--{k}={v}" for k, v in fields.items()]


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def checkpoint_at(folder: Path, step: int) -> Path:
    (path,) = folder.glob(f"*_step{step:06d}.pt")
    return path


class Interrupted(Exception):
    """Stands for a kill right after the first checkpoint."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_worker(baseline: str, rank: int, world: int, port: int, argv: list[str], out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = script(baseline).main(argv)
    torch.save({"train_losses": result["train_losses"]}, f"{out}_{rank}.pt")


@pytest.fixture(scope="module", params=BASELINES)
def runs(request, tmp_path_factory):
    """Per script: the uninterrupted run; a run killed after its step-HALF checkpoint (os.replace
    spied on); and the run resumed from that checkpoint."""
    baseline = request.param
    mod = script(baseline)
    tmp = tmp_path_factory.mktemp(f"runs_{baseline}")
    straight = mod.main(args_for(tmp / "straight"))

    real_save, real_replace, replaced = mod.save_checkpoint, os.replace, []

    def save_then_stop(path, *args, **kwargs):
        real_save(path, *args, **kwargs)
        raise Interrupted(path)

    def spy_replace(src, dst):
        replaced.append((str(src), str(dst)))
        real_replace(src, dst)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mod, "save_checkpoint", save_then_stop)
        patch.setattr(os, "replace", spy_replace)
        with pytest.raises(Interrupted):
            mod.main(args_for(tmp / "first", checkpoint_every=HALF))
    saved = checkpoint_at(tmp / "first" / "ckpt", HALF)
    resumed = mod.main(args_for(tmp / "second", resume=saved))
    return {"baseline": baseline, "mod": mod, "tmp": tmp, "straight": straight, "saved": saved, "resumed": resumed, "replaced": replaced}


def test_resume_matches_uninterrupted_run(runs):
    straight, resumed = runs["straight"], runs["resumed"]
    assert len(straight["train_losses"]) == STEPS
    assert resumed["train_losses"] == pytest.approx(straight["train_losses"][HALF:], rel=RTOL)
    assert sorted(resumed["val_losses"]) == sorted(straight["val_losses"]) == [0, HALF, STEPS]
    assert resumed["val_losses"] == pytest.approx(straight["val_losses"], rel=RTOL)
    want = params(straight["model"])
    got = params(resumed["model"])
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=RTOL, atol=1e-7, msg=name)


def test_resumed_log_names_checkpoint_and_continues_counters(runs):
    saved_ms = torch.load(runs["saved"], weights_only=True)["train_ms"]
    assert saved_ms > 0
    text = Path(runs["resumed"]["log_path"]).read_text()
    header, training = text.split("\n=== training ===\n")
    assert f"\ngrad_accum_steps: 8\nresumed_from: {runs['saved']} step:{HALF}\n" in header
    lines = training.splitlines()
    first = re.fullmatch(rf"step:{HALF}/{STEPS} val_loss:\S+ train_time:(\d+)ms step_avg:\S+", lines[0])
    assert first and abs(int(first.group(1)) - saved_ms) < 5, lines[0]  # continues from the saved time
    times = [float(m.group(2)) for m in re.finditer(r"step:(\d+)/\d+ .*?train_time:(\d+)ms", training)]
    steps = [int(m.group(1)) for m in re.finditer(r"step:(\d+)/\d+ ", training)]
    assert steps == [HALF, *range(HALF + 1, STEPS + 1), STEPS]
    assert times == sorted(times) and times[0] >= round(saved_ms)
    assert lines[-2].startswith(f"step:{STEPS}/{STEPS} val_loss:") and lines[-1] == "=== end of run ==="
    runlog = load_module("runlog", ROOT / "runlog.py")
    run = runlog.parse_log(runs["resumed"]["log_path"])
    assert run.complete and run.resumed_from == str(runs["saved"]) and run.resumed_step == HALF


def test_checkpoint_written_through_temporary_file(runs):
    saved = str(runs["saved"])
    assert runs["replaced"] == [(saved + ".tmp", saved)]
    assert not list(runs["saved"].parent.glob("*.tmp"))
    ckpt = torch.load(saved, weights_only=True)
    assert ckpt["step"] == HALF and ckpt["baseline"] == runs["baseline"]
    assert ckpt["val_losses"] == pytest.approx({s: runs["straight"]["val_losses"][s] for s in (0, HALF)}, rel=RTOL)


def test_killed_write_leaves_previous_checkpoint_whole(runs, tmp_path, monkeypatch):
    """A kill in the middle of the second save: half a file under the .tmp name, the first intact."""
    mod, real_save = runs["mod"], torch.save
    saves = []

    def save_half_then_die(obj, f):
        saves.append(f.name)
        if len(saves) == 1:
            return real_save(obj, f)
        real_save(obj, f)
        f.truncate(f.tell() // 2)
        raise Interrupted(f.name)

    monkeypatch.setattr(torch, "save", save_half_then_die)
    with pytest.raises(Interrupted):
        mod.main(args_for(tmp_path, num_iterations=2, checkpoint_every=1, val_loss_every=0))
    monkeypatch.undo()
    first = checkpoint_at(tmp_path / "ckpt", 1)
    assert saves[1].endswith("_step000002.pt.tmp")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted([first.name, Path(saves[1]).name])
    assert mod.load_checkpoint(str(first), mod.parse_config(args_for(tmp_path, num_iterations=2)))["step"] == 1
    with pytest.raises(mod.CheckpointError, match="truncated or not a checkpoint"):
        mod.load_checkpoint(saves[1], mod.parse_config(args_for(tmp_path, num_iterations=2)))


def test_resume_at_another_world_size_keeps_batch_and_data_order(runs):
    """2 gloo processes write the step-HALF checkpoint (and train on to STEPS), 1 process resumes it."""
    baseline, tmp = runs["baseline"], runs["tmp"]
    argv, out = args_for(tmp / "two", checkpoint_every=HALF), str(tmp / "two_result")
    port, ctx = free_port(), mp.get_context("spawn")
    procs = [ctx.Process(target=rank_worker, args=(baseline, r, 2, port, argv, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    for p in procs:
        if p.exitcode is None:
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    two_losses = torch.load(f"{out}_0.pt", weights_only=True)["train_losses"]
    saved = checkpoint_at(tmp / "two" / "ckpt", HALF)
    two, one = (torch.load(p, weights_only=True) for p in (saved, runs["saved"]))
    assert two["loader"] == one["loader"] == {"file_index": 0, "pos": HALF * 1024}

    resumed = runs["mod"].main(args_for(tmp / "one", resume=saved))
    straight = runs["straight"]
    # Same state and same data: the first resumed step's loss is the 2-process run's, to rounding.
    assert resumed["train_losses"][0] == pytest.approx(two_losses[HALF], rel=RTOL)
    assert two_losses == pytest.approx(straight["train_losses"], rel=MULTI_RTOL)
    assert resumed["train_losses"] == pytest.approx(straight["train_losses"][HALF:], rel=MULTI_RTOL)
    assert resumed["val_losses"] == pytest.approx(straight["val_losses"], rel=MULTI_RTOL)
    if baseline == "M":
        return  # Muon's bfloat16 Newton-Schulz and Adam's 1e-10 eps amplify the 2-process rounding in the weights
    want, got = params(straight["model"]), params(resumed["model"])
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=MULTI_RTOL, atol=MULTI_ATOL, msg=name)


def refused(mod, monkeypatch, tmp: Path, checkpoint: Path, *extra: str) -> str:
    """The error of resuming from `checkpoint`; fails if a training step or a log file came first."""

    def no_training(self):
        raise AssertionError("a training step ran before the checkpoint was refused")

    monkeypatch.setattr(mod.TrainLoader, "next_step", no_training)
    with pytest.raises(mod.CheckpointError) as error:
        mod.main(args_for(tmp, resume=checkpoint) + list(extra))
    assert not (tmp / "logs").exists()
    return str(error.value)


def test_refuses_checkpoint_of_other_script(runs, tmp_path, monkeypatch):
    other = "M" if runs["baseline"] == "A" else "A"
    message = refused(script(other), monkeypatch, tmp_path, runs["saved"])
    assert str(runs["saved"]) in message
    assert f"checkpoint from train_gpt_{runs['baseline']}.py, this is train_gpt_{other}.py" in message


def test_refuses_other_model_shape(runs, tmp_path, monkeypatch):
    message = refused(runs["mod"], monkeypatch, tmp_path, runs["saved"], "--model_dim=32", "--num_layers=3")
    assert "model shape" in message and "model_dim=64 in the checkpoint, 32 here" in message
    assert "num_layers=2 in the checkpoint, 3 here" in message and "num_heads" not in message


def test_refuses_truncated_or_foreign_file(runs, tmp_path, monkeypatch):
    data = runs["saved"].read_bytes()
    truncated, foreign = tmp_path / "truncated.pt", tmp_path / "foreign.pt"
    truncated.write_bytes(data[: len(data) // 2])
    torch.save({"step": 3}, foreign)
    for path in (truncated, foreign):
        message = refused(runs["mod"], monkeypatch, tmp_path, path)
        assert str(path) in message and "truncated or not a checkpoint" in message
    assert "missing format" in message
    assert "no such file" in refused(runs["mod"], monkeypatch, tmp_path, tmp_path / "absent.pt")


def test_command_line_prints_refusal_without_traceback(runs, tmp_path):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(runs["saved"].read_bytes()[:1000])
    proc = subprocess.run(
        [sys.executable, ROOT / f"train_gpt_{runs['baseline']}.py", *args_for(tmp_path, resume=truncated)],
        check=False, capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {truncated}: truncated or not a checkpoint") and "Traceback" not in proc.stderr

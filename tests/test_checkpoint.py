"""Checkpoint and exact resume (--checkpoint_every, --resume) of both training scripts, on CPU:
a run resumed from a checkpoint computes what the uninterrupted run computes, also when the
checkpoint was written by 2 gloo processes and resumed by 1; foreign, other-shape, other-config and
unreadable checkpoints are refused before any training step; files are written atomically, stray
temporary files are cleaned up and only the newest --keep_checkpoints are kept."""

import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import HALF, ROOT, STEPS, interrupt_at, load_script, run_cli, tiny_args

# The mean loss of a step sums 8 micro-batch losses; 2 processes sum them in another order: a few
# float32 roundings (eps 1.2e-7) of the same numbers.
MEAN_RTOL = 1e-6


def args_for(trained, tmp: Path, **fields) -> list[str]:
    base = dict(num_iterations=STEPS, val_loss_every=HALF, val_tokens=2048, warmup_compile_steps=1,
                checkpoint_dir=tmp / "ckpt", keep_checkpoints=0)
    return tiny_args(trained["train"], trained["val"], tmp / "logs", **{**base, **fields})


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def checkpoint_at(folder: Path, step: int) -> Path:
    """The checkpoint of `step` in the checkpoint folder of the only run that wrote one there."""
    (path,) = folder.glob(f"*/step{step:06d}.pt")
    return path


class Interrupted(Exception):
    """Stands for a kill in the middle of a checkpoint write."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def record_windows(mod, into: list) -> None:
    """Spy on the loader: every step's micro-batch inputs, in the order this process reads them."""
    real = mod.TrainLoader.next_step

    def next_step(self):
        batches = real(self)
        into.append([inputs.clone() for inputs, _ in batches])
        return batches

    mod.TrainLoader.next_step = next_step


def rank_worker(baseline: str, rank: int, world: int, port: int, argv: list[str], out: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    mod, windows = load_script(baseline), []
    record_windows(mod, windows)
    result = mod.main(argv)
    torch.save({"train_losses": result["train_losses"], "windows": windows}, f"{out}_{rank}.pt")


@pytest.fixture(scope="module")
def resumed(trained, tmp_path_factory):
    """The shared run resumed from its step-HALF checkpoint, with the loader's windows recorded."""
    mod, windows = trained["mod"], []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mod.TrainLoader, "next_step", mod.TrainLoader.next_step)
        record_windows(mod, windows)
        saved = checkpoint_at(trained["tmp"] / "ckpt", HALF)
        result = mod.main(args_for(trained, tmp_path_factory.mktemp("resumed"), resume=saved))
    return {"saved": saved, "result": result, "windows": windows}


def test_resume_matches_uninterrupted_run_exactly(trained, resumed):
    """One process, same state, same data, same kernels: the same numbers, bit for bit."""
    straight, again = trained["result"], resumed["result"]
    assert len(straight["train_losses"]) == STEPS
    assert again["train_losses"] == straight["train_losses"][HALF:]
    assert again["val_losses"] == straight["val_losses"] and sorted(again["val_losses"]) == [0, HALF, STEPS]
    want, got = params(straight["model"]), params(again["model"])
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def step_lines(text: str) -> list[str]:
    """The training section's step and validation lines, without their times."""
    training = text.split("\n=== training ===\n")[1]
    return [re.sub(r" train_time:.*", "", line) for line in training.splitlines() if line.startswith("step:")]


def test_resumed_log_carries_the_run_before_it_and_continues_counters(trained, resumed):
    """The resumed log holds the checkpointed run's lines up to the checkpoint, then its own: the same step
    and validation lines as the uninterrupted run, training time counting on from the checkpoint's."""
    saved = torch.load(resumed["saved"], weights_only=True)
    assert saved["train_ms"] > 0
    text = Path(resumed["result"]["log_path"]).read_text()
    header, training = text.split("\n=== training ===\n")
    parent = Path(trained["result"]["log_path"]).stem
    assert f"\nresumed_from: {resumed['saved']} step:{HALF} run:{parent}\n" in header
    assert not re.search(r"^resume_change:", header, re.M)
    assert step_lines(text) == step_lines(Path(trained["result"]["log_path"]).read_text())
    times = [float(m.group(2)) for m in re.finditer(r"step:(\d+)/\d+ .*?train_time:(\d+)ms", training)]
    assert times == sorted(times)
    lines, history = training.splitlines(), [h[0] if isinstance(h, list) else h for h in saved["history"]]
    assert lines[: len(history)] == history and history[-1].startswith(f"step:{HALF}/{STEPS} val_loss:")
    own = re.fullmatch(
        rf"step:{HALF + 1}/{STEPS} train_loss:\S+ lr_mult:\S+ train_time:(\d+)ms .*", lines[len(history)]
    )
    assert own and int(own.group(1)) >= saved["train_ms"]  # continues from the saved time
    assert training.splitlines()[-1] == "=== end of run ==="
    import runlog

    run = runlog.parse_log(resumed["result"]["log_path"])
    assert run.complete and run.resumed_from == str(resumed["saved"]) and run.resumed_step == HALF
    assert run.resumed_run == parent


def test_checkpoints_written_through_temporary_files_into_the_runs_folder(trained):
    ckpt = trained["tmp"] / "ckpt"
    saved = [str(checkpoint_at(ckpt, step)) for step in (HALF, STEPS)]
    assert trained["renames"] == [(path + ".tmp", path) for path in saved]
    assert {Path(path).parent.name for path in saved} == {Path(trained["result"]["log_path"]).stem}
    assert not list(ckpt.glob("*/*.tmp"))
    first = torch.load(saved[0], weights_only=True)
    assert first["step"] == HALF and first["baseline"] == trained["baseline"]
    assert first["val_losses"] == {s: trained["result"]["val_losses"][s] for s in (0, HALF)}


def test_killed_write_leaves_previous_checkpoint_whole_and_next_save_removes_it(trained, tmp_path, monkeypatch):
    """A kill in the middle of the second save: half a file under the .tmp name, the first intact.
    Resumed from the first, the next successful save deletes the stray .tmp."""
    mod, real_save = trained["mod"], torch.save
    saves = []

    def save_half_then_die(obj, f):
        saves.append(f.name)
        real_save(obj, f)
        if len(saves) == 2:
            f.truncate(f.tell() // 2)
            raise Interrupted(f.name)

    monkeypatch.setattr(torch, "save", save_half_then_die)
    with pytest.raises(Interrupted):
        mod.main(args_for(trained, tmp_path, num_iterations=3, checkpoint_every=1, val_loss_every=0))
    monkeypatch.undo()
    first = checkpoint_at(tmp_path / "ckpt", 1)
    assert saves[1] == str(first.parent / "step000002.pt.tmp")
    assert sorted(p.name for p in first.parent.iterdir()) == sorted([first.name, Path(saves[1]).name])
    cfg = mod.parse_config(args_for(trained, tmp_path, num_iterations=3, checkpoint_every=1, val_loss_every=0))
    assert mod.load_checkpoint(str(first), cfg)["step"] == 1
    with pytest.raises(mod.CheckpointError, match="truncated or not a checkpoint"):
        mod.load_checkpoint(saves[1], cfg)
    mod.main(args_for(trained, tmp_path, num_iterations=3, checkpoint_every=1, val_loss_every=0, resume=first))
    assert not list((tmp_path / "ckpt").glob("*/*.tmp")) and first.exists()


def test_keep_checkpoints_deletes_older_ones_of_the_run_only(trained, tmp_path):
    mod, ckpt = trained["mod"], tmp_path / "ckpt"
    other = ckpt / "M_20200101-000000_abcdef" / "step000001.pt"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"another run's")
    result = mod.main(
        args_for(trained, tmp_path, num_iterations=5, checkpoint_every=1, val_loss_every=0, keep_checkpoints=2)
    )
    run_id = Path(result["log_path"]).stem
    assert sorted(p.name for p in (ckpt / run_id).iterdir()) == ["step000004.pt", "step000005.pt"] and other.exists()
    training = Path(result["log_path"]).read_text().split("\n=== training ===\n")[1]
    assert (
        training.count("checkpoint deleted: ") == 3
        and f"checkpoint deleted: {ckpt / run_id / 'step000003.pt'}" in training
    )


def test_resuming_never_deletes_the_checkpoint_resumed_from(trained, resumed, tmp_path):
    """A checkpoint resumed from is a branch point: the resumed run keeps its own newest one in its own folder."""
    before = sorted(resumed["saved"].parent.iterdir())
    result = trained["mod"].main(
        args_for(trained, tmp_path, resume=resumed["saved"], checkpoint_every=1, keep_checkpoints=1)
    )
    assert sorted(resumed["saved"].parent.iterdir()) == before
    assert [p.name for p in (tmp_path / "ckpt" / Path(result["log_path"]).stem).iterdir()] == [f"step{STEPS:06d}.pt"]


def test_resuming_the_last_step_says_there_is_nothing_to_do(trained, tmp_path, monkeypatch):
    last = checkpoint_at(trained["tmp"] / "ckpt", STEPS)
    with pytest.raises(trained["mod"].NothingToDo, match="nothing to do.*--num_iterations=N --resume_changes=true"):
        trained["mod"].main(args_for(trained, tmp_path, resume=last))
    assert not (tmp_path / "logs").exists()
    more = trained["mod"].main(args_for(trained, tmp_path, resume=last, num_iterations=STEPS + 2, resume_changes=True))
    assert len(more["train_losses"]) == 2


def test_resume_at_another_world_size_keeps_batch_and_data_order(trained, resumed, tmp_path):
    """2 gloo processes write the step-HALF checkpoint (and train on to STEPS), 1 process resumes it:
    the same loader state and token windows, exactly, and the first resumed step's loss is the
    2-process run's to the rounding of the mean (no update has differed yet)."""
    baseline = trained["baseline"]
    argv, out = args_for(trained, tmp_path / "two", checkpoint_every=HALF), str(tmp_path / "two_result")
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
    ranks = [torch.load(f"{out}_{r}.pt", weights_only=True) for r in range(2)]
    saved = checkpoint_at(tmp_path / "two" / "ckpt", HALF)
    two, one = (torch.load(p, weights_only=True) for p in (saved, resumed["saved"]))
    assert two["loader"] == one["loader"] == {"file_index": 0, "pos": HALF * 1024}
    # micro-batch a of rank r is slice a * 2 + r of the step's window: interleave the ranks' batches
    two_windows = [[ranks[a % 2]["windows"][s][a // 2] for a in range(8)] for s in range(STEPS)]
    straight_windows = resumed["windows"]  # the 1-process resumed run's steps HALF+1..STEPS
    one_process = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trained["mod"].TrainLoader, "next_step", trained["mod"].TrainLoader.next_step)
        record_windows(trained["mod"], one_process)
        again = trained["mod"].main(args_for(trained, tmp_path / "one", resume=saved))
    for s, windows in enumerate(one_process):
        assert all(torch.equal(a, b) for a, b in zip(windows, two_windows[HALF + s], strict=True)), s
        assert all(torch.equal(a, b) for a, b in zip(windows, straight_windows[s], strict=True)), s
    assert again["train_losses"][0] == pytest.approx(ranks[0]["train_losses"][HALF], rel=MEAN_RTOL)


def refused(mod, monkeypatch, trained, tmp: Path, checkpoint: Path, **fields) -> str:
    """The error of resuming from `checkpoint`; fails if a training step or a log file came first."""

    def no_training(self):
        raise AssertionError("a training step ran before the checkpoint was refused")

    monkeypatch.setattr(mod.TrainLoader, "next_step", no_training)
    with pytest.raises(mod.CheckpointError) as error:
        mod.main(args_for(trained, tmp, resume=checkpoint, **fields))
    assert not (tmp / "logs").exists()
    return str(error.value)


def test_refuses_checkpoint_of_other_script(trained, resumed, tmp_path, monkeypatch):
    other = "M" if trained["baseline"] == "A" else "A"
    message = refused(load_script(other), monkeypatch, trained, tmp_path, resumed["saved"])
    assert str(resumed["saved"]) in message
    assert f"checkpoint from train_gpt_{trained['baseline']}.py, this is train_gpt_{other}.py" in message


def test_refuses_other_model_shape(trained, resumed, tmp_path, monkeypatch):
    message = refused(trained["mod"], monkeypatch, trained, tmp_path, resumed["saved"], model_dim=32, num_layers=3)
    assert "model shape" in message and "model_dim=64 in the checkpoint, 32 here" in message
    assert "num_layers=2 in the checkpoint, 3 here" in message and "num_heads" not in message


@pytest.mark.parametrize("fields", [dict(batch_tokens=2048), dict(seq_len=256), dict(num_iterations=STEPS + 4),
                                    dict(cooldown_frac=0.5), dict(final_lr_frac=0.2)])
def test_refuses_other_batch_or_schedule_unless_intended(trained, resumed, tmp_path, monkeypatch, fields):
    (name, value), = fields.items()
    message = refused(trained["mod"], monkeypatch, trained, tmp_path, resumed["saved"], **fields)
    assert f"{name}: " in message and f"-> {value!r}" in message and "--resume_changes=true" in message


def test_intended_change_is_resumed_and_logged(trained, resumed, tmp_path):
    result = trained["mod"].main(args_for(trained, tmp_path, resume=resumed["saved"], num_iterations=HALF + 2,
                                          resume_changes=True))
    assert len(result["train_losses"]) == 2
    text = Path(result["log_path"]).read_text()
    assert f"\nresume_change: num_iterations: {STEPS} -> {HALF + 2}\n" in text


def test_refuses_truncated_foreign_or_random_file(trained, resumed, tmp_path, monkeypatch):
    data = resumed["saved"].read_bytes()
    truncated, foreign, noise = tmp_path / "truncated.pt", tmp_path / "foreign.pt", tmp_path / "noise.pt"
    truncated.write_bytes(data[: len(data) // 2])
    torch.save({"step": 3}, foreign)
    noise.write_bytes(np.random.default_rng().bytes(5000))
    messages = {
        path: refused(trained["mod"], monkeypatch, trained, tmp_path, path) for path in (truncated, foreign, noise)
    }
    assert "truncated or not a checkpoint" in messages[truncated] and "missing format" in messages[foreign]
    assert "not a checkpoint file of these scripts" in messages[noise]
    for path, message in messages.items():
        assert str(path) in message and "weights_only" not in message and "unsafe" not in message.lower()
    assert "no such file" in refused(trained["mod"], monkeypatch, trained, tmp_path, tmp_path / "absent.pt")
    message = refused(trained["mod"], monkeypatch, trained, tmp_path, resumed["saved"].parent)
    assert "is a folder; give a checkpoint file in it, such as" in message


def test_command_line_prints_refusal_without_traceback(trained, resumed, tmp_path):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(resumed["saved"].read_bytes()[:1000])
    code, _, err = run_cli(
        Path(ROOT) / f"train_gpt_{trained['baseline']}.py", args_for(trained, tmp_path, resume=truncated)
    )
    assert code == 2 and err.startswith(f"error: {truncated}: truncated or not a checkpoint")
    assert not (tmp_path / "logs").exists()


def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint_and_resuming_gives_the_same_run(trained, tmp_path):
    """SIGTERM (a cluster's pre-emption) mid-run: the run saves at the next step boundary, its log ends with the
    line that says how to resume, and the resumed run computes what the uninterrupted run computed."""
    mod = trained["mod"]
    real_next_step, calls = mod.TrainLoader.next_step, []

    def next_step(self):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_next_step(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mod.TrainLoader, "next_step", next_step)
        with pytest.raises(mod.Stopped) as stopped:
            mod.main(args_for(trained, tmp_path / "cut", checkpoint_every=HALF))
    assert stopped.value.exit_code == 143 and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    (saved,) = (tmp_path / "cut" / "ckpt").glob("*/step*.pt")
    step = int(saved.stem[4:])
    assert str(stopped.value) == f"interrupted at step {step} by SIGTERM; resume with --resume={saved}"
    (log,) = (tmp_path / "cut" / "logs").glob("*.txt")
    assert log.read_text().splitlines()[-1] == str(stopped.value) and 3 <= step < HALF
    again = mod.main(args_for(trained, tmp_path / "again", resume=saved))
    assert again["train_losses"] == trained["result"]["train_losses"][step:]
    assert again["val_losses"] == trained["result"]["val_losses"]


def test_ctrl_c_on_the_command_line_prints_one_line_and_exits_130(trained, tmp_path):
    """Ctrl-C (SIGINT) at the command line: no traceback, one line on stderr naming the checkpoint, exit 130
    (a real process, once: the twins share the code)."""
    if trained["baseline"] != "M":
        pytest.skip("M's run shows it")
    args = args_for(trained, tmp_path, num_iterations=190, checkpoint_every=1000, val_loss_every=0)
    code, out, err = interrupt_at([sys.executable, "-u", Path(ROOT) / f"train_gpt_{trained['baseline']}.py", *args],
                                  "step:2/", cwd=ROOT)
    (saved,) = (tmp_path / "ckpt").glob("*/step*.pt")
    assert code == 130 and "Traceback" not in err
    assert err.strip() == f"interrupted at step {int(saved.stem[4:])} by SIGINT; resume with --resume={saved}"
    assert out.rstrip().splitlines()[-1].startswith("log: ")


def test_a_checkpoint_that_cannot_be_written_stops_the_run_and_keeps_the_earlier_ones(trained, tmp_path, monkeypatch):
    """A full disk part-way through a save: one line naming the cause (not torch's 'unexpected pos'), in the log
    too; the temporary file removed, the earlier checkpoint whole."""
    mod, real_save, saves = trained["mod"], torch.save, []

    def save_then_fill_the_disk(obj, f):
        saves.append(f.name)
        if len(saves) == 2:
            f.write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1472 vs 1366")
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", save_then_fill_the_disk)
    monkeypatch.setattr(mod.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 * 2**30, 10 * 2**30, 0))
    with pytest.raises(mod.Stopped) as stopped:
        mod.main(args_for(trained, tmp_path, num_iterations=3, checkpoint_every=1, val_loss_every=0))
    first = checkpoint_at(tmp_path / "ckpt", 1)
    message = f"checkpoint {first.parent / 'step000002.pt'} could not be written: the disk is full (0 MiB free)"
    assert str(stopped.value).startswith(message) and "unexpected pos" not in str(stopped.value)
    assert stopped.value.exit_code == 1 and [p.name for p in first.parent.iterdir()] == ["step000001.pt"]
    (log,) = (tmp_path / "logs").glob("*.txt")
    assert log.read_text().endswith(f"stopped: {stopped.value}\n=== end of run ===\n")
    monkeypatch.undo()
    assert torch.load(first, weights_only=True)["step"] == 1

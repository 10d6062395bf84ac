"""Shared test helpers: load the two training scripts as modules, write token shards, and the
small-vocabulary configuration most tests train with.

The tiny preset keeps GPT-2's vocabulary (its output layer is 6.4M of its 6.5M parameters, and
most of a CPU step). Where the vocabulary is not the property under test, tests train the tiny
preset with SMALL_VOCAB tokens on shards they write themselves (`tiny_args`)."""
import contextlib
import importlib.util
import io
import os
import runpy
import signal
import subprocess
import sys

# Triton kernels run on the CPU under Triton's interpreter, which triton.jit chooses when fast_ops.py
# defines its kernels: so before it is imported
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # fast_ops.py and the tools, as the scripts find them beside themselves
BASELINES = ("A", "M")
SMALL_VOCAB = 512  # token ids 0..511, a multiple of the output layer's padding: no padded rows
SMALL_EOT = SMALL_VOCAB - 1  # the end-of-text token of the small vocabulary


def load_script(baseline: str):
    """The real train_gpt_{A,M}.py as a module; importing it must do nothing heavy."""
    name = f"train_gpt_{baseline}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def gpu_ops(mod, cfg, capability: tuple[int, int] = (9, 0)) -> dict:
    """Every op of `mod` as fast_ops.py chooses it for a GPU of this compute capability with Triton (an H100 by
    default), to run on the CPU: the kernels under Triton's interpreter."""
    import fast_ops

    plain = {**mod.plain_ops()._asdict(), **mod.optimizer_ops()}
    choice = fast_ops.choose(list(plain), "cuda", capability, True, True)
    return {**plain, **fast_ops.drop_ins(choice, plain, cfg.loss_chunk)}


def run_cli(script_path, argv: list, cwd=None) -> tuple[int, str, str]:
    """The script's command line in this process: its `if __name__ == "__main__"` block through runpy, in
    `cwd`. Returns the exit code, stdout and stderr; an exception the block does not turn into an exit code
    (a traceback, on the command line) fails the test. Spares a Python start and a torch import per call."""
    out, err, argv_before, cwd_before = io.StringIO(), io.StringIO(), sys.argv, os.getcwd()
    sys.argv = [str(script_path), *map(str, argv)]
    code = 0
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(script_path), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.argv = argv_before
        os.chdir(cwd_before)
    return code, out.getvalue(), err.getvalue()


def interrupt_at(argv: list, prefix: str, **popen) -> tuple[int, str, str]:
    """Start a command, send it SIGINT once a stdout line starts with `prefix`; its exit code, stdout and stderr."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    for line in proc.stdout:
        if line.startswith(prefix):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def write_shard(path, tokens, magic: int = 20240520, version: int = 1, count: int | None = None) -> None:
    header = np.zeros(256, dtype="<i4")
    header[:3] = (magic, version, len(tokens) if count is None else count)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


def learnable_tokens(n: int, rng: np.random.Generator, eot: int = SMALL_EOT) -> np.ndarray:
    """Documents of a small repeating vocabulary below `eot`: a tiny model learns them in a few dozen steps."""
    vocab = rng.choice(min(eot, 5000), size=16, replace=False)
    tokens = vocab[(np.arange(n) * 7 + rng.integers(0, 2, n)) % 16]
    tokens[rng.random(n) < 0.005] = eot
    tokens[0] = eot
    return tokens.astype(np.uint16)


def write_learnable_shards(
    folder, train_tokens: int = 200_000, val_tokens: int = 20_000, prefix: str = "t"
) -> tuple[str, str]:
    """A training and a validation shard of small-vocabulary learnable text; returns their glob patterns."""
    tokens = learnable_tokens(train_tokens + val_tokens, np.random.default_rng())
    write_shard(os.path.join(folder, f"{prefix}_train_000001.bin"), tokens[:train_tokens])
    write_shard(os.path.join(folder, f"{prefix}_val_000000.bin"), tokens[train_tokens:])
    return os.path.join(folder, f"{prefix}_train_*.bin"), os.path.join(folder, f"{prefix}_val_*.bin")


def tiny_args(train: str, val: str, log_dir, **fields) -> list[str]:
    """The tiny preset with the small vocabulary on the given shards, then `fields` as --name=value."""
    base = {
        "preset": "tiny",
        "vocab_size": SMALL_VOCAB,
        "eot_token": SMALL_EOT,
        "train_files": train,
        "val_files": val,
        "log_dir": log_dir,
        "warmup_steps": 0,
        **fields,
    }  # A's preset warms up for 10 steps, more than most tests run
    return [f"--{k}={v}" for k, v in base.items()]


@pytest.fixture(params=BASELINES)
def script(request):
    return load_script(request.param)


@pytest.fixture
def shards(tmp_path):
    """A training shard and a validation shard of learnable small-vocabulary text; returns their glob patterns."""
    return write_learnable_shards(tmp_path)


@pytest.fixture
def one_thread():
    """torch on one thread for the test (as the gloo worker processes run), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


STEPS = 12  # the shared run's steps: validated and checkpointed every HALF
HALF = STEPS // 2


@pytest.fixture(scope="session", params=BASELINES)
def trained(request, tmp_path_factory):
    """One small-vocabulary tiny run per script, shared by the end-to-end and checkpoint tests:
    STEPS steps, validation and a checkpoint every HALF (both kept), the checkpoint writes' renames
    recorded. Returns the script module, the run's result and its arguments."""
    baseline = request.param
    mod = load_script(baseline)
    tmp = tmp_path_factory.mktemp(f"trained_{baseline}")
    train, val = write_learnable_shards(tmp)
    args = dict(train=train, val=val, tmp=tmp)
    argv = tiny_args(train, val, tmp / "logs", num_iterations=STEPS, val_loss_every=HALF, val_tokens=2048,
                     warmup_compile_steps=1, checkpoint_dir=tmp / "ckpt", checkpoint_every=HALF, keep_checkpoints=0)
    real_replace, renames = os.replace, []

    def spy_replace(src, dst):
        renames.append((str(src), str(dst)))
        real_replace(src, dst)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "replace", spy_replace)
        result = mod.main(argv)
    return {"baseline": baseline, "mod": mod, "result": result, "argv": argv, "renames": renames, **args}

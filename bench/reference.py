"""Run a published reference baseline (the modded-nanogpt "remix" train_gpt_A.py / train_gpt_M.py,
which are not part of this repository) on one GPU, on any shards, for side-by-side measurement.

    python bench/reference.py M --script path/to/remix/train_gpt_M.py --steps 300 \
        --train 'data/dev/wiki_train_*.bin' --val 'data/dev/wiki_val_*.bin' \
        --val_every 25 --val_tokens 2097152 --seed 1 --log_dir log/wiki_parity_seeds

The reference is written for 8 GPUs and reads its settings from a Hyperparameters class. A copy is
patched: its 8-GPU assert removed, num_iterations, val_loss_every, val_tokens and the data globs set,
and with --seed a torch.manual_seed(S) put before the model is built (unseeded, every run starts from
the same default generator state). The copy runs under torchrun with one process (one forward of
seq_len tokens a step, no accumulation) in a temporary folder; its log (modded-nanogpt format, read by
runlog.py) is copied to --log_dir without the reference's source code it begins with (one line says
so), so that logs can be kept without copying the reference. Prints the log's path. bench/speed.py
--reference uses this.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

PATCHES = (  # (what the reference has, what the copy gets): each must match exactly once
    (r"^assert world_size == 8.*$", lambda a: ""),
    (r"(?<=num_iterations = )\d+", lambda a: str(a.steps)),
    (r"(?<=val_loss_every = )\d+", lambda a: str(a.val_every)),
    (r"(?<=val_tokens = )\d+", lambda a: str(a.val_tokens)),
    (r'(?<=train_files = )"[^"]*"', lambda a: repr(os.path.abspath(a.train))),
    (r'(?<=val_files = )"[^"]*"', lambda a: repr(os.path.abspath(a.val))),
)
SEED_POINT = r"^model: nn\.Module = GPT\("  # where the reference builds its model
SEPARATOR = "=" * 100  # a modded-nanogpt log: the source, this line, the environment, this line, the steps


class ReferenceError(RuntimeError):
    """A reference script that cannot be patched or that failed."""


def patch_source(source: str, args: argparse.Namespace) -> str:
    for pattern, value in PATCHES + (((SEED_POINT, lambda a: f"torch.manual_seed({a.seed})\nmodel: nn.Module = GPT("),)
                                      if args.seed is not None else ()):
        source, count = re.subn(pattern, lambda _: value(args), source, flags=re.M)
        if count != 1:
            raise ReferenceError(f"the reference script has {count} places matching {pattern!r}, expected 1 "
                                 f"(is it the published remix train_gpt_A.py / train_gpt_M.py?)")
    return source


def run_reference(args: argparse.Namespace) -> str:
    """Run the patched copy; return the path of its log, copied into args.log_dir."""
    with open(args.script) as f:
        source = patch_source(f.read(), args)
    os.makedirs(args.log_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"reference_{args.variant}.py")
        with open(path, "w") as f:
            f.write(source)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
        proc = subprocess.run(launcher + [path], cwd=tmp, capture_output=True, text=True)
        logs = sorted(os.listdir(os.path.join(tmp, "logs"))) if os.path.isdir(os.path.join(tmp, "logs")) else []
        if proc.returncode != 0 or len(logs) != 1:
            raise ReferenceError(
                f"reference {args.variant} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}"
            )
        seed = "unseeded" if args.seed is None else f"seed{args.seed}"
        out = os.path.join(args.log_dir, f"reference_{args.variant}_{seed}_{os.path.splitext(logs[0])[0][:8]}.txt")
        with open(os.path.join(tmp, "logs", logs[0])) as f:
            text = f.read()
        with open(out, "w") as f:
            f.write(f"(the source of the published reference script {os.path.basename(args.script)}, which its log "
                    f"begins with, is left out; patched by bench/reference.py)\n" + text[text.find(SEPARATOR):])
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variant", choices=["A", "M"])
    p.add_argument("--script", required=True, help="the published reference script of that variant")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps of seq_len tokens")
    p.add_argument("--train", required=True, help="glob of training shards")
    p.add_argument("--val", required=True, help="glob of validation shards")
    p.add_argument("--val_every", type=int, default=0, help="steps between validations; 0 = only at the end")
    p.add_argument("--val_tokens", type=int, default=65_536, help="tokens per validation pass")
    p.add_argument("--seed", type=int, default=None, help="torch.manual_seed before the model is built")
    p.add_argument("--log_dir", default="logs", help="folder the run's log is copied to")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        print(run_reference(args))
    except (ReferenceError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, OSError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

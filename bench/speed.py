"""Speed of the baselines on synthetic shards: one table of ms per step, tokens per second, model
FLOP utilisation and peak memory.

    python bench/speed.py                        # both baselines, 50 steps of 65,536 tokens, one GPU
    python bench/speed.py --batch_tokens=524288  # the real batch: 8 accumulation steps on one GPU
    python bench/speed.py --nproc=8              # 8 GPUs through torchrun
    python bench/speed.py --tiny --steps=5       # CPU: the tiny preset, to keep this tool working
    python bench/speed.py --reference DIR        # also the published reference scripts in DIR, same shards

With --reference DIR (a folder holding the published remix train_gpt_A.py and train_gpt_M.py, not part
of this repository) each of our scripts is followed by the reference of the same baseline, run by
bench/reference.py on one GPU on the same shards for the same steps, and the table gets the
reference's ms per step and our ratio to it: absolute times move by several percent between
machines and days, so speed is only ever claimed as a ratio measured in one call.

Each script runs unmodified as a subprocess (compile and warm-up excluded by the script itself)
on shards written by bench/synthetic.py; its log is parsed by runlog.py. ms per step is the mean
over the steps after --skip. MFU counts 6 FLOPs per parameter per token for every matrix
product (the blocks and the output layer, not the embedding lookup) plus the attention:
12 * layers * model_dim * K per token, K being the mean number of keys a query attends to on the
timed tokens (forward QK^T and PV, 2 FLOPs each per key and dim; backward twice the forward),
against the H100 SXM's dense bf16 peak of 989 TFLOP/s (the convention of llm.c and nanochat).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference import run_reference  # noqa: E402
from runlog import parse_log  # noqa: E402
from synthetic import EOT_TOKEN, write_synthetic  # noqa: E402

H100_BF16_PEAK_TFLOPS = 989.0  # H100 SXM dense bf16 datasheet peak, the MFU convention of llm.c and nanochat
VOCAB_MULTIPLE = 128  # the scripts pad the output layer to a multiple of this
TINY_ARGS = ["--preset=tiny"]


def mean_keys_per_query(tokens: np.ndarray, window: int) -> float:
    """Mean over queries of the keys they attend to: same document, causal, within the window."""
    eot_positions = np.flatnonzero(tokens == EOT_TOKEN)
    doc_start = np.zeros(len(tokens), dtype=np.int64)
    doc_start[eot_positions] = eot_positions
    doc_start = np.maximum.accumulate(doc_start)
    keys = np.minimum(np.arange(len(tokens)) - doc_start + 1, window)
    return float(keys.mean())


def flops_per_token(cfg: dict, mean_keys: float) -> float:
    d, layers = cfg["model_dim"], cfg["num_layers"]
    vocab = -(-cfg["vocab_size"] // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    matrix_params = layers * (4 * d * d + 2 * cfg["mlp_ratio"] * d * d) + vocab * d
    return 6 * matrix_params + 12 * layers * d * mean_keys


def read_tokens(pattern_dir: str, count: int) -> np.ndarray:
    path = sorted(p for p in os.listdir(pattern_dir) if p.startswith("synthetic_train_"))[0]
    return np.fromfile(os.path.join(pattern_dir, path), dtype="<u2", offset=256 * 4)[:count]


def command(script: str, args, train: str, val: str, log_dir: str) -> list[str]:
    """A baseline's arguments for a timed run of args.steps steps on the synthetic shards."""
    seq_args = TINY_ARGS if args.tiny else [f"--seq_len={args.seq_len}"]
    # no LR warm-up: it changes no step's work, and A's 256 steps would not fit in a short timed run
    return [script, *seq_args, f"--train_files={train}", f"--val_files={val}", f"--num_iterations={args.steps}",
            f"--batch_tokens={args.batch_tokens}", "--val_loss_every=0", f"--val_tokens={args.val_tokens}",
            "--warmup_steps=0", f"--log_dir={log_dir}", *args.extra]


def run_one(script: str, args, train: str, val: str, log_dir: str) -> str:
    """Run a baseline; return the path of its log."""
    cmd = command(script, args, train, val, log_dir)
    launcher = (
        [sys.executable]
        if args.nproc == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    )
    before = set(os.listdir(log_dir))
    print("$ " + " ".join(cmd), flush=True)
    result = subprocess.run(launcher + cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{script} failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    new = sorted(f for f in set(os.listdir(log_dir)) - before if f.endswith(".txt"))
    if len(new) != 1:
        sys.exit(f"{script}: expected one new log in {log_dir}, found {new}")
    return os.path.join(log_dir, new[0])


def mean_step_ms(run, skip: int, steps: int) -> float:
    """Mean step time over steps skip+1..steps, from the training-time stamps of the log's step lines."""
    times = dict(run.train)
    return (times[steps] - times[skip]) / (steps - skip)


def reference_args(args, baseline: str, train: str, val: str, log_dir: str) -> argparse.Namespace:
    return argparse.Namespace(variant=baseline, script=os.path.join(args.reference, f"train_gpt_{baseline}.py"),
                              steps=args.steps, train=train, val=val, val_every=0, val_tokens=args.val_tokens,
                              seed=None, log_dir=log_dir)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--scripts", nargs="+", default=["train_gpt_A.py", "train_gpt_M.py"], help="paths from the repository root"
    )
    parser.add_argument("--steps", type=int, default=50, help="timed optimizer steps per script")
    parser.add_argument("--skip", type=int, default=10, help="first steps left out of the mean")
    parser.add_argument("--seq_len", type=int, default=65_536, help="tokens per forward, per GPU")
    parser.add_argument(
        "--batch_tokens", type=int, default=None, help="tokens per optimizer step (default: seq_len x nproc)"
    )
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) through torchrun")
    parser.add_argument("--tiny", action="store_true", help="the tiny preset (the default without a GPU)")
    parser.add_argument(
        "--peak_tflops", type=float, default=H100_BF16_PEAK_TFLOPS, help="bf16 matrix peak per GPU, for MFU"
    )
    parser.add_argument("--log_dir", default=None, help="keep the runs' logs here (default: a temporary folder)")
    parser.add_argument(
        "--reference",
        default=None,
        metavar="DIR",
        help="folder of the published reference train_gpt_A.py / train_gpt_M.py: run each after ours, same shards",
    )
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further --field=value for every script")
    args = parser.parse_args(argv)
    import torch

    gpu = torch.cuda.is_available()
    args.tiny = args.tiny or not gpu
    if args.tiny:
        args.seq_len = 128
    args.batch_tokens = args.batch_tokens or args.seq_len * args.nproc
    args.val_tokens = args.seq_len * args.nproc
    if args.skip >= args.steps:
        parser.error(f"--skip={args.skip} leaves no timed step of --steps={args.steps}")
    if args.reference and (args.tiny or args.nproc != 1 or args.batch_tokens != args.seq_len):
        parser.error("--reference runs the reference on one GPU, one forward of --seq_len tokens a step: "
                     "it needs a GPU, --nproc=1 and no accumulation")

    with tempfile.TemporaryDirectory() as tmp:
        log_dir = args.log_dir or os.path.join(tmp, "logs")
        os.makedirs(log_dir, exist_ok=True)
        train_tokens = (args.steps + 2) * args.batch_tokens + 1
        t0 = time.perf_counter()
        # the reference's loader wants more than one batch + 1 tokens in a shard; ours reads the first val_tokens + 1
        train, val = write_synthetic(os.path.join(tmp, "data"), train_tokens, 2 * args.val_tokens + 1)
        print(f"synthetic shards: {train_tokens:,} training tokens ({time.perf_counter() - t0:.1f} s)", flush=True)
        timed = read_tokens(os.path.join(tmp, "data"), train_tokens)[
            args.skip * args.batch_tokens : args.steps * args.batch_tokens
        ]
        rows = []
        for script in args.scripts:
            run = parse_log(run_one(script, args, train, val, log_dir))
            ms = mean_step_ms(run, args.skip, args.steps)
            flops = flops_per_token(run.config, mean_keys_per_query(timed, run.config["attn_window"]))
            tokens_per_s = run.batch_tokens / (ms / 1000)
            mfu = None if args.tiny else flops * tokens_per_s / (args.peak_tflops * 1e12 * args.nproc)
            row = dict(script=script, ms_per_step=ms, tokens_per_s=tokens_per_s, flops_per_token=flops, mfu=mfu,
                       peak_mib=run.peak_allocated_mib, device=run.device, torch=run.torch, log=run.path.name)
            if args.reference:
                ref = parse_log(
                    run_reference(reference_args(args, run.baseline, train, val, log_dir)), batch_tokens=args.seq_len
                )
                row.update(
                    ref_ms=mean_step_ms(ref, args.skip, args.steps),
                    ref_peak_mib=ref.peak_allocated_mib,
                    ref_log=ref.path.name,
                )
                row["ratio"] = ms / row["ref_ms"]
            rows.append(row)

    print(
        f"\n{rows[0]['device']}, torch {rows[0]['torch']}, {time.strftime('%Y-%m-%d')}, synthetic shards, "
        f"{args.batch_tokens:,} tokens per step ({args.batch_tokens // (args.seq_len * args.nproc)} accumulation "
        f"steps), "
        f"mean over steps {args.skip + 1}-{args.steps}"
    )
    ref_head = " reference ms | ratio | reference peak |" if args.reference else ""
    print("| script | ms per step | tokens per s | MFU | peak memory allocated |" + ref_head)
    print("|---|---|---|---|---|" + ("---|---|---|" if args.reference else ""))
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        peak = f"{r['peak_mib']:,} MiB" if r["peak_mib"] is not None else "-"
        ref = f" {r['ref_ms']:.1f} | {r['ratio']:.3f}x | {r['ref_peak_mib'] or 0:,} MiB |" if args.reference else ""
        print(f"| {r['script']} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | {mfu} | {peak} |" + ref)
    print("FLOPs per token: " + ", ".join(f"{r['script']} {r['flops_per_token'] / 1e6:.0f}M" for r in rows)
          + f"; MFU against {args.peak_tflops:.0f} TFLOP/s per GPU")
    print("json: " + json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()

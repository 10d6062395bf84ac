"""Where the time of one training step goes: torch.profiler over a few steps of a baseline
at full size on random documents, the GPU kernels grouped by kind.

    python bench/profile_step.py M [--steps 5] [--seq_len 65536] [--top 25] [--script PATH] [--field=value ...]

Further --field=value arguments override the script's configuration.

Also reports the memory of one step: allocated after the forward (what the backward keeps) and
the peaks of the forward and of the backward.

The model, its compilation and the optimizers are the script's own (loaded as a module).
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_script  # noqa: E402
from synthetic import synthetic_tokens  # noqa: E402

KINDS = [  # first match wins: substrings of kernel names
    ("MLP products + ReLU^2 (fast ops)", ("_matmul_epilogue",)),
    ("loss kernel (fast ops)", ("_logit_loss_grad",)),
    ("q/k norm + RoPE (fast ops)", ("_norm_rope",)),
    ("flex-attention", ("flex", "attention")),
    ("matmul (gemm)", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas")),
    ("Newton-Schulz/optimizer", ("_gram", "adam", "foreach", "lerp")),
    ("fused elementwise (triton)", ("triton_",)),
    ("copies", ("copy", "memcpy", "memset", "fill")),
]


def documents(n: int, rng: np.random.Generator) -> torch.Tensor:
    """Synthetic tokens in documents of log-normal length (bench/synthetic.py)."""
    return torch.from_numpy(synthetic_tokens(n + 1, rng).astype(np.int64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("baseline", choices=["A", "M"])
    parser.add_argument("--steps", type=int, default=5, help="profiled steps (after 5 warm-up steps)")
    parser.add_argument("--seq_len", type=int, default=65536, help="tokens per step")
    parser.add_argument("--top", type=int, default=25, help="kernels listed")
    parser.add_argument("--script", default=None, help="script path from the repository root (default train_gpt_X.py)")
    args, overrides = parser.parse_known_args()
    if not torch.cuda.is_available():
        sys.exit("profile_step.py needs a CUDA GPU")
    script = load_script(args.script or f"train_gpt_{args.baseline}.py", f"train_gpt_{args.baseline}")
    cfg = script.parse_config([f"--seq_len={args.seq_len}", f"--batch_tokens={args.seq_len}", *overrides])
    device = torch.device("cuda")
    torch.manual_seed(0)
    ops, ops_line = script.select_ops(cfg, device)
    print(ops_line)
    model = script.GPT(cfg, ops).to(device=device, dtype=torch.bfloat16)
    optimizers, set_schedule = script.build_optimizers(cfg, model, ops, script.Dist(0, 0, 1, device))
    script.compile_model(cfg, model)
    compiled = model
    rng = np.random.default_rng(0)
    batches = [documents(args.seq_len, rng).to(device) for _ in range(4)]

    def step(i: int) -> None:
        window = batches[i % len(batches)]
        compiled(window[:-1], window[1:]).backward()
        set_schedule(i)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)

    for i in range(5):
        step(i)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(args.steps):
        step(i)
    torch.cuda.synchronize()
    plain_ms = 1000 * (time.perf_counter() - start) / args.steps
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = compiled(batches[0][:-1], batches[0][1:])
    torch.cuda.synchronize()
    kept, forward_peak = torch.cuda.memory_allocated() - base, torch.cuda.max_memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    loss.backward()
    torch.cuda.synchronize()
    backward_peak = torch.cuda.max_memory_allocated() - base
    model.zero_grad(set_to_none=True)
    print(f"memory above the model and optimizer ({base // 2**20} MiB): kept by the forward {kept // 2**20} MiB, "
          f"forward peak {forward_peak // 2**20} MiB, backward peak {backward_peak // 2**20} MiB")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(args.steps):
            step(i)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events) / 1000 / args.steps
    by_kind: dict[str, float] = {}
    for e in events:
        name = e.key.lower()
        kind = next((k for k, keys in KINDS if any(s in name for s in keys)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + e.self_device_time_total / 1000 / args.steps
    print(f"{args.baseline}: {plain_ms:.1f} ms per step (wall, unprofiled), {total:.1f} ms of GPU kernels per step")
    print(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB")
    for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:28s} {ms:7.1f} ms  {100 * ms / total:5.1f}%")
    print(f"top {args.top} kernels (ms per step, calls per step):")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[: args.top]:
        print(f"  {e.self_device_time_total / 1000 / args.steps:7.2f}  {e.count // args.steps:4d}  {e.key[:110]}")


if __name__ == "__main__":
    main()

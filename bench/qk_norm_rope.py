"""The queries' and keys' RMSNorm + RoPE (the model's qk_norm_rope) on one GPU at the model's shapes
(bfloat16): its Triton kernels alone, then the op forward + backward inside torch.compile.

    python bench/qk_norm_rope.py [--script train_gpt_A.py] [--compare OLD_SCRIPT [--compare_pairs]] [--grid] [--reps 50]

The input is the q/k product's output, T x 2C viewed as T x 2H heads x D; the output gradients are made
inside the compiled graph in the layout flex-attention leaves them (heads-major, transposed). Kernel rows: the
fused forward and backward alone, with the bytes they must move and the bandwidth that makes, for a few launch
settings (the script's own marked *; --grid tries more). Op rows: forward + backward, compiled, of a loss made of the
outputs (the same extra work in each row) with the model section's plain op, the script's fast op and,
with --compare, another version's fast op (one that takes the queries and the keys apart is called twice,
unless --compare_pairs). Times are GPU time per call, the sum of the kernels' durations from the
profiler (a synchronised timing of one 0.2 ms kernel would add the host's launch); diff is the largest relative
difference of the outputs and the input gradient from the plain op's.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import chosen_op, gpu_ms, gpu_tool, kernels_of, load_script, rel  # noqa: E402


SETTINGS = [(8, 2), (16, 4), (32, 8), (4, 1)]  # (tokens per program, warps): 8 elements, 16 bytes, a thread
MORE_SETTINGS = [(8, 4), (4, 2), (16, 2), (64, 8)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", default="train_gpt_A.py")
    parser.add_argument("--compare", default=None, help="another version of the script, for its fast op")
    parser.add_argument("--compare_pairs", action="store_true", help="the compared version's op takes q and k together")
    parser.add_argument("--grid", action="store_true", help="more launch settings")
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    script, cfg, dev, gen = gpu_tool("qk_norm_rope.py", args.script)
    kernels = kernels_of(script)
    T, H, D = cfg.seq_len, cfg.num_heads, cfg.model_dim // cfg.num_heads
    qk = (torch.randn(1, T, 2 * H * D, device=dev, generator=gen) * 2).bfloat16().view(1, T, 2 * H, D)
    cos, sin = (t.to(dev).bfloat16() for t in script.rope_tables(T, D, cfg.rope_base))
    gq, gk = ((torch.randn(1, H, T, D, device=dev, generator=gen) * 1e-3).bfloat16().transpose(1, 2) for _ in range(2))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, T={T} heads=2x{H} D={D}, bfloat16")

    unit = T * 2 * H * D * 2  # bytes of one T x 2H x D bfloat16 tensor
    mine = (kernels.NORM_ROPE_BLOCK_T, kernels.NORM_ROPE_NUM_WARPS)
    settings = [mine] + [s for s in SETTINGS + (MORE_SETTINGS if args.grid else []) if s != mine]
    q, k, rinv = kernels.fused_norm_rope(qk, cos, sin)
    for block_t, warps in settings:
        mark = "*" if (block_t, warps) == mine else " "
        for name, fn, moved in (
            ("forward kernel", lambda: kernels.fused_norm_rope(qk, cos, sin, block_t, warps), 2 * unit),
            ("backward kernel", lambda: kernels.fused_norm_rope_grad(gq, gk, q, k, rinv, cos, sin, block_t, warps),
             3 * unit),
        ):
            ms = gpu_ms(fn, args.reps)
            print(f"{name:16s} {block_t:3d} tokens w{warps} {mark} {ms:7.3f} ms  {moved / ms / 1e6:6.0f} GB/s "
                  f"({moved / 1e6:.0f} MB at least)", flush=True)

    variants = [("plain op", script.plain_ops().qk_norm_rope), ("fast op", chosen_op(script, "qk_norm_rope", dev))]
    if args.compare:
        op = chosen_op(load_script(args.compare, "compared"), "qk_norm_rope", dev)
        variants.append((f"{args.compare} fast op", op if args.compare_pairs else
                         lambda x, c, s, op=op: tuple(op(h, c, s) for h in x.chunk(2, dim=2))))
    reference = None
    for name, op in variants:
        def loss_of(x, c, s, op=op):  # the output gradients made inside the graph, as attention's are
            out_q, out_k = op(x, c, s)
            return (out_q * gq).float().sum() + (out_k * gk).float().sum(), out_q, out_k

        fn = torch.compile(loss_of, dynamic=False)
        leaf = qk.clone().requires_grad_()

        def step():
            leaf.grad = None
            loss, out_q, out_k = fn(leaf, cos, sin)
            loss.backward()
            return out_q, out_k

        outs = step()
        ms = gpu_ms(step, args.reps)
        outs = [o.detach() for o in outs] + [leaf.grad]
        reference = reference or outs
        diff = max(rel(a, b) for a, b in zip(outs, reference))
        print(f"op {name:29s} fwd+bwd {ms:7.3f} ms  diff {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()

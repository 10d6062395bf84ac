"""The MLP's products with ReLU^2 in their epilogue (the fast ops' FusedMLP) against cuBLAS products
followed by compiled elementwise kernels, on one GPU at the model's shapes (bfloat16).

    python bench/mlp.py [--script train_gpt_A.py] [--compare OLD_SCRIPT] [--grid] [--reps 20]

up:   relu(x @ fc_w^T)^2        x: T x C, fc_w: 4C x C (the fused kernel reads fc_w's rows as tiles of its columns)
down: (g @ proj_w) * 2 sqrt(y)  g: T x C, proj_w: C x 4C, y: T x 4C (the hidden gradient from the output one)
cuBLAS rows: the product by cuBLAS and the elementwise work as one compiled kernel; fused rows: the script's
Triton kernel with the tile shown (the script's own tile is marked *). --grid tries more tiles. Then one
layer's MLP forward + backward inside torch.compile: the model section's plain `mlp`, the fast ops' mlp,
and with --compare the fast ops of another version of the script (the previous commit's, say).
Times are medians of CUDA-event timings; TFLOP/s counts the product only; diff is the relative
difference from the cuBLAS row, and the fraction of elements not equal to it (for the layers: the largest
relative difference of the output and gradients from the plain MLP's).
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import chosen_op, gpu_tool, kernels_of, load_script, median_ms, rel  # noqa: E402

TILES = [(128, 256, 64, 8, 4), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3)]
MORE_TILES = [
    (128, 128, 64, 4, 4),
    (64, 256, 64, 4, 4),
    (256, 128, 32, 8, 4),
    (128, 256, 32, 8, 4),
    (128, 64, 64, 4, 4),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", default="train_gpt_A.py")
    parser.add_argument("--compare", default=None, help="another version of the script, for its fast MLP")
    parser.add_argument("--grid", action="store_true", help="more tiles")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    script, cfg, dev, gen = gpu_tool("mlp.py", args.script)
    kernels = kernels_of(script)
    T, C, H = cfg.seq_len, cfg.model_dim, cfg.mlp_ratio * cfg.model_dim
    x = F.rms_norm(torch.randn(T, C, device=dev, generator=gen), (C,)).bfloat16()
    fc_w = (torch.randn(H, C, device=dev, generator=gen) / C**0.5).bfloat16()
    proj_w = (torch.randn(C, H, device=dev, generator=gen) / H**0.5).bfloat16()
    g = (torch.randn(T, C, device=dev, generator=gen) * 1e-3).bfloat16()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, T={T} C={C} H={H}, bfloat16")
    flops = 2 * T * C * H
    mine = (*kernels.MLP_TILE, kernels.MLP_NUM_WARPS, kernels.MLP_NUM_STAGES)
    tiles = [mine] + [t for t in TILES + (MORE_TILES if args.grid else []) if t != mine]

    up_ref = torch.compile(lambda a, w: F.relu(a @ w.T).square(), dynamic=False)
    down_ref = torch.compile(lambda a, b, y: (2 * y.float().sqrt() * (a @ b).float()).bfloat16(), dynamic=False)
    y = up_ref(x, fc_w)
    for name, ref_fn, ref_args in (("up", up_ref, (x, fc_w)), ("down", down_ref, (g, proj_w, y))):
        want = ref_fn(*ref_args)
        ms = median_ms(lambda: ref_fn(*ref_args), args.reps)
        print(f"{name:5s} cuBLAS + compiled elementwise    {ms:7.3f} ms  {flops / ms / 1e9:6.0f} TFLOP/s", flush=True)
        for bm, bn, bk, warps, stages in tiles:
            def run():
                return kernels.fused_matmul_epilogue(*ref_args[:2], ref_args[2] if name == "down" else None,
                                                     b_kn=name == "down", tile=(bm, bn, bk), num_warps=warps,
                                                     num_stages=stages)
            try:
                got = run()
                ms = median_ms(run, args.reps)
            except Exception as e:  # a tile that does not fit in shared memory, say
                print(f"{name:5s} fused {bm}x{bn}x{bk} w{warps} s{stages}: {type(e).__name__}: {str(e)[:100]}")
                continue
            mark = "*" if (bm, bn, bk, warps, stages) == mine else " "
            print(f"{name:5s} fused {bm:3d}x{bn:3d}x{bk:3d} w{warps} s{stages} {mark}   {ms:7.3f} ms  "
                  f"{flops / ms / 1e9:6.0f} TFLOP/s  diff {rel(got, want):.1e}, "
                  f"{(got != want).float().mean().item():.1e} of elements differ", flush=True)

    variants = [("plain mlp", script.plain_ops().mlp), ("fast mlp", chosen_op(script, "mlp", dev))]
    if args.compare:
        variants.append((f"{args.compare} fast mlp", chosen_op(load_script(args.compare, "compared"), "mlp", dev)))
    reference = None
    for name, op in variants:
        fn = torch.compile(lambda a, w1, w2, op=op: op(a, w1, w2), dynamic=False)
        leaves = [t.clone().requires_grad_() for t in (x[None], fc_w, proj_w)]

        def step():
            for leaf in leaves:
                leaf.grad = None
            out = fn(*leaves)
            out.backward(g[None])
            return out

        out = step()
        ms = median_ms(step, args.reps)
        outs = [out.detach()] + [leaf.grad for leaf in leaves]
        reference = reference or outs
        diff = max(rel(a, b) for a, b in zip(outs, reference))
        print(f"layer {name:30s} fwd+bwd {ms:7.3f} ms  diff {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()

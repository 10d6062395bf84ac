"""Muon's step on the M model's matrices, timed alone on one GPU: momentum, batched Newton-Schulz, update.

    python bench/muon.py [--scripts train_gpt_M.py OTHER_M.py ...] [--steps 20] [--gram]

Random gradients (the same for every script), the model's parameters in bfloat16. For each script:
the median time of one step (CUDA events, synchronised around it), the mean of `--steps` steps queued
back to back (what a training step sees), Newton-Schulz alone on each batch shape, and the largest
relative difference of the parameters after one step from the first script's. With --gram, then the
Gram products of Newton-Schulz alone at the model's batch shapes, GPU time from the profiler: cuBLAS's full
product against the last script's fused kernel (the tiles on and above the diagonal) for a few tiles, with
TFLOP/s of the full product's FLOPs.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import chosen_op, gpu_ms, kernels_of, load_script, median_ms  # noqa: E402


GRAM_SETTINGS = [(128, 64, 8, 3), (128, 64, 4, 4), (128, 128, 8, 2), (64, 64, 4, 4)]  # rows, inner, warps, stages


def gram_products(script, dev: torch.device) -> None:
    gen = torch.Generator(device=dev).manual_seed(2)
    b, c = script.NS_COEFFS[1:] if hasattr(script, "NS_COEFFS") else (-4.775, 2.0315)
    for n, R, K in ((48, 768, 768), (24, 768, 3072), (24, 768, 768)):
        X = (torch.randn(n, R, K, device=dev, generator=gen) / K**0.5).bfloat16()
        A = torch.bmm(X, X.mT)
        flops = 2 * n * R * R * K
        for name, with_c in (("X X^T", False), ("b A + c X X^T", True)):
            def cublas():
                return torch.baddbmm(A, X, X.mT, beta=b, alpha=c) if with_c else torch.bmm(X, X.mT)
            want = cublas()
            ms = gpu_ms(cublas)
            print(
                f"{n}x{R}x{K} {name:14s} cuBLAS                {ms:6.3f} ms {flops / ms / 1e9:5.0f} TFLOP/s", flush=True
            )
            for block, block_k, warps, stages in GRAM_SETTINGS:
                def run():
                    return kernels_of(script).fused_gram(X, A if with_c else None, b if with_c else 0.0,
                                                         c if with_c else 1.0, tile=(block, block_k), num_warps=warps,
                                                         num_stages=stages)
                try:
                    got = run()
                    ms = gpu_ms(run)
                except Exception as e:  # a tile that does not fit in shared memory, say
                    print(
                        f"{n}x{R}x{K} {name:14s} fused {block}x{block_k} w{warps} s{stages}: "
                        f"{type(e).__name__} {str(e)[:80]}"
                    )
                    continue
                differ = (got != want).float().mean().item()
                print(
                    f"{n}x{R}x{K} {name:14s} fused {block:3d}x{block_k:3d} w{warps} s{stages} {ms:6.3f} ms "
                    f"{flops / ms / 1e9:5.0f} TFLOP/s (of the full product's FLOPs), {differ:.1e} of elements differ",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scripts", nargs="+", default=["train_gpt_M.py"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--gram", action="store_true", help="time the Gram products alone first")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/muon.py needs a CUDA GPU (it times kernels at the model's full size)")
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    first = None
    for i, path in enumerate(args.scripts):
        script = load_script(path, f"script{i}")
        cfg = script.Config()
        torch.manual_seed(0)
        model = script.GPT(cfg).to(device=dev, dtype=torch.bfloat16)
        gram_op = chosen_op(script, "gram", dev)
        matrices = [p for p in model.blocks.parameters() if p.ndim >= 2]
        gen = torch.Generator(device=dev).manual_seed(1)
        grads = [torch.randn(p.shape, device=dev, generator=gen).bfloat16() * 1e-3 for p in matrices]
        muon = script.Muon(matrices, lr=cfg.muon_lr, momentum=cfg.muon_momentum, ns_steps=cfg.ns_steps, gram_op=gram_op)
        for p, grad in zip(matrices, grads):
            p.grad = grad
        before = [p.detach().clone() for p in matrices]
        muon.step()
        moved = [p.detach().float() - b.float() for p, b in zip(matrices, before)]
        first = first or moved
        diff = max(((a - b).norm() / b.norm()).item() for a, b in zip(moved, first))
        single = median_ms(muon.step, 20)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(args.steps):
            muon.step()
        end.record()
        torch.cuda.synchronize()
        queued = start.elapsed_time(end) / args.steps
        ns = []
        for shape in sorted({(min(p.shape[-2:]), max(p.shape[-2:])) for p in matrices}):
            count = sum(
                p.numel() // (shape[0] * shape[1]) for p in matrices if (min(p.shape[-2:]), max(p.shape[-2:])) == shape
            )
            G = torch.randn(count, *shape, device=dev, generator=gen).bfloat16()
            ns_ms = median_ms(lambda: script.newton_schulz(G, cfg.ns_steps, gram_op), 20)
            ns.append(f"NS {count}x{shape[0]}x{shape[1]} {ns_ms:.3f} ms")
        print(f"{path:30s} step {single:6.3f} ms (synchronised), {queued:6.3f} ms (queued); {'; '.join(ns)}; "
              f"update diff {diff:.1e}", flush=True)
        del model, muon, matrices, grads
        torch.cuda.empty_cache()
    if args.gram:  # last: after a profiler has run, this process's launches are slower (Muon's step took 2x)
        gram_products(load_script(args.scripts[-1], "gram_script"), dev)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()

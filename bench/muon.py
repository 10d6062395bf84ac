"""Muon's step on the M model's matrices, timed alone on one GPU: momentum, batched Newton-Schulz, update.

    python bench/muon.py [--scripts train_gpt_M.py OTHER_M.py ...] [--steps 20]

Random gradients (the same for every script), the model's parameters in bfloat16. For each script:
the median time of one step (CUDA events, synchronised around it), the mean of `--steps` steps queued
back to back (what a training step sees), Newton-Schulz alone on each batch shape, and the largest
relative difference of the parameters after one step from the first script's.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention import median_ms  # noqa: E402
from loss import load_script  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scripts", nargs="+", default=["train_gpt_M.py"])
    parser.add_argument("--steps", type=int, default=20)
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
        matrices = [p for p in model.blocks.parameters() if p.ndim >= 2]
        gen = torch.Generator(device=dev).manual_seed(1)
        grads = [torch.randn(p.shape, device=dev, generator=gen).bfloat16() * 1e-3 for p in matrices]
        muon = script.Muon(matrices, lr=cfg.muon_lr, momentum=cfg.muon_momentum, ns_steps=cfg.ns_steps)
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
            count = sum(p.numel() // (shape[0] * shape[1]) for p in matrices if (min(p.shape[-2:]), max(p.shape[-2:])) == shape)
            G = torch.randn(count, *shape, device=dev, generator=gen).bfloat16()
            ns.append(f"NS {count}x{shape[0]}x{shape[1]} {median_ms(lambda: script.newton_schulz(G, cfg.ns_steps), 20):.3f} ms")
        print(f"{path:30s} step {single:6.3f} ms (synchronised), {queued:6.3f} ms (queued); {'; '.join(ns)}; "
              f"update diff {diff:.1e}", flush=True)
        del model, muon, matrices, grads
        torch.cuda.empty_cache()


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()

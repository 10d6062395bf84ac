"""The output layer + loss of one 65,536-token step, timed alone on one GPU.

    python bench/loss.py [--script train_gpt_M.py] [--chunks 4096 8192 16384] [--reps 10]
                         [--compare other_version_of_M.py] [--no_plain]

plain:     logits = (x @ w^T).float(), soft-cap, F.cross_entropy, the whole function compiled
           (what the first version of the scripts did: 65,536 x 50,304 float32 logits).
chunk=K:   fast_ops.py's output loss: K rows at a time, products in eager mode, each chunk's
           loss and gradient by the fused Triton kernel, gradients formed in the forward;
compiled chunk=K: the same with the chunk's loss and gradient by logit_loss_grad under torch.compile
           instead of the kernel (the fast loss on a GPU without Triton).
--compare times the chunked variants of a second version of the script (from another checkout, say
`git worktree add /tmp/prev HEAD~1`, with the fast_ops.py beside it; or a version from before
fast_ops.py, written out with `git show`) in the same process, on the same inputs.
For each: forward+backward time (median), the memory it needs above its inputs, and the
largest relative difference of loss and gradients from the first variant (plain unless --no_plain).
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import kernels_of, load_script, median_ms  # noqa: E402



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", default="train_gpt_M.py")
    parser.add_argument("--chunks", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--compare", default=None, help="a second version of the script, for its chunked variants")
    parser.add_argument("--no_plain", action="store_true", help="leave out the unchunked variant")
    args = parser.parse_args()
    script = load_script(args.script)
    cfg = script.Config()
    N, C, V = cfg.seq_len, cfg.model_dim, script.padded_vocab(cfg.vocab_size)
    cap, scale = cfg.logit_softcap, cfg.softcap_temp * cfg.model_dim**0.5
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    x0 = F.rms_norm(torch.randn(N, C, device=dev, generator=g), (C,)).bfloat16()
    w0 = (torch.randn(V, C, device=dev, generator=g) * 0.02).bfloat16()
    targets = torch.randint(0, cfg.vocab_size, (N,), device=dev, generator=g)

    def plain(x, w):
        logits = (x @ w.T).float()
        if cap > 0:
            logits = cap * torch.sigmoid(logits / scale)
        return F.cross_entropy(logits, targets)

    def chunked(module, k, compiled=False):
        ops = kernels_of(module)
        chunk_loss = torch.compile(ops.logit_loss_grad, dynamic=False) if compiled else ops.fused_logit_loss_grad
        return lambda x, w: ops.fast_output_loss(x, w, targets, cap, scale, chunk=k, chunk_loss=chunk_loss)

    variants = [] if args.no_plain else [("plain", torch.compile(plain, dynamic=False))]
    variants += [(f"chunk={k}", chunked(script, k)) for k in args.chunks]
    variants += [(f"compiled chunk={k}", chunked(script, k, compiled=True)) for k in args.chunks]
    if args.compare:
        other = load_script(args.compare, "compared")
        variants += [(f"{args.compare} chunk={k}", chunked(other, k)) for k in args.chunks]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, N={N} C={C} V={V} softcap={cap}")
    reference = None
    for name, fn in variants:
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()

        def step():
            x.grad = w.grad = None
            loss = fn(x, w)
            loss.backward()
            return loss

        ms = median_ms(step, args.reps)
        x.grad = w.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = step()
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - base) / 2**20
        outs = [loss.detach().float(), x.grad.float(), w.grad.float()]
        reference = reference or outs
        diff = max(((a - b).norm() / b.norm()).item() for a, b in zip(outs, reference))
        print(
            f"{name:24s} fwd+bwd {ms:7.2f} ms  memory above inputs {extra:8.0f} MiB  loss {loss.item():.5f}  "
            f"rel diff {diff:.2e}",
            flush=True,
        )


if __name__ == "__main__":
    main()

"""flex-attention kernel options for the baselines' attention, timed alone at full size on one GPU.

    python bench/attention.py [--seq_len 65536] [--reps 10] [--only 0 1] [--varlen] [--fa4_varlen]

q, k, v of one 65,536-token sequence (6 heads of 128, bfloat16) in documents of log-normal
length (bench/synthetic.py), the script's BlockMask (document, causal, 1024-token window) at
tile sizes 128 and 64, and a list of kernel options (the last: flex-attention's FLASH backend, which
needs the flash-attn-4 package; without it that line says why it failed). For each: forward and forward+backward
time (CUDA events, median of --reps after warm-up) and the largest difference of the output
and gradients from the first variant's. --varlen adds FlashAttention-2 (aten's varlen kernels)
with the documents as separate sequences and the same causal 1024-token window; --fa4_varlen the same
with flash-attn-4's kernels (`flash_attn.cute.flash_attn_varlen_func`), where the package is installed.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_script, median_ms  # noqa: E402
from synthetic import synthetic_tokens  # noqa: E402

VARIANTS = [  # (name, tile size of the BlockMask, kernel_options)
    ("tile128 default", 128, {}),
    ("tile128 fwd 128x128 w8 s2", 128,
     {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_warps": 8, "fwd_num_stages": 2}),
    ("tile128 bwd 64x64 w4 s3", 128,
     {**{f"bwd_BLOCK_{d}{i}": 64 for d in "MN" for i in (1, 2)}, "bwd_num_warps": 4, "bwd_num_stages": 3}),
    ("tile64 64x64 w4 s3", 64,
     {**{f"BLOCK_{d}{i}": 64 for d in "MN" for i in ("", 1, 2)}, "num_warps": 4, "num_stages": 3}),
    ("tile64 64x64 w8 s2", 64,
     {**{f"BLOCK_{d}{i}": 64 for d in "MN" for i in ("", 1, 2)}, "num_warps": 8, "num_stages": 2}),
    # flash-attn-4's CuTe kernels through flex-attention, where PyTorch and the package have them
    ("tile128 FLASH (flash-attn-4)", 128, {"BACKEND": "FLASH"}),
]


class VarlenAttention(torch.autograd.Function):
    """FlashAttention-2 over packed documents (aten's varlen kernels): causal, 1024-token window."""

    @staticmethod
    def forward(ctx, q_THD, k_THD, v_THD, cu_seqlens, max_len, scale, window):
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q_THD, k_THD, v_THD, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, True, False,
            scale=scale, window_size_left=window - 1, window_size_right=0)
        ctx.save_for_backward(q_THD, k_THD, v_THD, out, lse, cu_seqlens, rng, unused)
        ctx.args = (max_len, scale, window)
        return out

    @staticmethod
    def backward(ctx, grad_THD):
        q_THD, k_THD, v_THD, out, lse, cu_seqlens, rng, unused = ctx.saved_tensors
        max_len, scale, window = ctx.args
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad_THD.contiguous(), q_THD, k_THD, v_THD, out, lse, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, True,
            rng, unused, scale=scale, window_size_left=window - 1, window_size_right=0)
        return dq, dk, dv, None, None, None, None


def document_bounds(docs_T: torch.Tensor) -> tuple[torch.Tensor, int]:
    starts = torch.nonzero(docs_T[1:] != docs_T[:-1]).flatten() + 1
    T = docs_T.numel()
    cu = torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), T)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def fa2_varlen(cfg):
    return lambda q, k, v, cu, max_len: VarlenAttention.apply(q, k, v, cu, max_len, cfg.attn_scale, cfg.attn_window)


def fa4_varlen(cfg):
    from flash_attn.cute import flash_attn_varlen_func  # flash-attn-4; its Hopper kernels take a local window

    def attend(q, k, v, cu, max_len):
        return flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                                      max_seqlen_k=max_len, softmax_scale=cfg.attn_scale, causal=True,
                                      window_size=(cfg.attn_window - 1, 0))[0]

    return attend


def time_varlen(name, attend, cfg, docs, q, k, v, grad_out, reps: int, reference) -> None:
    """Times attend(q_THD, k_THD, v_THD, cu_seqlens, max_len) with the documents as separate sequences."""
    cu, max_len = document_bounds(docs)
    to_THD = lambda t: t[0].transpose(0, 1).contiguous()  # noqa: E731
    qv, kv, vv = (to_THD(t).requires_grad_() for t in (q, k, v))
    g_THD = to_THD(grad_out)

    def forward_backward():
        y = attend(qv, kv, vv, cu, max_len)
        y.backward(g_THD)
        return y

    def forward():
        with torch.no_grad():
            return attend(qv, kv, vv, cu, max_len)

    try:
        y = forward_backward()
        to_BHTD = lambda t: t.transpose(0, 1).unsqueeze(0)  # noqa: E731
        outs = [to_BHTD(y.detach()), to_BHTD(qv.grad), to_BHTD(kv.grad), to_BHTD(vv.grad)]
        for t in (qv, kv, vv):
            t.grad = None
        fwd, both = median_ms(forward, reps), median_ms(forward_backward, reps)
    except Exception as e:  # a package or GPU without this kernel
        lines = [line for line in str(e).splitlines() if line.strip()]
        print(f"{name:32s} failed: {type(e).__name__}: {' | '.join(lines[:4])[:600]}", flush=True)
        return
    diff = (
        max((a.float() - b.float()).abs().max().item() for a, b in zip(outs, reference)) if reference else float("nan")
    )
    label = f"{name} ({cu.numel() - 1} docs, max {max_len})"
    print(
        f"{label:32s} fwd {fwd:6.3f} ms  fwd+bwd {both:6.3f} ms  "
        f"(x{cfg.num_layers} layers: {both * cfg.num_layers:5.1f} ms)  max diff {diff:.2e}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", default="train_gpt_M.py")
    parser.add_argument("--seq_len", type=int, default=65536)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--only", nargs="*", type=int, default=None, help="indices of VARIANTS to run")
    parser.add_argument(
        "--varlen", action="store_true", help="also time FlashAttention-2 varlen (aten) on the same documents"
    )
    parser.add_argument(
        "--fa4_varlen", action="store_true", help="also time flash-attn-4's varlen kernels (needs the package)"
    )
    args = parser.parse_args()
    import torch._dynamo

    torch._dynamo.config.recompile_limit = 64
    script = load_script(args.script)
    cfg = script.Config()
    H, D = cfg.num_heads, cfg.model_dim // cfg.num_heads
    device = torch.device("cuda")
    tokens = torch.from_numpy(synthetic_tokens(args.seq_len, np.random.default_rng(0)).astype(np.int64)).to(device)
    docs = script.document_ids(tokens, cfg.eot_token)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, H, args.seq_len, D, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(3))
    grad_out = torch.randn(1, H, args.seq_len, D, device=device, dtype=torch.bfloat16, generator=gen)
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, T={args.seq_len}, {H} heads of {D}, "
        f"window {cfg.attn_window}"
    )
    compiled = torch.compile(script.flex_attention, dynamic=False)
    reference = None
    for i, (name, tile, options) in enumerate(VARIANTS):
        if args.only is not None and i not in args.only:
            continue
        script.FLEX_BLOCK = tile
        mask = script.block_mask(docs, cfg.attn_window)
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

        def forward():
            with torch.no_grad():
                return compiled(q, k, v, block_mask=mask, scale=cfg.attn_scale, kernel_options=options)

        def forward_backward():
            y = compiled(qg, kg, vg, block_mask=mask, scale=cfg.attn_scale, kernel_options=options)
            y.backward(grad_out)
            return y

        try:
            y = forward_backward()
            outs = [y.detach(), qg.grad, kg.grad, vg.grad]
            for t in (qg, kg, vg):
                t.grad = None
            fwd, both = median_ms(forward, args.reps), median_ms(forward_backward, args.reps)
        except Exception as e:  # an option set a Triton version or GPU does not take
            lines = [line for line in str(e).splitlines() if line.strip()]
            print(f"{name:32s} failed: {type(e).__name__}: {' | '.join(lines[:4])[:600]}", flush=True)
            continue
        if reference is None:
            reference = outs
        diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(outs, reference))
        print(
            f"{name:32s} fwd {fwd:6.3f} ms  fwd+bwd {both:6.3f} ms  "
            f"(x{cfg.num_layers} layers: {both * cfg.num_layers:5.1f} ms)  max diff {diff:.2e}",
            flush=True,
        )
    if args.varlen:
        time_varlen("varlen FA2", fa2_varlen(cfg), cfg, docs, q, k, v, grad_out, args.reps, reference)
    if args.fa4_varlen:
        try:
            attend = fa4_varlen(cfg)
        except Exception as e:  # the package, or one of its CUDA libraries, missing
            print(f"{'varlen FA4':32s} failed: {type(e).__name__}: {e}", flush=True)
        else:
            time_varlen("varlen FA4", attend, cfg, docs, q, k, v, grad_out, args.reps, reference)


if __name__ == "__main__":
    main()

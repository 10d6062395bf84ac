"""GPT speedrun baseline, one of two twin scripts: train_gpt_A.py (AdamW) and train_gpt_M.py (Muon).

    torchrun --standalone --nproc_per_node=8 train_gpt_M.py      # the baseline on 8 GPUs
    python train_gpt_M.py --preset=tiny                            # a small model on CPU
    python train_gpt_M.py --help                                   # every configuration field

SPEC.md states the math. The model section below is that math in plain PyTorch ops; the fast-ops
section holds drop-ins for some of those ops (less memory, more speed), each tested against its
plain op, and --fast_ops=false runs the plain ops alone. The twins differ only in their optimizer
section, the body of build_optimizers and configuration values: `diff train_gpt_A.py train_gpt_M.py`
is the ablation.
"""
import argparse
import dataclasses
import functools
import glob
import inspect
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch._dynamo  # imported before any process group, or gloo's threads outlive destroy_process_group
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # the fast ops then run their PyTorch paths (the loss compiled)
    triton = None
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton kernels run on the CPU (tests)

# -----------------------------------------------------------------------------
# Model: the math of SPEC.md in plain PyTorch ops. The model calls these ops through `self.ops`;
# with --fast_ops (the default) the ones fast_ops() names run as their drop-ins from the fast-ops section.

VOCAB_MULTIPLE = 128  # the output layer is padded to a multiple of this


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def rotary(x_BTHD: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE: rotate the pairs (x1, x2) of the head vector's two halves by the position's angles, in float32."""
    x1, x2 = x_BTHD.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, -x1 * sin + x2 * cos), dim=-1).type_as(x_BTHD)


def qk_norm_rope(qk_BTND: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Queries and keys side by side as 2H heads: RMS-normalised over the head dim, rotated, then
    split into the queries and the keys."""
    return rotary(rms_norm(qk_BTND), cos, sin).chunk(2, dim=2)


def relu_square(x: Tensor) -> Tensor:
    return F.relu(x).square()


def mlp(x: Tensor, fc_w: Tensor, proj_w: Tensor) -> Tensor:
    """The MLP: ReLU^2 between two bias-free linear maps."""
    return F.linear(relu_square(F.linear(x, fc_w)), proj_w)


def output_logits(x_NC: Tensor, w_VC: Tensor, softcap: float, softcap_scale: float) -> Tensor:
    """The output layer's logits in float32, soft-capped to (0, softcap) when softcap > 0."""
    z_NV = (x_NC @ w_VC.T).float()
    return softcap * torch.sigmoid(z_NV / softcap_scale) if softcap > 0 else z_NV


def output_loss(x_NC: Tensor, w_VC: Tensor, targets_N: Tensor, softcap: float, softcap_scale: float) -> Tensor:
    return F.cross_entropy(output_logits(x_NC, w_VC, softcap, softcap_scale), targets_N)


def document_ids(tokens_T: Tensor, eot_token: int) -> Tensor:
    """Running count of the end-of-text token, which starts every document."""
    return (tokens_T == eot_token).cumsum(0)


def make_mask_mod(docs_T: Tensor, window: int):
    """A query attends to keys at or before it, in its own document, fewer than `window` tokens back."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (docs_T[q_idx] == docs_T[kv_idx]) & (q_idx - kv_idx < window)

    return mask_mod


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: "Config", ops: "Ops"):
        super().__init__()
        dim, self.ops = cfg.model_dim, ops
        self.num_heads, self.head_dim, self.scale = cfg.num_heads, dim // cfg.num_heads, cfg.attn_scale
        bound = math.sqrt(3) * 0.5 / math.sqrt(dim)
        self.qkv_w = nn.Parameter(torch.empty(3, dim, dim).uniform_(-bound, bound))
        self.proj = nn.Linear(dim, dim, bias=False)
        self.proj.weight.detach().zero_()

    def forward(self, x_BTC: Tensor, mask: "BlockMask | Tensor", cos: Tensor, sin: Tensor) -> Tensor:
        B, T, C = x_BTC.shape
        # v in a product of its own: as a view of one qkv output it would keep q and k's inputs alive
        qk_BTND = F.linear(x_BTC, self.qkv_w[:2].flatten(0, 1)).view(B, T, 2 * self.num_heads, self.head_dim)
        v_BTHD = F.linear(x_BTC, self.qkv_w[2]).view(B, T, self.num_heads, self.head_dim)
        q_BTHD, k_BTHD = self.ops.qk_norm_rope(qk_BTND, cos, sin)
        y_BTHD = attention(q_BTHD, k_BTHD, v_BTHD, mask, self.scale)
        return self.proj(y_BTHD.reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: "Config", ops: "Ops"):
        super().__init__()
        self.ops = ops
        self.fc = nn.Linear(cfg.model_dim, cfg.mlp_ratio * cfg.model_dim, bias=False)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.model_dim, cfg.model_dim, bias=False)
        self.proj.weight.detach().zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.ops.mlp(x, self.fc.weight, self.proj.weight)


class Block(nn.Module):
    def __init__(self, cfg: "Config", ops: "Ops"):
        super().__init__()
        self.ops = ops
        self.attn = CausalSelfAttention(cfg, ops)
        self.mlp = MLP(cfg, ops)

    def forward(self, x: Tensor, mask: "BlockMask | Tensor", cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.ops.rms_norm(x), mask, cos, sin)
        return x + self.mlp(self.ops.rms_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: "Config"):
        super().__init__()
        self.ops = fast_ops(cfg) if cfg.fast_ops else plain_ops()
        vocab = padded_vocab(cfg.vocab_size)
        self.embed = nn.Embedding(vocab, cfg.model_dim)
        self.blocks = nn.ModuleList([Block(cfg, self.ops) for _ in range(cfg.num_layers)])
        self.lm_head = nn.Linear(cfg.model_dim, vocab, bias=False)
        if cfg.tied_embed:
            self.embed.weight = self.lm_head.weight
        else:
            self.lm_head.weight.detach().zero_()
        self.softcap, self.softcap_scale = cfg.logit_softcap, cfg.softcap_temp * math.sqrt(cfg.model_dim)
        self.eot_token, self.window = cfg.eot_token, cfg.attn_window
        cos, sin = rope_tables(cfg.seq_len, cfg.model_dim // cfg.num_heads, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def body(self, inputs_T: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Embedding, blocks and final norm: the output layer's input, x_NC."""
        mask = attention_mask(document_ids(inputs_T, self.eot_token), self.window)
        x = self.ops.rms_norm(self.embed(inputs_T)[None])
        for block in self.blocks:
            x = block(x, mask, cos, sin)
        return self.ops.rms_norm(x)[0]

    def forward(self, inputs_T: Tensor, targets_T: Tensor | None = None) -> Tensor:
        """The mean loss over the targets; without targets, the float32 logits of every position."""
        T = inputs_T.numel()
        if T > self.rope_cos.size(1):
            raise ValueError(f"{T} tokens, more than the model's seq_len of {self.rope_cos.size(1)}")
        # the RoPE tables enter the compiled body as inputs: made inside it, every kernel recomputes cos and sin
        x_NC = self.body(inputs_T, self.rope_cos[:, :T], self.rope_sin[:, :T])
        if targets_T is None:
            return output_logits(x_NC, self.lm_head.weight, self.softcap, self.softcap_scale)
        return self.ops.output_loss(x_NC, self.lm_head.weight, targets_T, self.softcap, self.softcap_scale)


def padded_vocab(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def rope_tables(T: int, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos and sin of the truncated-RoPE angles, float32 on the CPU, shaped (1, T, 1, head_dim/2) to
    broadcast over x_BTHD: head_dim/4 frequencies from 1 down to 1/base radians per token, then
    head_dim/4 zeros. The model keeps them as buffers, so that casting it to bfloat16 rounds them (SPEC)."""
    quarter = head_dim // 4
    freqs = (1 / base) ** torch.linspace(0, 1, quarter, dtype=torch.float32)
    angle_TF = torch.outer(torch.arange(T, dtype=torch.float32), torch.cat([freqs, freqs.new_zeros(quarter)]))
    return angle_TF.cos()[None, :, None, :], angle_TF.sin()[None, :, None, :]


# -----------------------------------------------------------------------------
# Attention: flex-attention with a BlockMask on GPU; on CPU, where flex-attention has no backward,
# scaled_dot_product_attention with the same mask made dense

FLEX_BLOCK = 128  # flex-attention tile size, in tokens


def attention_mask(docs_T: Tensor, window: int) -> BlockMask | Tensor:
    """Built once per forward and shared by every layer."""
    return block_mask(docs_T, window) if docs_T.is_cuda else dense_mask(docs_T, window)


def attention(q_BTHD: Tensor, k_BTHD: Tensor, v_BTHD: Tensor, mask: BlockMask | Tensor, scale: float) -> Tensor:
    q_BHTD, k_BHTD, v_BHTD = (t.transpose(1, 2) for t in (q_BTHD, k_BTHD, v_BTHD))
    if isinstance(mask, BlockMask):
        y_BHTD = flex_attention(q_BHTD, k_BHTD, v_BHTD, block_mask=mask, scale=scale)
    else:
        y_BHTD = F.scaled_dot_product_attention(q_BHTD, k_BHTD, v_BHTD, attn_mask=mask, scale=scale)
    return y_BHTD.transpose(1, 2)


def dense_mask(docs_T: Tensor, window: int) -> Tensor:
    idx = torch.arange(docs_T.numel(), device=docs_T.device)
    return make_mask_mod(docs_T, window)(None, None, idx[:, None], idx[None, :])


def block_mask(docs_T: Tensor, window: int) -> BlockMask:
    """Flex-attention BlockMask built from tile-level bounds (no T x T evaluation): a tile is
    skipped, computed in full, or computed with mask_mod, from its documents and distances."""
    num_blocks = docs_T.numel() // FLEX_BLOCK
    docs_NB = docs_T.view(num_blocks, FLEX_BLOCK)
    first_N, last_N = docs_NB[:, 0], docs_NB[:, -1]
    block = torch.arange(num_blocks, device=docs_T.device)
    q_N1, kv_1N = block[:, None], block[None, :]
    offset_NN = (q_N1 - kv_1N) * FLEX_BLOCK
    any_pair = (q_N1 >= kv_1N) & (offset_NN - (FLEX_BLOCK - 1) < window)
    any_pair &= (first_N[:, None] <= last_N[None, :]) & (last_N[:, None] >= first_N[None, :])
    all_pairs = (q_N1 > kv_1N) & (offset_NN + (FLEX_BLOCK - 1) < window)
    all_pairs &= (first_N[:, None] == last_N[:, None]) & (first_N[None, :] == last_N[None, :])
    all_pairs &= first_N[:, None] == first_N[None, :]
    partial = any_pair & ~all_pairs

    def kv_blocks(m_NN: Tensor) -> tuple[Tensor, Tensor]:
        order = torch.argsort(m_NN.to(torch.int32), dim=-1, descending=True, stable=True)
        return m_NN.sum(-1, dtype=torch.int32)[None, None], order.to(torch.int32)[None, None]

    return BlockMask.from_kv_blocks(
        *kv_blocks(partial), *kv_blocks(all_pairs), BLOCK_SIZE=FLEX_BLOCK, mask_mod=make_mask_mod(docs_T, window)
    )


# -----------------------------------------------------------------------------
# Fast ops: drop-ins for named plain ops of the model section, with the same signature. Each keeps
# less for the backward or runs faster, and is tested against its plain op; check_fast_ops() repeats
# that test at start-up, so an edited plain op is never silently replaced by a stale drop-in.

LSE_BLOCK = 128  # logits per partial max and sum of the loss's log-sum-exp


class KeptOutputRMSNorm(torch.autograd.Function):
    """rms_norm keeping its output y and inverse RMS r for the backward, not its input x:
    dx = r * (g - y * mean(g * y)) for the output gradient g."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x_f32 = x.float()
        rinv = torch.rsqrt(x_f32.square().mean(-1, keepdim=True) + torch.finfo(x_f32.dtype).eps)
        y = (x_f32 * rinv).type_as(x)
        ctx.save_for_backward(y, rinv)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        y, rinv = ctx.saved_tensors
        n, g = y.float(), grad.float()
        return (rinv * (g - n * (g * n).mean(-1, keepdim=True))).type_as(grad)


def rotate(x_BTHD: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The RoPE rotation of the fast ops' own; with -sin, its inverse."""
    x1, x2 = x_BTHD.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, -x1 * sin + x2 * cos), dim=-1).type_as(x_BTHD)


def norm_rope(x_BTND: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """rotary(rms_norm(x)) in PyTorch, and the float32 inverse RMS r that its backward needs."""
    x_f32 = x_BTND.float()
    rinv_BTN1 = torch.rsqrt(x_f32.square().mean(-1, keepdim=True) + torch.finfo(x_f32.dtype).eps)
    return rotate((x_f32 * rinv_BTN1).type_as(x_BTND), cos, sin), rinv_BTN1


def norm_rope_grad(g_BTND: Tensor, y_BTND: Tensor, rinv_BTN1: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """d/dx of rotary(rms_norm(x)) from its output y: the rotation is orthogonal, so y rotated back is the
    normalised vector n, and dx = r * (g_n - n * mean(g_n * n)) for the output gradient rotated back, g_n."""
    n, g = rotate(y_BTND.float(), cos, -sin), rotate(g_BTND.float(), cos, -sin)
    return (rinv_BTN1 * (g - n * (g * n).mean(-1, keepdim=True))).type_as(g_BTND)


class FusedNormRope(torch.autograd.Function):
    """qk_norm_rope keeping its outputs (which attention keeps anyway) and the inverse RMS r, not its input.
    On CUDA one Triton kernel each way: the forward writes the queries and the keys apart, the backward
    reads their two gradients where attention left them and writes the one input gradient (no concatenation)."""

    @staticmethod
    def forward(ctx, qk_BTND: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        if qk_BTND.is_cuda and norm_rope_kernel_ready(qk_BTND, cos, sin):
            q_BTHD, k_BTHD, rinv_BTN1 = fused_norm_rope(qk_BTND, cos, sin)
        else:
            y_BTND, rinv_BTN1 = norm_rope(qk_BTND, cos, sin)
            q_BTHD, k_BTHD = (y.contiguous() for y in y_BTND.chunk(2, dim=2))
        ctx.save_for_backward(q_BTHD, k_BTHD, rinv_BTN1, cos, sin)
        return q_BTHD, k_BTHD

    @staticmethod
    def backward(ctx, grad_q: Tensor, grad_k: Tensor):
        q_BTHD, k_BTHD, rinv_BTN1, cos, sin = ctx.saved_tensors
        if q_BTHD.is_cuda and norm_rope_kernel_ready(q_BTHD, cos, sin):
            return fused_norm_rope_grad(grad_q, grad_k, q_BTHD, k_BTHD, rinv_BTN1, cos, sin), None, None
        g_BTND, y_BTND = torch.cat((grad_q, grad_k), dim=2), torch.cat((q_BTHD, k_BTHD), dim=2)
        return norm_rope_grad(g_BTND, y_BTND, rinv_BTN1, cos, sin), None, None


class FusedMLP(torch.autograd.Function):
    """mlp with ReLU^2 inside the products: the first product's epilogue squares it, and in the backward the
    product that makes the hidden gradient multiplies it by ReLU^2's derivative, 2 relu(h) = 2 sqrt(y).
    The hidden activations h, and their gradient before the derivative, never reach memory: per layer
    four passes over the T x 4C hidden tensor fewer. Keeps the input x and the output y of ReLU^2."""

    @staticmethod
    def forward(ctx, x: Tensor, fc_w: Tensor, proj_w: Tensor) -> Tensor:
        x_NC = x.reshape(-1, x.size(-1))
        y_NH = matmul_relu_square(x_NC, fc_w)
        ctx.save_for_backward(x_NC, y_NH, fc_w, proj_w)
        ctx.x_shape = x.shape
        return (y_NH @ proj_w.T).view(*x.shape[:-1], proj_w.size(0))

    @staticmethod
    def backward(ctx, grad: Tensor):
        x_NC, y_NH, fc_w, proj_w = ctx.saved_tensors
        g_NC = grad.reshape(-1, grad.size(-1)).contiguous()
        dh_NH = matmul_relu_square_grad(g_NC, proj_w, y_NH)
        return (dh_NH @ fc_w).view(ctx.x_shape), dh_NH.T @ x_NC, g_NC.T @ y_NH


def matmul_relu_square(x_NC: Tensor, w_HC: Tensor) -> Tensor:
    """relu(x @ w^T)^2, the product rounded to the inputs' dtype first, as an unfused product would write it."""
    if x_NC.is_cuda and triton is not None and tma_ready(x_NC, w_HC):
        return fused_matmul_epilogue(x_NC, w_HC, None, b_kn=False)
    return F.relu(x_NC @ w_HC.T).square()


def matmul_relu_square_grad(g_NC: Tensor, w_CH: Tensor, y_NH: Tensor) -> Tensor:
    """(g @ w) * 2 sqrt(y): the gradient before ReLU^2 from the gradient after it and its output y."""
    if g_NC.is_cuda and triton is not None and tma_ready(g_NC, w_CH, y_NH):
        return fused_matmul_epilogue(g_NC, w_CH, y_NH, b_kn=True)
    return (2 * y_NH.float().sqrt() * (g_NC @ w_CH).float()).type_as(g_NC)


def blocked_logsumexp(z_nV: Tensor) -> Tensor:
    """logsumexp over the last dim from the maxima and sums of blocks of LSE_BLOCK logits: the
    compiler reads each block once, where a whole row would be read once for its max and again for its sum."""
    n, V = z_nV.shape
    block = LSE_BLOCK if V % LSE_BLOCK == 0 else V
    z_nbB = z_nV.view(n, V // block, block)
    max_nb = z_nbB.amax(-1)
    sum_nb = torch.exp(z_nbB - max_nb[..., None]).sum(-1)
    max_n = max_nb.amax(-1)
    return max_n + torch.log((sum_nb * torch.exp(max_nb - max_n[:, None])).sum(-1))


def logit_loss_grad(logits_nV: Tensor, targets_n: Tensor, softcap: float, softcap_scale: float, grad_scale: float,
                    grads: bool) -> tuple[Tensor, Tensor | None]:
    """Per-row cross-entropy of one chunk of logits in float32 (soft-capped when softcap > 0) and, with
    grads, d(grad_scale * summed loss)/d(logits) rounded to the logits' dtype, as autograd would."""
    z_nV = logits_nV.float()
    if softcap > 0:
        sig_nV = torch.sigmoid(z_nV / softcap_scale)
        z_nV = softcap * sig_nV
    lse_n = blocked_logsumexp(z_nV)
    loss_n = lse_n - z_nV.gather(1, targets_n[:, None])[:, 0]
    if not grads:
        return loss_n, None
    onehot_nV = torch.arange(z_nV.size(1), device=targets_n.device) == targets_n[:, None]
    grad_nV = (torch.exp(z_nV - lse_n[:, None]) - onehot_nV.float()) * grad_scale
    if softcap > 0:
        grad_nV = grad_nV * (softcap / softcap_scale) * sig_nV * (1 - sig_nV)
    return loss_n, grad_nV.to(logits_nV.dtype)


# The fused loss kernel: per row of bf16 (or float32) logits, the float32 log-sum-exp, the row's loss and
# the gradient, written over the logits (measured on one H100, 8,192 x 50,304 logits, in its development
# versions: 0.68-0.70 ms plain and 0.77-0.78 ms soft-capped, against 1.3 / 1.9 ms for the compiled PyTorch op;
# bench/NOTES.md).
LOSS_BLOCK_V = 4096  # logits of a row per step of the kernel's loops
LOSS_NUM_WARPS = 8
FIXED_SHIFT_MAX_SOFTCAP = 60.0  # up to this cap, exp(z - softcap) stays a normal float32 for z in [0, cap]

if triton is not None:

    @triton.jit
    def _exp2(x, FAST: tl.constexpr):
        """2^x. FAST: libdevice's flush-to-zero version, one special-function instruction where tl.exp2 adds
        subnormal handling around it (results below 2^-126 become 0). The interpreter has no libdevice."""
        if FAST:
            return libdevice.exp2(x)
        return tl.exp2(x)

    @triton.jit
    def _sigmoid_parts(x, k2, FAST: tl.constexpr):
        """s = sigmoid(x / scale) and 1 - s = e * s, with k2 = -log2(e) / scale: one exp2 and one division,
        and no cancellation in 1 - s as s -> 1. FAST divides approximately (2 ulp, as '/' does), without
        the range checks of the full division."""
        MAX_EXPONENT: tl.constexpr = 64.0  # e <= 2^64: finite, and 1 + e within the fast division's range
        a = x * k2
        e = _exp2(tl.where(a > MAX_EXPONENT, MAX_EXPONENT, a), FAST)
        if FAST:
            s = libdevice.fast_dividef(1.0, 1.0 + e)
        else:
            s = 1.0 / (1.0 + e)
        return s, e * s

    @triton.jit
    def _loss_pass1_block(x, mask, acc, m_vec, k2, cap, cap_log2e, SOFTCAP: tl.constexpr, FIXED_SHIFT: tl.constexpr,
                          MASKED: tl.constexpr, FAST: tl.constexpr):
        """One block of pass 1: per lane, the running sum of exp(z - shift) and (without a fixed shift) the max.
        With the soft-cap, z = cap * s lies in [0, cap]: the shift is cap and the sum needs no max."""
        LOG2E: tl.constexpr = 1.4426950408889634
        if FIXED_SHIFT:
            s, t = _sigmoid_parts(x, k2, FAST)
            p = _exp2(t * -cap_log2e, FAST)  # exp(z - cap), z = cap * s
            acc += tl.where(mask, p, 0.0) if MASKED else p
        else:
            if SOFTCAP:
                s, t = _sigmoid_parts(x, k2, FAST)
                x = cap * s
            v = tl.where(mask, x, float("-inf")) if MASKED else x
            d = v - m_vec
            e = _exp2(-tl.abs(d) * LOG2E, FAST)  # one exp per element: the larger of v and the max gets 1
            acc = tl.where(d > 0.0, acc * e + 1.0, acc + e)
            m_vec = tl.maximum(m_vec, v)
        return acc, m_vec

    @triton.jit
    def _logit_loss_grad_kernel(logits_ptr, targets_ptr, loss_ptr, V, stride_row, k2, cap, cap_log2e, g_scale,
                                SOFTCAP: tl.constexpr, FIXED_SHIFT: tl.constexpr, BLOCK_V: tl.constexpr,
                                FAST: tl.constexpr, ROUND_RNE: tl.constexpr):
        """One program per row. Pass 1 reads the row once, the whole blocks without masks, then the last
        partial block. Pass 2 reads the row again, last block first (still in L2), and stores the gradient
        over it, evict-first so that the stores do not push pass 1's blocks out of L2. Each loop loads its
        next block before working on the current one."""
        LOG2E: tl.constexpr = 1.4426950408889634
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * stride_row
        cols = tl.arange(0, BLOCK_V)
        target = tl.load(targets_ptr + row).to(tl.int32)
        x_t = tl.load(row_ptr + target).to(tl.float32)
        acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        m_vec = tl.full([BLOCK_V], -3.4028234663852886e38, dtype=tl.float32)
        v_whole = (V // BLOCK_V) * BLOCK_V
        x_next = tl.load(row_ptr + cols, mask=cols < V, eviction_policy="evict_last")
        for start in range(0, v_whole, BLOCK_V):
            x = x_next.to(tl.float32)
            x_next = tl.load(row_ptr + start + BLOCK_V + cols, mask=cols < V - start - BLOCK_V, eviction_policy="evict_last")
            acc, m_vec = _loss_pass1_block(x, None, acc, m_vec, k2, cap, cap_log2e, SOFTCAP, FIXED_SHIFT, False, FAST)
        for start in range(v_whole, V, BLOCK_V):  # the partial block, if any
            acc, m_vec = _loss_pass1_block(x_next.to(tl.float32), cols < V - start, acc, m_vec, k2, cap, cap_log2e,
                                           SOFTCAP, FIXED_SHIFT, True, FAST)
        if FIXED_SHIFT:
            shift = cap
            total = tl.sum(acc, axis=0)
        else:
            shift = tl.max(m_vec, axis=0)
            total = tl.sum(acc * tl.exp2((m_vec - shift) * LOG2E), axis=0)
        if FIXED_SHIFT:
            s_t, t_t = _sigmoid_parts(x_t, k2, False)
            shift_minus_z_t = cap * t_t  # cap - cap * s_t, without the cancellation
        elif SOFTCAP:
            s_t, t_t = _sigmoid_parts(x_t, k2, False)
            shift_minus_z_t = shift - cap * s_t
        else:
            shift_minus_z_t = shift - x_t
        tl.store(loss_ptr + row, shift_minus_z_t + tl.log(total))
        c1 = g_scale / total
        last = (tl.cdiv(V, BLOCK_V) - 1) * BLOCK_V
        x_next = tl.load(row_ptr + last + cols, mask=cols < V - last, eviction_policy="evict_first")
        for back in range(0, tl.cdiv(V, BLOCK_V)):
            start = last - back * BLOCK_V
            x = x_next.to(tl.float32)
            prev = start - BLOCK_V
            x_next = tl.load(row_ptr + prev + cols, mask=cols < tl.where(prev >= 0, V - prev, 0), eviction_policy="evict_first")
            if SOFTCAP:
                s, t = _sigmoid_parts(x, k2, FAST)
                q = _exp2(t * -cap_log2e if FIXED_SHIFT else (cap * s - shift) * LOG2E, FAST) * c1
                g = tl.where(cols == target - start, q - g_scale, q) * (s * t)
            else:
                q = _exp2((x - shift) * LOG2E, FAST) * c1
                g = tl.where(cols == target - start, q - g_scale, q)
            if ROUND_RNE:  # the interpreter's float32 -> bfloat16 cast truncates; the GPU's rounds to nearest even
                b = g.to(tl.uint32, bitcast=True)
                g = (((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)
            tl.store(row_ptr + start + cols, g.to(logits_ptr.dtype.element_ty), mask=cols < V - start,
                     eviction_policy="evict_first")


def fused_logit_loss_grad(logits_nV: Tensor, targets_n: Tensor, softcap: float, softcap_scale: float, grad_scale: float,
                          grads: bool) -> tuple[Tensor, Tensor]:
    """logit_loss_grad as one Triton kernel that writes the gradient over the logits (also without grads:
    evaluation just discards it). Rows must be contiguous; on CPU it runs under TRITON_INTERPRET=1."""
    n, V = logits_nV.shape
    assert logits_nV.stride(1) == 1 and targets_n.shape == (n,), "rows of logits must be contiguous, one target each"
    use_cap = softcap > 0
    loss_n = torch.empty(n, dtype=torch.float32, device=logits_nV.device)
    _logit_loss_grad_kernel[(n,)](
        logits_nV, targets_n, loss_n, V, logits_nV.stride(0), -1.4426950408889634 / softcap_scale if use_cap else 0.0,
        softcap, softcap * 1.4426950408889634, grad_scale * softcap / softcap_scale if use_cap else grad_scale,
        SOFTCAP=use_cap, FIXED_SHIFT=use_cap and softcap <= FIXED_SHIFT_MAX_SOFTCAP, BLOCK_V=min(LOSS_BLOCK_V, triton.next_power_of_2(V)),
        FAST=not TRITON_INTERPRETED, ROUND_RNE=TRITON_INTERPRETED and logits_nV.dtype == torch.bfloat16, num_warps=LOSS_NUM_WARPS,
    )
    return loss_n, logits_nV


# qk_norm_rope's kernels: a program takes a block of NORM_ROPE_BLOCK_T tokens and goes through their 2H heads,
# so that it loads the tables once; the head vector's two halves are two tiles, in float32 with the plain op's
# roundings. q and k are two outputs, so that the backward takes attention's two gradients as they are.
NORM_ROPE_BLOCK_T = 8  # tokens per program: 4 to 32 all run at memory speed on an H100 (bench/qk_norm_rope.py)
NORM_ROPE_NUM_WARPS = 2  # warps per program

if triton is not None:

    @triton.jit
    def _round_rne(x, dtype: tl.constexpr, EMULATE: tl.constexpr):
        """x rounded to dtype, to nearest even: with EMULATE, by hand (the interpreter's bfloat16 cast truncates)."""
        if EMULATE:
            b = x.to(tl.uint32, bitcast=True)
            x = (((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)
        return x.to(dtype)

    @triton.jit
    def _token_block(cos_ptr, sin_ptr, T, sc_t, D: tl.constexpr, BLOCK_T: tl.constexpr):
        """This program's tokens t (a column), the half head's dims d (a row), which tokens exist, and their
        cos and sin in float32, loaded once for all the heads."""
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]
        d = tl.arange(0, D // 2)[None, :]
        inside = t < T
        c = tl.load(cos_ptr + t * sc_t + d, mask=inside).to(tl.float32)
        s = tl.load(sin_ptr + t * sc_t + d, mask=inside).to(tl.float32)
        return t, d, inside, c, s

    @triton.jit
    def _norm_rope_head(x_ptr, q_ptr, k_ptr, rinv_ptr, c, s, t, d, inside, b, head, T, sx_b, sx_t, sx_h, eps,
                        H: tl.constexpr, D: tl.constexpr, EMULATE: tl.constexpr):
        """One head of _norm_rope_kernel's token block."""
        x = x_ptr + b * sx_b + t * sx_t + head * sx_h + d
        x1, x2 = tl.load(x, mask=inside, other=0.0).to(tl.float32), tl.load(x + D // 2, mask=inside, other=0.0).to(tl.float32)
        r = tl.math.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / D + eps)[:, None]
        dtype: tl.constexpr = q_ptr.dtype.element_ty
        n1, n2 = _round_rne(x1 * r, dtype, EMULATE).to(tl.float32), _round_rne(x2 * r, dtype, EMULATE).to(tl.float32)
        y1, y2 = _round_rne(n1 * c + n2 * s, dtype, EMULATE), _round_rne(n2 * c - n1 * s, dtype, EMULATE)
        tl.store(rinv_ptr + (b * 2 * H + head) * T + t, r, mask=inside)
        if head < H:
            y = q_ptr + ((b * T + t) * H + head) * D + d
        else:
            y = k_ptr + ((b * T + t) * H + head - H) * D + d
        tl.store(y, y1, mask=inside)
        tl.store(y + D // 2, y2, mask=inside)

    @triton.jit
    def _norm_rope_kernel(x_ptr, q_ptr, k_ptr, rinv_ptr, cos_ptr, sin_ptr, T, sx_b, sx_t, sx_h, sc_t, eps,
                          H: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, EMULATE: tl.constexpr):
        """Program (token block, batch), head by head: y = rotate(n), n = x * r rounded, r = rsqrt(mean(x^2) + eps);
        heads below H are queries, the others keys. x's last dim is contiguous; q and k are contiguous, r is
        batch x head x token."""
        b = tl.program_id(1)
        t, d, inside, c, s = _token_block(cos_ptr, sin_ptr, T, sc_t, D, BLOCK_T)
        for head in tl.range(0, 2 * H):
            _norm_rope_head(x_ptr, q_ptr, k_ptr, rinv_ptr, c, s, t, d, inside, b, head, T, sx_b, sx_t, sx_h, eps, H, D, EMULATE)

    @triton.jit
    def _norm_rope_grad_head(gq_ptr, gk_ptr, q_ptr, k_ptr, rinv_ptr, dx_ptr, c, s, t, d, inside, b, head, T, sq_b, sq_t,
                             sq_h, sk_b, sk_t, sk_h, H: tl.constexpr, D: tl.constexpr, EMULATE: tl.constexpr):
        """One head of _norm_rope_grad_kernel's token block."""
        if head < H:
            g = gq_ptr + b * sq_b + t * sq_t + head * sq_h + d
            y = q_ptr + ((b * T + t) * H + head) * D + d
        else:
            g = gk_ptr + b * sk_b + t * sk_t + (head - H) * sk_h + d
            y = k_ptr + ((b * T + t) * H + head - H) * D + d
        g1, g2 = tl.load(g, mask=inside, other=0.0).to(tl.float32), tl.load(g + D // 2, mask=inside, other=0.0).to(tl.float32)
        y1, y2 = tl.load(y, mask=inside, other=0.0).to(tl.float32), tl.load(y + D // 2, mask=inside, other=0.0).to(tl.float32)
        n1, n2 = y1 * c - y2 * s, y1 * s + y2 * c
        gn1, gn2 = g1 * c - g2 * s, g1 * s + g2 * c
        mean = ((tl.sum(gn1 * n1, 1) + tl.sum(gn2 * n2, 1)) / D)[:, None]
        r = tl.load(rinv_ptr + (b * 2 * H + head) * T + t, mask=inside, other=0.0)
        dtype: tl.constexpr = dx_ptr.dtype.element_ty
        dx = dx_ptr + ((b * T + t) * 2 * H + head) * D + d
        tl.store(dx, _round_rne(r * (gn1 - n1 * mean), dtype, EMULATE), mask=inside)
        tl.store(dx + D // 2, _round_rne(r * (gn2 - n2 * mean), dtype, EMULATE), mask=inside)

    @triton.jit
    def _norm_rope_grad_kernel(gq_ptr, gk_ptr, q_ptr, k_ptr, rinv_ptr, cos_ptr, sin_ptr, dx_ptr, T, sq_b, sq_t, sq_h,
                               sk_b, sk_t, sk_h, sc_t, H: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr,
                               EMULATE: tl.constexpr):
        """Program (token block, batch), head by head: dx = r * (g_n - n * mean(g_n * n)), n and g_n the output and
        its gradient rotated back. The gradients' last dim is contiguous; q, k and dx are contiguous, r is
        batch x head x token."""
        b = tl.program_id(1)
        t, d, inside, c, s = _token_block(cos_ptr, sin_ptr, T, sc_t, D, BLOCK_T)
        for head in tl.range(0, 2 * H):
            _norm_rope_grad_head(gq_ptr, gk_ptr, q_ptr, k_ptr, rinv_ptr, dx_ptr, c, s, t, d, inside, b, head, T, sq_b, sq_t,
                                 sq_h, sk_b, sk_t, sk_h, H, D, EMULATE)


def norm_rope_kernel_ready(x_BTND: Tensor, cos: Tensor, sin: Tensor) -> bool:
    """Triton present, a power-of-two half head, and the tables' last dim contiguous."""
    half = x_BTND.size(-1) // 2
    return triton is not None and x_BTND.size(-1) == 2 * half and half & (half - 1) == 0 and cos.stride(-1) == sin.stride(-1) == 1


def fused_norm_rope(qk_BTND: Tensor, cos: Tensor, sin: Tensor, block_t: int = NORM_ROPE_BLOCK_T,
                    num_warps: int = NORM_ROPE_NUM_WARPS) -> tuple[Tensor, Tensor, Tensor]:
    """norm_rope of the 2H heads as one Triton kernel: the queries, the keys and the inverse RMS.
    On CPU it runs under TRITON_INTERPRET=1. The launch settings exist for bench/qk_norm_rope.py."""
    B, T, N, D = qk_BTND.shape
    x = qk_BTND if qk_BTND.stride(-1) == 1 else qk_BTND.contiguous()
    q_BTHD, k_BTHD = (x.new_empty(B, T, N // 2, D) for _ in range(2))
    rinv_BTN1 = torch.empty(B, N, T, 1, dtype=torch.float32, device=x.device).transpose(1, 2)  # each head's r together
    _norm_rope_kernel[(triton.cdiv(T, block_t), B)](
        x, q_BTHD, k_BTHD, rinv_BTN1, cos, sin, T, x.stride(0), x.stride(1), x.stride(2), cos.stride(1),
        torch.finfo(torch.float32).eps, H=N // 2, D=D, BLOCK_T=block_t,
        EMULATE=TRITON_INTERPRETED and x.dtype == torch.bfloat16, num_warps=num_warps,
    )
    return q_BTHD, k_BTHD, rinv_BTN1


def fused_norm_rope_grad(grad_q: Tensor, grad_k: Tensor, q_BTHD: Tensor, k_BTHD: Tensor, rinv_BTN1: Tensor, cos: Tensor,
                         sin: Tensor, block_t: int = NORM_ROPE_BLOCK_T, num_warps: int = NORM_ROPE_NUM_WARPS) -> Tensor:
    """norm_rope_grad as one Triton kernel, from the queries' and the keys' gradients in any layout."""
    B, T, H, D = q_BTHD.shape
    gq, gk = (g if g.stride(-1) == 1 else g.contiguous() for g in (grad_q, grad_k))
    dx_BTND = q_BTHD.new_empty(B, T, 2 * H, D)
    _norm_rope_grad_kernel[(triton.cdiv(T, block_t), B)](
        gq, gk, q_BTHD, k_BTHD, rinv_BTN1, cos, sin, dx_BTND, T, *gq.stride()[:3], *gk.stride()[:3], cos.stride(1),
        H=H, D=D, BLOCK_T=block_t, EMULATE=TRITON_INTERPRETED and q_BTHD.dtype == torch.bfloat16, num_warps=num_warps,
    )
    return dx_BTND


# The MLP's products with ReLU^2 (or its derivative) in the epilogue: a persistent matrix product whose tiles
# come and go through tensor descriptors (TMA), so that a tile's epilogue overlaps the next tile's loads.
# Tiles measured on one H100 at 65,536 x 768 x 3,072 (bench/mlp.py; bench/NOTES.md).
MLP_TILE = (128, 256, 64)  # bfloat16 tile: rows, columns, inner
MLP_GROUP_M = 8  # row blocks swept together, so that their rows of A stay in L2
MLP_NUM_WARPS, MLP_NUM_STAGES = 8, 3  # warps per program; inner tiles loaded ahead
MLP_TILE_FP32 = (64, 64, 32)  # float32 (start-up check, tests): a bfloat16-sized tile overflows shared memory
MLP_INTERPRETER_PROGRAMS = 4  # persistent programs under the Triton interpreter
SM_COUNT: dict[int, int] = {}  # multiprocessors per CUDA device index, looked up once

if triton is not None:

    @triton.jit
    def _epilogue(h, y_desc, off_m, off_n, GRAD: tl.constexpr, EMULATE: tl.constexpr):
        """relu(h)^2, or with GRAD h * 2 sqrt(y), from the product h rounded as an unfused product writes it.
        tl.sqrt, not tl.sqrt_rn: the latter's slow path for zeros (half of y) costs 0.45 ms a product."""
        dtype: tl.constexpr = y_desc.dtype
        h = _round_rne(h, dtype, EMULATE).to(tl.float32)
        if GRAD:
            out = 2.0 * tl.sqrt(y_desc.load([off_m, off_n]).to(tl.float32)) * h
        else:
            r = tl.maximum(h, 0.0)
            out = r * r
        return _round_rne(out, dtype, EMULATE)

    @triton.jit
    def _matmul_epilogue_kernel(a_desc, b_desc, c_desc, y_desc, M, N, K, GRAD: tl.constexpr, B_KN: tl.constexpr,
                                PRECISION: tl.constexpr, EMULATE: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """c = relu(a @ b)^2, or with GRAD c = (a @ b) * 2 sqrt(y); the programs take the BLOCK_M x BLOCK_N tiles
        of c in turn. b is K x N with B_KN, else N x K. With GRAD the epilogue works on two column halves
        (y's tile would not fit in shared memory beside the loads in flight)."""
        blocks_m, blocks_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), blocks_m * blocks_n, tl.num_programs(0), flatten=True):
            group = tile // (GROUP_M * blocks_n)
            rows_in_group = min(blocks_m - group * GROUP_M, GROUP_M)
            off_m = (group * GROUP_M + (tile % (GROUP_M * blocks_n)) % rows_in_group) * BLOCK_M
            off_n = ((tile % (GROUP_M * blocks_n)) // rows_in_group) * BLOCK_N
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for ki in range(tl.cdiv(K, BLOCK_K)):
                a = a_desc.load([off_m, ki * BLOCK_K])
                if B_KN:
                    b = b_desc.load([ki * BLOCK_K, off_n])
                else:
                    b = b_desc.load([off_n, ki * BLOCK_K]).T
                if EMULATE:  # the interpreter's bfloat16 products are wrong; float32 ones of bfloat16 inputs are exact
                    a, b = a.to(tl.float32), b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
            if GRAD:
                h0, h1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
                c_desc.store([off_m, off_n], _epilogue(h0, y_desc, off_m, off_n, GRAD, EMULATE))
                c_desc.store([off_m, off_n + BLOCK_N // 2], _epilogue(h1, y_desc, off_m, off_n + BLOCK_N // 2, GRAD, EMULATE))
            else:
                c_desc.store([off_m, off_n], _epilogue(acc, y_desc, off_m, off_n, GRAD, EMULATE))


def fused_matmul_epilogue(a_NK: Tensor, b: Tensor, y_NH: Tensor | None, b_kn: bool, tile: tuple[int, int, int] | None = None,
                          num_warps: int = MLP_NUM_WARPS, num_stages: int = MLP_NUM_STAGES) -> Tensor:
    """relu(a @ b)^2, or (a @ b) * 2 sqrt(y) when y is given, as one Triton kernel; b is K x H if b_kn, else H x K.
    Every tensor has contiguous rows of a multiple of 16 bytes (TMA). On CPU it runs under TRITON_INTERPRET=1.
    `tile` and the launch settings exist for bench/mlp.py."""
    N, K = a_NK.shape
    H = b.size(1) if b_kn else b.size(0)
    block_m, block_n, block_k = tile or (MLP_TILE if a_NK.dtype == torch.bfloat16 else MLP_TILE_FP32)
    c_NH = torch.empty(N, H, dtype=a_NK.dtype, device=a_NK.device)
    half_n = block_n // 2 if y_NH is not None else block_n
    if a_NK.is_cuda:
        if a_NK.device.index not in SM_COUNT:
            SM_COUNT[a_NK.device.index] = torch.cuda.get_device_properties(a_NK.device).multi_processor_count
        programs = SM_COUNT[a_NK.device.index]
    else:
        programs = MLP_INTERPRETER_PROGRAMS
    _matmul_epilogue_kernel[(min(programs, triton.cdiv(N, block_m) * triton.cdiv(H, block_n)),)](
        TensorDescriptor.from_tensor(a_NK, [block_m, block_k]),
        TensorDescriptor.from_tensor(b, [block_k, block_n] if b_kn else [block_n, block_k]),
        TensorDescriptor.from_tensor(c_NH, [block_m, half_n]),
        TensorDescriptor.from_tensor(c_NH if y_NH is None else y_NH, [block_m, half_n]),
        N, H, K, GRAD=y_NH is not None, B_KN=b_kn,
        PRECISION="ieee" if a_NK.dtype == torch.float32 or TRITON_INTERPRETED else "tf32",
        EMULATE=TRITON_INTERPRETED and a_NK.dtype == torch.bfloat16,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=MLP_GROUP_M, num_warps=num_warps, num_stages=num_stages,
    )
    return c_NH


def tma_ready(*tensors: Tensor) -> bool:
    """Rows contiguous and a multiple of 16 bytes long, as tensor descriptors need."""
    return all(t.stride(-1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 for t in tensors)


# Gram products of a batch of matrices, beta C + alpha X X^T with C symmetric (Newton-Schulz's X X^T and b A + c A A):
# the result is symmetric, so a program computes a tile on or above the diagonal and also writes its mirror.
GRAM_TILE = (128, 64)  # bfloat16 tile: rows (= columns), inner
GRAM_NUM_WARPS, GRAM_NUM_STAGES = 8, 3  # warps per program; inner tiles loaded ahead
GRAM_TILE_FP32 = (32, 32)  # float32 (tests): a bfloat16-sized tile overflows shared memory
UPPER_TILES: dict[tuple[int, str], Tensor] = {}  # (row blocks, device): the (i, j) of the tiles with i <= j

if triton is not None:

    @triton.jit
    def _gram_kernel(x_desc, c_desc, out_desc, tiles_ptr, R, K, alpha, beta, HAS_C: tl.constexpr, PRECISION: tl.constexpr,
                     EMULATE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
        """Program (tile i <= j, matrix b): out_ij = alpha X_i X_j^T (+ beta C_ij), stored at (i, j) and, transposed, at
        (j, i). The matrices are stacked as rows of 2-D views; R is a multiple of BLOCK."""
        tile, b = tl.program_id(0), tl.program_id(1)
        i, j = tl.load(tiles_ptr + 2 * tile), tl.load(tiles_ptr + 2 * tile + 1)
        row_i, row_j = b * R + i * BLOCK, b * R + j * BLOCK
        acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
        for ki in range(tl.cdiv(K, BLOCK_K)):
            xi, xj = x_desc.load([row_i, ki * BLOCK_K]), x_desc.load([row_j, ki * BLOCK_K])
            if EMULATE:  # the interpreter's bfloat16 products are wrong; float32 ones of bfloat16 inputs are exact
                xi, xj = xi.to(tl.float32), xj.to(tl.float32)
            acc = tl.dot(xi, xj.T, acc, input_precision=PRECISION)
        out = alpha * acc
        if HAS_C:
            out += beta * c_desc.load([row_i, j * BLOCK]).to(tl.float32)
        out = _round_rne(out, out_desc.dtype, EMULATE)
        out_desc.store([row_i, j * BLOCK], out)
        if i != j:
            out_desc.store([row_j, i * BLOCK], out.T)


def gram_kernel_ready(X_nRK: Tensor, block: int) -> bool:
    """Whole tiles per matrix (no tile may reach into the next one) and TMA-ready rows."""
    return triton is not None and X_nRK.size(1) % block == 0 and X_nRK.is_contiguous() and tma_ready(X_nRK.flatten(0, 1))


def fused_gram(X_nRK: Tensor, C_nRR: Tensor | None = None, beta: float = 0.0, alpha: float = 1.0,
               tile: tuple[int, int] | None = None, num_warps: int = GRAM_NUM_WARPS, num_stages: int = GRAM_NUM_STAGES) -> Tensor:
    """beta C + alpha X X^T for a batch of matrices X (n x R x K) and symmetric C, as one Triton kernel that
    computes the tiles on and above the diagonal. On CPU it runs under TRITON_INTERPRET=1. `tile` and the
    launch settings exist for bench/muon.py."""
    n, R, K = X_nRK.shape
    block, block_k = tile or (GRAM_TILE if X_nRK.dtype == torch.bfloat16 else GRAM_TILE_FP32)
    key = (R // block, str(X_nRK.device))
    if key not in UPPER_TILES:
        UPPER_TILES[key] = torch.triu_indices(R // block, R // block).T.contiguous().to(device=X_nRK.device, dtype=torch.int32)
    tiles = UPPER_TILES[key]
    out_nRR = X_nRK.new_empty(n, R, R)
    x_desc = TensorDescriptor.from_tensor(X_nRK.view(n * R, K), [block, block_k])
    out_desc = TensorDescriptor.from_tensor(out_nRR.view(n * R, R), [block, block])
    _gram_kernel[(tiles.size(0), n)](
        x_desc, out_desc if C_nRR is None else TensorDescriptor.from_tensor(C_nRR.reshape(n * R, R), [block, block]), out_desc,
        tiles, R, K, alpha, beta, HAS_C=C_nRR is not None,
        PRECISION="ieee" if X_nRK.dtype == torch.float32 or TRITON_INTERPRETED else "tf32",
        EMULATE=TRITON_INTERPRETED and X_nRK.dtype == torch.bfloat16, BLOCK=block, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out_nRR


def plain_gram(X_nRK: Tensor, C_nRR: Tensor | None = None, beta: float = 0.0, alpha: float = 1.0) -> Tensor:
    """beta C + alpha X X^T as one PyTorch product, every tile."""
    if C_nRR is None:
        return torch.bmm(X_nRK, X_nRK.mT) if alpha == 1 else alpha * torch.bmm(X_nRK, X_nRK.mT)
    return torch.baddbmm(C_nRR, X_nRK, X_nRK.mT, beta=beta, alpha=alpha)


def gram(X_nRK: Tensor, C_nRR: Tensor | None = None, beta: float = 0.0, alpha: float = 1.0) -> Tensor:
    """beta C + alpha X X^T (C symmetric): the fused kernel on CUDA where it applies, else plain_gram."""
    block = GRAM_TILE[0] if X_nRK.dtype == torch.bfloat16 else GRAM_TILE_FP32[0]
    if X_nRK.is_cuda and gram_kernel_ready(X_nRK, block):
        return fused_gram(X_nRK, C_nRR, beta, alpha)
    return plain_gram(X_nRK, C_nRR, beta, alpha)


def chunked_output_loss(x_NC: Tensor, w_VC: Tensor, targets_N: Tensor, softcap: float, softcap_scale: float, chunk: int,
                        chunk_loss: Callable, grads: bool):
    """Mean cross-entropy of the output layer, `chunk` rows at a time, so that at most chunk x V logits
    exist at once. With grads, also d(loss)/dx and d(loss)/dw, summed over the chunks (w's in float32)."""
    N = x_NC.size(0)
    total = torch.zeros((), dtype=torch.float32, device=x_NC.device)
    dx_NC = torch.empty_like(x_NC) if grads else None
    dw_VC = torch.zeros(w_VC.shape, dtype=torch.float32, device=w_VC.device) if grads else None
    for start in range(0, N, chunk):
        x_nC = x_NC[start : start + chunk]
        loss_n, grad_nV = chunk_loss(x_nC @ w_VC.T, targets_N[start : start + chunk], softcap, softcap_scale, 1 / N, grads)
        total += loss_n.sum()
        if grads:
            torch.mm(grad_nV, w_VC, out=dx_NC[start : start + chunk])
            accumulate_product(dw_VC, grad_nV.T, x_nC)
    loss = total / N
    return (loss, dx_NC, dw_VC.to(w_VC.dtype)) if grads else loss


def accumulate_product(acc_VC: Tensor, a_Vn: Tensor, b_nC: Tensor) -> None:
    """acc += a @ b, the product summed in float32 and added unrounded: on CUDA in the product's own
    epilogue (a bfloat16 product, cast and added, would cost three passes over a V x C float32 tensor)."""
    if acc_VC.is_cuda:
        torch.addmm(acc_VC, a_Vn, b_nC, out_dtype=torch.float32, out=acc_VC)
    else:
        acc_VC.addmm_(a_Vn.float(), b_nC.float())


class ChunkedOutputLoss(torch.autograd.Function):
    """The output layer and loss with the gradients made in the forward, chunk by chunk, so that the
    logits of all N tokens (N x V float32: 13 GB at 65,536 tokens) never exist at once nor are kept."""

    @staticmethod
    def forward(ctx, x_NC: Tensor, w_VC: Tensor, targets_N: Tensor, softcap: float, softcap_scale: float, chunk: int,
                chunk_loss: Callable) -> Tensor:
        loss, dx_NC, dw_VC = chunked_output_loss(x_NC, w_VC, targets_N, softcap, softcap_scale, chunk, chunk_loss, True)
        ctx.save_for_backward(dx_NC, dw_VC)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        # in training grad_loss is 1 / accumulation steps, a power of two: the scaling is exact in bfloat16
        dx_NC, dw_VC = ctx.saved_tensors
        return dx_NC * grad_loss, dw_VC * grad_loss, None, None, None, None, None


def fast_output_loss(x_NC: Tensor, w_VC: Tensor, targets_N: Tensor, softcap: float, softcap_scale: float, *, chunk: int,
                     chunk_loss: Callable | None = None) -> Tensor:
    """output_loss, `chunk` rows at a time; each chunk's loss and gradient by `chunk_loss`, by default the
    fused kernel on GPU and logit_loss_grad elsewhere."""
    if chunk_loss is None:
        chunk_loss = fused_logit_loss_grad if x_NC.is_cuda and triton is not None else logit_loss_grad
    if torch.is_grad_enabled() and (x_NC.requires_grad or w_VC.requires_grad):
        return ChunkedOutputLoss.apply(x_NC, w_VC, targets_N, softcap, softcap_scale, chunk, chunk_loss)
    return chunked_output_loss(x_NC, w_VC, targets_N, softcap, softcap_scale, chunk, chunk_loss, False)


class Ops(NamedTuple):
    """The ops the model calls by name."""

    rms_norm: Callable
    qk_norm_rope: Callable
    mlp: Callable
    output_loss: Callable


def plain_ops() -> Ops:
    """The model section's ops as they are when the model is built, so that an edited or patched op takes effect."""
    return Ops(rms_norm, qk_norm_rope, mlp, output_loss)


def fast_ops(cfg: "Config") -> Ops:
    return plain_ops()._replace(
        rms_norm=KeptOutputRMSNorm.apply,
        qk_norm_rope=FusedNormRope.apply,
        mlp=FusedMLP.apply,
        output_loss=functools.partial(fast_output_loss, chunk=cfg.loss_chunk),
    )


class FastOpsError(RuntimeError):
    """A fast op that no longer computes what its plain op computes."""


def check_fast_ops(cfg: "Config", device: torch.device) -> None:
    """Each fast op against the plain op it replaces, forward and gradients, on small random float32
    inputs: a plain op edited in the model section fails here instead of being silently replaced."""
    fast, plain = fast_ops(cfg), plain_ops()
    gen = torch.Generator(device=device).manual_seed(0)
    N, H, D, V = 96, 2, 16, 300
    cos, sin = (t.to(device) for t in rope_tables(N, D, cfg.rope_base))
    targets = torch.randint(0, V, (N,), device=device, generator=gen)
    inputs = {  # each op's arguments; gradients are compared for the first `differentiable` of them
        "rms_norm": lambda: (torch.randn(1, N, H, D, device=device, generator=gen) * 3,),
        "qk_norm_rope": lambda: (torch.randn(1, N, H, D, device=device, generator=gen) * 3, cos, sin),
        "mlp": lambda: (torch.randn(N, D, device=device, generator=gen), torch.randn(4 * D, D, device=device, generator=gen),
                        torch.randn(D, 4 * D, device=device, generator=gen)),
        "output_loss": lambda: (torch.randn(N, D, device=device, generator=gen), torch.randn(V, D, device=device, generator=gen),
                                targets, cfg.logit_softcap, cfg.softcap_temp * math.sqrt(cfg.model_dim)),
    }
    differentiable = dict(rms_norm=1, qk_norm_rope=1, mlp=3, output_loss=2)
    for name in Ops._fields:
        fast_op, plain_op = getattr(fast, name), getattr(plain, name)
        if fast_op is plain_op:
            continue
        args = inputs[name]()
        results = []
        for op in (fast_op, plain_op):
            leaves = [a.clone().requires_grad_() for a in args[: differentiable[name]]]
            outs = op(*leaves, *args[differentiable[name]:])
            outs = outs if isinstance(outs, tuple) else (outs,)
            weights = torch.Generator(device=device).manual_seed(1)
            sum((out * torch.randn(out.shape, device=device, generator=weights)).sum() for out in outs).backward()
            results.append([out.detach() for out in outs] + [a.grad for a in leaves])
        for got, want in zip(*results, strict=True):
            err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
            if not err < 1e-4:  # float32 rounding is ~1e-6; an edited op differs by O(1)
                raise FastOpsError(
                    f"the fast op for {name} no longer matches the model section's {name} (relative difference {err:.2g}); "
                    f"run with --fast_ops=false, or update its drop-in in the fast-ops section"
                )


# -----------------------------------------------------------------------------
# Configuration


@dataclass
class Config:
    # data
    train_files: str = "data/fineweb10B/fineweb_train_*.bin"  # glob of training shards
    val_files: str = "data/fineweb10B/fineweb_val_*.bin"  # glob of validation shards
    val_tokens: int = 10_485_760  # tokens per validation pass
    seq_len: int = 65_536  # tokens per forward pass, per process
    batch_tokens: int = 8 * 65_536  # tokens per optimizer step, all processes together
    # model
    vocab_size: int = 50_257  # token ids the model reads; the output layer is padded to a multiple of 128
    eot_token: int = 50_256  # end-of-text token id, first token of every document
    num_layers: int = 12  # transformer blocks
    model_dim: int = 768  # residual width
    num_heads: int = 6  # attention heads; head dim = model_dim / num_heads
    mlp_ratio: int = 4  # MLP hidden width / model_dim
    attn_window: int = 1024  # tokens: a query sees keys with q - kv < attn_window
    attn_scale: float = 0.12  # multiplies q.k, in place of 1/sqrt(head_dim)
    rope_base: float = 1024.0  # RoPE frequencies run from 1 to 1/rope_base (radians per token)
    tied_embed: bool = False  # embedding and output layer share one weight
    logit_softcap: float = 30.0  # logits = cap * sigmoid(z / (softcap_temp * sqrt(dim))); 0 = off
    softcap_temp: float = 7.5  # temperature of the soft-cap, per sqrt(model_dim)
    param_dtype: str = "bfloat16"  # dtype of parameters and activations (SPEC: bfloat16)
    # optimization
    num_iterations: int = 2500  # optimizer steps
    warmup_steps: int = 0  # steps of linear LR warm-up, (step+1)/warmup_steps; 0 = none
    cooldown_frac: float = 0.4  # fraction of the steps over which the LR decays linearly at the end
    final_lr_frac: float = 0.1  # LR multiplier reached at the last step
    muon_lr: float = 0.05  # Muon learning rate, every matrix inside the blocks
    muon_momentum: float = 0.95  # Muon momentum after its warm-up
    muon_momentum_start: float = 0.85  # Muon momentum at step 0
    muon_momentum_warmup: int = 300  # steps of linear momentum warm-up
    ns_steps: int = 5  # Newton-Schulz iterations per update
    head_lr: float = 0.22  # Adam learning rate, output layer
    embed_lr: float = 0.6  # Adam learning rate, embedding
    scalar_lr: float = 0.04  # Adam learning rate, parameters of fewer than 2 dims
    adam_beta1: float = 0.8  # Adam first-moment decay
    adam_beta2: float = 0.95  # Adam second-moment decay
    adam_eps: float = 1e-10  # Adam denominator epsilon
    # evaluation and logging
    val_loss_every: int = 125  # steps between validations; 0 = only at the end
    log_dir: str = "logs"  # folder of the run logs
    # checkpoints
    checkpoint_every: int = 0  # steps between checkpoints, also written at the end; 0 = none
    checkpoint_dir: str = "checkpoints"  # folder of checkpoint files
    keep_checkpoints: int = 3  # newest checkpoints of a run kept, older ones deleted; 0 = keep all
    resume: str = ""  # checkpoint file to continue from
    resume_changes: bool = False  # allow resuming with other batch, schedule or optimizer settings
    # run
    seed: int = 0  # initial weights; the data order is fixed by the files
    fast_ops: bool = True  # the fast-ops section's drop-ins and kernels; false = plain PyTorch ops only
    loss_chunk: int = 8192  # tokens whose logits the fast output loss holds at once
    compile: bool = True  # torch.compile the model (CUDA only)
    activation_budget: float = 1.0  # fraction of the activations compile keeps for the backward; less = recompute more
    warmup_compile_steps: int = 3  # steps on random tokens before timing; the state is restored
    preset: str = ""  # named group of overrides applied before the others: tiny


BASELINE = "M"
PRESETS: dict[str, dict[str, object]] = {
    "tiny": dict(
        train_files="data/sample/sample_train_*.bin",
        val_files="data/sample/sample_val_*.bin",
        val_tokens=8192,
        seq_len=128,
        batch_tokens=8 * 128,
        num_layers=2,
        model_dim=64,
        num_heads=2,
        attn_window=96,
        param_dtype="float32",
        num_iterations=60,
        val_loss_every=20,
        muon_momentum_warmup=20,
    ),
}
# Valid values of every number field: "> 0", ">= 0", or an interval with [ ] for included ends.
LIMITS: dict[str, str] = dict(
    val_tokens="> 0", seq_len="> 0", batch_tokens="> 0", vocab_size="> 0", eot_token=">= 0", num_layers="> 0",
    model_dim="> 0", num_heads="> 0", mlp_ratio="> 0", attn_window="> 0", attn_scale="> 0", rope_base="> 0",
    logit_softcap=">= 0", softcap_temp="> 0", num_iterations="> 0", warmup_steps=">= 0", cooldown_frac="[0, 1]",
    final_lr_frac=">= 0", muon_lr="> 0", muon_momentum="[0, 1)", muon_momentum_start="[0, 1)",
    muon_momentum_warmup=">= 0", ns_steps=">= 0", head_lr="> 0", embed_lr="> 0", scalar_lr="> 0",
    adam_beta1="[0, 1)", adam_beta2="[0, 1)", adam_eps=">= 0", val_loss_every=">= 0", checkpoint_every=">= 0",
    keep_checkpoints=">= 0", seed=">= 0", loss_chunk="> 0", activation_budget="(0, 1]", warmup_compile_steps=">= 0",
)
CHOICES: dict[str, tuple[str, ...]] = dict(param_dtype=("bfloat16", "float32"), preset=("", *PRESETS))


class ConfigError(ValueError):
    """A configuration that names no field, or gives a field a value of the wrong type or out of range."""


def in_limits(value: float, rule: str) -> bool:
    if rule in ("> 0", ">= 0"):
        return value > 0 or (rule == ">= 0" and value == 0)
    lo_bracket, lo, hi, hi_bracket = re.fullmatch(r"([\[(])(\S+), (\S+)([\])])", rule).groups()
    above = value >= float(lo) if lo_bracket == "[" else value > float(lo)
    below = value <= float(hi) if hi_bracket == "]" else value < float(hi)
    return above and below


def config_errors(cfg: Config) -> list[str]:
    """One message per field that is out of range or inconsistent with another."""
    errors = [f"--{name}={getattr(cfg, name)!r} is out of range: must be {'' if rule[0] in '<>' else 'in '}{rule}"
              for name, rule in LIMITS.items() if not in_limits(getattr(cfg, name), rule)]
    errors += [f"--{name}={getattr(cfg, name)!r}: choose one of {', '.join(map(repr, options))}"
               for name, options in CHOICES.items() if getattr(cfg, name) not in options]
    if not errors and (cfg.model_dim % cfg.num_heads or cfg.model_dim // cfg.num_heads % 4):
        errors.append(f"--model_dim={cfg.model_dim} must split into --num_heads={cfg.num_heads} heads of a multiple of 4")
    if not errors and cfg.batch_tokens % cfg.seq_len:
        errors.append(f"--batch_tokens={cfg.batch_tokens} is not a multiple of --seq_len={cfg.seq_len}")
    if not errors and cfg.eot_token >= cfg.vocab_size:
        errors.append(f"--eot_token={cfg.eot_token} is not below --vocab_size={cfg.vocab_size}")
    return errors


def field_help() -> dict[str, tuple[str, str]]:
    """Each field's topic and help text: the comments of the Config source."""
    topic, found = "", {}
    for line in inspect.getsource(Config).splitlines():
        if heading := re.fullmatch(r"\s+# (.+)", line):
            topic = heading.group(1)
        elif field := re.fullmatch(r"\s+(\w+): .+?  # (.+)", line):
            found[field.group(1)] = (topic, field.group(2))
    return found


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def config_parser() -> argparse.ArgumentParser:
    """--field=value for every Config field, with its type, default and help from the dataclass."""
    parser = argparse.ArgumentParser(
        prog=os.path.basename(__file__), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"presets: {json.dumps(PRESETS)}", allow_abbrev=False, exit_on_error=False,
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    helps = field_help()
    for f in dataclasses.fields(Config):
        topic, text = helps.get(f.name, ("", ""))
        group = groups.setdefault(topic, parser.add_argument_group(topic))
        rule = LIMITS.get(f.name) or (f"one of {', '.join(map(repr, CHOICES[f.name]))}" if f.name in CHOICES else "")
        group.add_argument(f"--{f.name}", type=parse_bool if f.type is bool else f.type, default=f.default, metavar=f.type.__name__.upper(),
                           help=f"{text} (default {f.default!r}{'; ' + rule if rule else ''})")
    return parser


def parse_config(argv: list[str]) -> Config:
    """--field=value overrides on top of the preset (if any) on top of the defaults; ConfigError names
    every field that is wrong."""
    parser = config_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            name = unknown[0].split("=")[0]
            raise ConfigError(f"unknown field {name} (see --help)" if name.startswith("--") else
                              f"arguments are --field=value, got {unknown[0]!r} (see --help)")
        if args.preset in PRESETS:
            parser.set_defaults(**PRESETS[args.preset])
            args = parser.parse_args(argv)
    except argparse.ArgumentError as e:
        raise ConfigError(str(e)) from None
    cfg = Config(**vars(args))
    if errors := config_errors(cfg):
        raise ConfigError("\n".join(errors))
    return cfg


# -----------------------------------------------------------------------------
# Data: FineWeb-format shards (256 int32 header, then uint16 tokens)

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
DOWNLOAD_HINT = "python data/cached_fineweb10B.py  (or ./run.sh, which downloads what it needs)"


class DataError(RuntimeError):
    """Missing, malformed or insufficient data, found before training starts."""


def shard_token_count(path: str) -> int:
    """Token count from the header, after checking the magic, the version and the file size."""
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header.size < HEADER_INTS:
        raise DataError(f"{path}: file too short for the {HEADER_INTS * 4}-byte header")
    if header[0] != SHARD_MAGIC:
        raise DataError(f"{path}: magic number {header[0]}, expected {SHARD_MAGIC} (not a token shard)")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path}: version {header[1]}, expected {SHARD_VERSION}")
    expected = HEADER_INTS * 4 + 2 * int(header[2])
    if os.path.getsize(path) != expected:
        raise DataError(f"{path}: {os.path.getsize(path)} bytes, but its header's {header[2]} tokens need {expected}")
    return int(header[2])


def load_shard(path: str) -> np.ndarray:
    count = shard_token_count(path)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_INTS * 4, shape=(count,))


def find_shards(pattern: str) -> list[str]:
    files = sorted(glob.glob(pattern))
    if not files:
        raise DataError(f"no data files match {pattern!r}; download them with: {DOWNLOAD_HINT}")
    if folders := [f for f in files if not os.path.isfile(f)]:
        raise DataError(f"{folders[0]!r} matches {pattern!r} but is not a file: give a glob of shard files, such as "
                        f"{os.path.join(folders[0], '*_train_*.bin')!r}")
    return files


def steps_in_shard(num_tokens: int, batch_tokens: int) -> int:
    """Steps a shard serves: each takes batch_tokens + 1 tokens, starting batch_tokens apart."""
    return max(0, (num_tokens - 1) // batch_tokens)


class TrainLoader:
    """Each step reads one window of batch_tokens + 1 tokens; micro-step a of rank r takes slice
    a * world_size + r of seq_len + 1 tokens, so the data of a step is the same at any world size."""

    def __init__(self, pattern: str, batch_tokens: int, seq_len: int, rank: int, world_size: int, device: torch.device):
        self.files = find_shards(pattern)
        self.batch_tokens, self.seq_len = batch_tokens, seq_len
        self.rank, self.world_size, self.device = rank, world_size, device
        self.accum_steps = batch_tokens // (seq_len * world_size)
        self.file_index, self.pos = 0, 0
        self.tokens = load_shard(self.files[0])

    def capacity(self) -> int:
        """Optimizer steps all the shards can serve, from their headers."""
        return sum(steps_in_shard(shard_token_count(f), self.batch_tokens) for f in self.files)

    def largest_token(self, steps: int) -> tuple[int, str]:
        """The largest token id of the shards that `steps` steps read, and the file that holds it."""
        largest, where = -1, ""
        for path in self.files:
            tokens = load_shard(path)
            if len(tokens) and (top := int(tokens.max())) > largest:
                largest, where = top, path
            steps -= steps_in_shard(len(tokens), self.batch_tokens)
            if steps <= 0:
                break
        return largest, where

    def seek(self, file_index: int, pos: int) -> None:
        """Continue from a saved position: it counts global tokens, so any world size can take it up."""
        if file_index >= len(self.files):
            raise DataError(f"the saved data position is in shard {file_index + 1}, but only {len(self.files)} shard(s) match")
        self.file_index, self.pos = file_index, pos
        self.tokens = load_shard(self.files[file_index])

    def next_step(self) -> list[tuple[Tensor, Tensor]]:
        while self.pos + self.batch_tokens + 1 > len(self.tokens):
            self.file_index += 1
            if self.file_index >= len(self.files):
                raise DataError(f"training data exhausted after {len(self.files)} shard(s)")
            self.tokens, self.pos = load_shard(self.files[self.file_index]), 0
        batches = []
        for a in range(self.accum_steps):
            start = self.pos + (a * self.world_size + self.rank) * self.seq_len
            window = torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))
            window = window.to(self.device, non_blocking=True)
            batches.append((window[:-1], window[1:]))
        self.pos += self.batch_tokens
        return batches


def validation_tokens(pattern: str, val_tokens: int) -> np.ndarray:
    """The first val_tokens + 1 tokens of the validation files."""
    needed = val_tokens + 1
    parts, have = [], 0
    for path in find_shards(pattern):
        parts.append(np.asarray(load_shard(path)[: needed - have]))
        have += len(parts[-1])
        if have >= needed:
            break
    if have < needed:
        raise DataError(f"validation files {pattern!r} hold {have} tokens; val_tokens={val_tokens} needs {needed}")
    return np.concatenate(parts)


def validation_batches(pattern: str, val_tokens: int, seq_len: int, rank: int, world_size: int, device: torch.device):
    """Batch b of rank r is slice b * world_size + r of the validation tokens."""
    tokens = validation_tokens(pattern, val_tokens)
    for b in range(val_tokens // (seq_len * world_size)):
        start = (b * world_size + rank) * seq_len
        window = torch.from_numpy(tokens[start : start + seq_len + 1].astype(np.int64)).to(device)
        yield window[:-1], window[1:]


# -----------------------------------------------------------------------------
# Optimizer: Muon, orthogonalised momentum SGD for the matrices inside the blocks

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz coefficients (a, b, c)
NS_EPS = 1e-7  # added to the Frobenius norm before dividing by it


def newton_schulz(G_NRC: Tensor, steps: int, gram_op: Callable = gram) -> Tensor:
    """Quintic Newton-Schulz iteration toward the nearest semi-orthogonal matrix, in bfloat16,
    batched over the leading dim; tall matrices are iterated transposed (the smaller Gram).
    gram_op makes the symmetric products: the fast-ops section's gram, or plain_gram (--fast_ops=false)."""
    a, b, c = NS_COEFFS
    X = G_NRC.bfloat16()
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X_nRC = X.reshape(-1, *X.shape[-2:])
    X_nRC = X_nRC / (X_nRC.norm(dim=(-2, -1), keepdim=True) + NS_EPS)
    for _ in range(steps):
        A_nRR = gram_op(X_nRC)
        # b A + c A A and a X + B X inside the products (beta * input + alpha * product, one rounding each);
        # A is symmetric, so A A = A A^T: a Gram product like X X^T, of which the fused kernel computes half the tiles
        B_nRR = gram_op(A_nRR, A_nRR, beta=b, alpha=c)
        X_nRC = torch.baddbmm(X_nRC, B_nRR, X_nRC, beta=a)
    X = X_nRC.view(X.shape)
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose update is orthogonalised by Newton-Schulz and applied as
    p -= lr * max(1, rows/cols)^0.5 * update. A 3-D weight is a stack of matrices, each
    orthogonalised alone. Same-shaped matrices form one batch, split across ranks and all-gathered."""

    def __init__(self, params, lr: float, momentum: float, ns_steps: int, rank: int = 0, world_size: int = 1,
                 gram_op: Callable = gram):
        super().__init__(params, dict(lr=lr, momentum=momentum, ns_steps=ns_steps))
        self.rank, self.world_size, self.gram_op = rank, world_size, gram_op

    def orthogonalize(self, updates_NRC: Tensor, steps: int) -> Tensor:
        if self.world_size == 1:
            return newton_schulz(updates_NRC, steps, self.gram_op)
        n = updates_NRC.size(0)
        per_rank = -(-n // self.world_size)
        padded_NRC = torch.cat([updates_NRC, updates_NRC.new_zeros(per_rank * self.world_size - n, *updates_NRC.shape[1:])])
        mine_NRC = newton_schulz(padded_NRC[self.rank * per_rank : (self.rank + 1) * per_rank], steps, self.gram_op).contiguous()
        gathered = [torch.empty_like(mine_NRC) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine_NRC)
        return torch.cat(gathered)[:n]

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            m, params = group["momentum"], group["params"]
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            grads, bufs = [p.grad for p in params], [self.state[p]["momentum_buffer"] for p in params]
            # one multi-tensor kernel per op instead of one per parameter
            torch._foreach_lerp_(bufs, grads, 1 - m)
            updates = torch._foreach_lerp(grads, bufs, m)
            batches: dict[tuple[int, int], list[tuple[Tensor, Tensor]]] = {}
            for p, update in zip(params, updates):
                rows, cols = p.shape[-2:]
                update_NRC = update.reshape(-1, rows, cols)
                batches.setdefault((min(rows, cols), max(rows, cols)), []).append(
                    (p, update_NRC.mT if rows > cols else update_NRC)
                )
            for items in batches.values():
                ortho_NRC = self.orthogonalize(torch.cat([u for _, u in items]), group["ns_steps"])
                by_scale: dict[float, tuple[list[Tensor], list[Tensor]]] = {}
                for (p, _), o_NRC in zip(items, ortho_NRC.split([u.size(0) for _, u in items])):
                    rows, cols = p.shape[-2:]
                    targets, deltas = by_scale.setdefault(max(1, rows / cols) ** 0.5, ([], []))
                    targets.append(p)
                    deltas.append((o_NRC.mT if rows > cols else o_NRC).reshape(p.shape).to(p.dtype))
                for scale, (targets, deltas) in by_scale.items():
                    torch._foreach_add_(targets, deltas, alpha=-group["lr"] * scale)


# -----------------------------------------------------------------------------
# Optimizer groups and schedules


def lr_multiplier(step: int, cfg: Config) -> float:
    """Linear warm-up over warmup_steps, then 1.0, then a linear decay to final_lr_frac over the
    last cooldown_frac of the steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    x = step / cfg.num_iterations
    if x < 1 - cfg.cooldown_frac:
        return 1.0
    w = (1 - x) / cfg.cooldown_frac
    return w + (1 - w) * cfg.final_lr_frac


def check_groups_cover_parameters(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
    """Every parameter in exactly one group of one optimizer, and nothing else in any group."""
    grouped = [id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters()), "optimizer groups must hold each parameter once"


def build_optimizers(cfg: Config, model: GPT, rank: int, world_size: int):
    """The optimizers, and a function that sets their schedules at a step."""
    fused = next(model.parameters()).is_cuda
    matrices = [p for p in model.blocks.parameters() if p.ndim >= 2]
    scalars = [p for p in model.parameters() if p.ndim < 2]
    head = [model.lm_head.weight]
    embed = [] if model.embed.weight is model.lm_head.weight else [model.embed.weight]
    groups = [dict(params=head, lr=cfg.head_lr), dict(params=embed, lr=cfg.embed_lr), dict(params=scalars, lr=cfg.scalar_lr)]
    adam = torch.optim.Adam(
        [g for g in groups if g["params"]],
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        weight_decay=0.0,
        fused=fused,
    )
    muon = Muon(matrices, lr=cfg.muon_lr, momentum=cfg.muon_momentum, ns_steps=cfg.ns_steps, rank=rank, world_size=world_size,
                gram_op=gram if cfg.fast_ops else plain_gram)
    optimizers: list[torch.optim.Optimizer] = [adam, muon]
    check_groups_cover_parameters(model, optimizers)
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]

    def set_schedule(step: int) -> None:
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lr_multiplier(step, cfg)
        frac = min(step / cfg.muon_momentum_warmup, 1.0) if cfg.muon_momentum_warmup else 1.0
        for group in muon.param_groups:
            group["momentum"] = (1 - frac) * cfg.muon_momentum_start + frac * cfg.muon_momentum

    return optimizers, set_schedule


# -----------------------------------------------------------------------------
# Distributed setup and logging


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def master(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """torchrun sets RANK/WORLD_SIZE; without them this is a single process."""
    if "RANK" not in os.environ:
        return Dist(0, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return Dist(rank, local_rank, world_size, device)


def accumulation_steps(cfg: Config, world_size: int) -> int:
    micro_batches = cfg.batch_tokens // cfg.seq_len
    if micro_batches % world_size:
        sizes = [n for n in range(1, micro_batches + 1) if micro_batches % n == 0]
        raise ConfigError(
            f"world size {world_size} cannot keep the global batch of {micro_batches} x {cfg.seq_len} tokens "
            f"(world sizes that can: {', '.join(map(str, sizes))}). For {world_size} processes, either keep the batch "
            f"with shorter sequences, --seq_len={cfg.batch_tokens // world_size if cfg.batch_tokens % world_size == 0 else '?'} "
            f"(the same tokens per step; documents longer than a sequence are cut more often), or grow the batch to "
            f"--batch_tokens={world_size * cfg.seq_len} (one sequence per process; more tokens per step, so the "
            f"learning rates and step count tuned for {cfg.batch_tokens:,} tokens may no longer fit)"
        )
    return micro_batches // world_size


def check_val_tokens(cfg: Config, world_size: int) -> None:
    val_batch = world_size * cfg.seq_len
    if cfg.val_tokens % val_batch:
        lower = cfg.val_tokens // val_batch * val_batch
        raise ConfigError(
            f"val_tokens {cfg.val_tokens} is not a multiple of the validation batch "
            f"(world size {world_size} x seq_len {cfg.seq_len} = {val_batch}); "
            f"nearest valid values: {', '.join(str(v) for v in (lower, lower + val_batch) if v > 0)}"
        )


def system_report(device: torch.device, world_size: int) -> list[str]:
    if device.type == "cuda":
        name = f"{torch.cuda.get_device_name(device)} x{world_size}"
    else:
        name = f"cpu ({platform.processor() or platform.machine()}) x{world_size}"
    lines = [f"python: {platform.python_version()}", f"torch: {torch.__version__}", f"cuda: {torch.version.cuda}"]
    lines += [f"device: {name}", f"world_size: {world_size}"]
    return lines


def nvidia_smi() -> str:
    if shutil.which("nvidia-smi") is None:
        return "(not available)"
    return subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout.strip()


class RunLog:
    """Writes to logs/ and stdout, from rank 0 only."""

    def __init__(self, cfg: Config, ctx: Dist):
        self.active = ctx.master
        self.run_id = f"{BASELINE}_{time.strftime('%Y%m%d-%H%M%S')}_{uuid.uuid4().hex[:6]}"
        self.path = os.path.join(cfg.log_dir, f"{self.run_id}.txt")
        if self.active:
            os.makedirs(cfg.log_dir, exist_ok=True)
            self.file = open(self.path, "w")

    def __call__(self, text: str, echo: bool = True) -> None:
        if self.active:
            self.file.write(text + "\n")
            self.file.flush()
            if echo:
                print(text, flush=True)


# -----------------------------------------------------------------------------
# Checkpoints

CHECKPOINT_FORMAT = 2  # layout version of the checkpoint file
SHAPE_FIELDS = ("vocab_size", "num_layers", "model_dim", "num_heads", "mlp_ratio", "tied_embed")
CHECKPOINT_KEYS = ("format", "baseline", "script", "shape", "config", "lineage", "model", "optimizers", "step", "train_ms",
                   "val_losses", "loader", "rng")
# fields that may differ on resume without --resume_changes: where data, logs and checkpoints go,
# how often to validate, and how (not what) to compute
RESUME_FREE_FIELDS = ("val_files", "val_tokens", "val_loss_every", "log_dir", "checkpoint_every", "checkpoint_dir",
                      "keep_checkpoints", "resume", "resume_changes", "seed", "fast_ops", "loss_chunk", "compile",
                      "activation_budget", "warmup_compile_steps", "preset")


class CheckpointError(RuntimeError):
    """A checkpoint to resume from that is unreadable, truncated, or from another script, model shape or run."""


def checkpoint_path(cfg: Config, run_id: str, step: int) -> str:
    return os.path.join(cfg.checkpoint_dir, f"{run_id}_step{step:06d}.pt")


def save_checkpoint(
    path: str,
    cfg: Config,
    lineage: list[str],
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    step: int,
    train_ms: float,
    val_losses: dict[int, float],
    loader: TrainLoader,
    device: torch.device,
) -> None:
    """Everything a resumed run needs, after `step` completed steps. Only tensors, containers and
    plain numbers, so that torch.load(weights_only=True) reads it."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "baseline": BASELINE,
        "script": os.path.basename(__file__),
        "shape": {name: getattr(cfg, name) for name in SHAPE_FIELDS},
        "config": dataclasses.asdict(cfg),
        "lineage": lineage,
        "model": model.state_dict(),
        "optimizers": [opt.state_dict() for opt in optimizers],
        "step": step,
        "train_ms": train_ms,
        "val_losses": dict(val_losses),
        "loader": {"file_index": loader.file_index, "pos": loader.pos},
        "rng": {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
    }
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename names it the checkpoint
    os.replace(path + ".tmp", path)  # atomic: a kill mid-write leaves only a stray .tmp, never a torn checkpoint


def prune_checkpoints(folder: str, lineage: list[str], keep: int) -> list[str]:
    """After a successful save: delete the run's (and the runs it resumed from) unfinished .tmp files and
    all but its `keep` newest checkpoints (0 = keep all); return the deleted paths."""
    ours = [f for f in os.listdir(folder) if f.split("_step")[0] in lineage]
    done = sorted((f for f in ours if re.fullmatch(r".+_step\d{6}\.pt", f)), key=lambda f: f[-9:-3])
    doomed = [f for f in ours if f.endswith(".pt.tmp")] + (done[:-keep] if keep else [])
    for f in doomed:
        os.remove(os.path.join(folder, f))
    return [os.path.join(folder, f) for f in doomed]


def load_checkpoint(path: str, cfg: Config) -> dict:
    """Read a checkpoint and refuse, before any training work, one that is unreadable, from the other
    script, from another model shape, past the last step, or from another configuration (unless
    --resume_changes); returns it with "changes" listing the configuration fields that differ."""
    if not os.path.isfile(path):
        raise CheckpointError(f"--resume={path}: no such file")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch.save writes a zip archive
            raise CheckpointError(f"{path}: not a checkpoint file of these scripts (it is not a torch.save archive)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a torn file fails inside torch.load in many ways; none of its advice applies here
        raise CheckpointError(f"{path}: truncated or not a checkpoint (torch.load cannot read it)") from None
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt] if isinstance(ckpt, dict) else list(CHECKPOINT_KEYS)
    if missing:
        raise CheckpointError(f"{path}: truncated or not a checkpoint (missing {', '.join(missing)})")
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {ckpt['format']}, this script reads format {CHECKPOINT_FORMAT}")
    if ckpt["baseline"] != BASELINE:
        raise CheckpointError(f"{path}: checkpoint from {ckpt['script']}, this is {os.path.basename(__file__)}")
    differing = [f"{name}={ckpt['shape'].get(name)!r} in the checkpoint, {getattr(cfg, name)!r} here"
                 for name in SHAPE_FIELDS if ckpt["shape"].get(name) != getattr(cfg, name)]
    if differing:
        raise CheckpointError(f"{path}: checkpoint of another model shape: {'; '.join(differing)}")
    if ckpt["step"] > cfg.num_iterations:
        raise CheckpointError(f"{path}: checkpoint at step {ckpt['step']}, past num_iterations={cfg.num_iterations}")
    ckpt["changes"] = [f"{name}: {ckpt['config'].get(name)!r} -> {value!r}" for name, value in dataclasses.asdict(cfg).items()
                       if name not in RESUME_FREE_FIELDS and ckpt["config"].get(name) != value]
    if ckpt["changes"] and not cfg.resume_changes:
        raise CheckpointError(f"{path}: this run's configuration differs from the checkpoint's ({'; '.join(ckpt['changes'])}); "
                              f"pass --resume_changes=true if that is intended")
    return ckpt


def restore_checkpoint(
    ckpt: dict, model: nn.Module, optimizers: list[torch.optim.Optimizer], device: torch.device
) -> tuple[int, float]:
    """Load the model, optimizer and RNG states; return the step and the training time to continue from."""
    model.load_state_dict(ckpt["model"])
    for opt, state in zip(optimizers, ckpt["optimizers"], strict=True):
        opt.load_state_dict(state)
    torch.set_rng_state(ckpt["rng"]["cpu"])
    if device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    return ckpt["step"], ckpt["train_ms"]


# -----------------------------------------------------------------------------
# Training


class Diverged(FloatingPointError):
    """The training loss became NaN or infinite."""


def preflight(cfg: Config, ctx: Dist) -> tuple[int, TrainLoader, dict | None]:
    """Every refusal that needs no model, before a log file exists: batch split, data, vocabulary,
    checkpoint, fast ops. Returns the accumulation steps, the loader and the checkpoint (or None)."""
    accum = accumulation_steps(cfg, ctx.world_size)
    check_val_tokens(cfg, ctx.world_size)
    if ctx.device.type == "cuda" and cfg.seq_len % FLEX_BLOCK:
        raise ConfigError(f"--seq_len={cfg.seq_len} must be a multiple of {FLEX_BLOCK} for flex-attention")
    loader = TrainLoader(cfg.train_files, cfg.batch_tokens, cfg.seq_len, ctx.rank, ctx.world_size, ctx.device)
    if loader.capacity() < cfg.num_iterations:
        raise DataError(
            f"{cfg.train_files!r} holds enough tokens for {loader.capacity()} steps of {cfg.batch_tokens} tokens, "
            f"num_iterations={cfg.num_iterations} needs more; download more shards with: {DOWNLOAD_HINT}"
        )
    largest, where = loader.largest_token(cfg.num_iterations)
    val = validation_tokens(cfg.val_files, cfg.val_tokens)
    if int(val.max()) > largest:
        largest, where = int(val.max()), cfg.val_files
    if largest >= cfg.vocab_size:
        raise ConfigError(f"--vocab_size={cfg.vocab_size} is too small for the data: token id {largest} in {where}; "
                          f"use --vocab_size={largest + 1} or more")
    checkpoint = load_checkpoint(cfg.resume, cfg) if cfg.resume else None
    if checkpoint is not None:
        loader.seek(**checkpoint["loader"])
    if cfg.fast_ops:
        check_fast_ops(cfg, ctx.device)
    return accum, loader, checkpoint


def write_header(log: RunLog, cfg: Config, ctx: Dist, argv: list[str], accum: int, checkpoint: dict | None) -> None:
    log(f"run_id: {log.run_id}\nbaseline: {BASELINE}\nscript: {os.path.basename(__file__)}")
    log(f"date: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
    log(f"command: {' '.join([os.path.basename(__file__), *argv])}")
    with open(__file__) as f:
        log(f"=== source: {os.path.basename(__file__)} ===\n{f.read().rstrip()}\n=== end of source ===", echo=False)
    log(f"config: {json.dumps(dataclasses.asdict(cfg))}")
    log("\n".join(system_report(ctx.device, ctx.world_size)) + f"\ngrad_accum_steps: {accum}")
    if checkpoint is not None:
        log(f"resumed_from: {cfg.resume} step:{checkpoint['step']}")
        for change in checkpoint["changes"]:
            log(f"resume_change: {change}")
    log(f"nvidia-smi:\n{nvidia_smi()}", echo=False)


def compile_model(cfg: Config, model: GPT) -> None:
    """torch.compile the model's body, and the loss's per-chunk work where it has no Triton kernel (the
    chunk loop and its products stay eager: compiled whole, it would keep every chunk's logits alive
    together); with plain ops, the plain loss."""
    torch._functorch.config.activation_memory_budget = cfg.activation_budget
    model.body = torch.compile(model.body, dynamic=False)
    if cfg.fast_ops and triton is None:
        model.ops = model.ops._replace(output_loss=functools.partial(
            fast_output_loss, chunk=cfg.loss_chunk, chunk_loss=torch.compile(logit_loss_grad, dynamic=False)))
    elif not cfg.fast_ops:
        model.ops = model.ops._replace(output_loss=torch.compile(model.ops.output_loss, dynamic=False))


def train_step(model: GPT, train_model: nn.Module, optimizers: list, set_schedule: Callable, step: int,
               batches: list[tuple[Tensor, Tensor]], ctx: Dist) -> Tensor:
    """One optimizer step over the micro-batches; returns the mean loss as a tensor (no sync)."""
    loss_sum = torch.zeros((), device=ctx.device)
    for i, (inputs, targets) in enumerate(batches):
        syncing = ctx.world_size == 1 or i == len(batches) - 1
        with nullcontext() if syncing else train_model.no_sync():
            loss = train_model(inputs, targets)
            (loss / len(batches)).backward()
        loss_sum += loss.detach().float()
    set_schedule(step)
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    if ctx.world_size > 1:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    return loss_sum / len(batches)


def warm_up(cfg: Config, model: GPT, train_model: nn.Module, optimizers: list, set_schedule: Callable, accum: int,
            ctx: Dist) -> None:
    """Compile and warm up on random tokens, then restore the initial state: warm-up never trains."""
    initial_model = {k: v.clone() for k, v in model.state_dict().items()}
    initial_opts = [opt.state_dict() for opt in optimizers]
    rng = torch.Generator().manual_seed(cfg.seed + 1)
    for step in range(cfg.warmup_compile_steps):
        random = torch.randint(0, cfg.vocab_size, (accum, cfg.seq_len + 1), generator=rng).to(ctx.device)
        train_step(model, train_model, optimizers, set_schedule, step, [(row[:-1], row[1:]) for row in random], ctx)
        with torch.no_grad():
            train_model(random[0, :-1], random[0, 1:])
    model.load_state_dict(initial_model)
    for opt, state in zip(optimizers, initial_opts):
        opt.load_state_dict(state)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)


def evaluate(model: nn.Module, cfg: Config, ctx: Dist) -> float:
    total, count = torch.zeros((), device=ctx.device, dtype=torch.float64), 0
    with torch.no_grad():
        for inputs, targets in validation_batches(cfg.val_files, cfg.val_tokens, cfg.seq_len, ctx.rank, ctx.world_size, ctx.device):
            total += model(inputs, targets).double()
            count += 1
    if ctx.world_size > 1:
        dist.all_reduce(total)
    return total.item() / (count * ctx.world_size)


class Clock:
    """Training time: host time between synchronised points, paused for validation and checkpoints."""

    def __init__(self, device: torch.device, start_ms: float = 0.0):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.done_ms, self.t0 = start_ms, None

    def start(self) -> None:
        self.sync()
        self.t0 = time.perf_counter()

    def pause(self) -> float:
        self.sync()
        self.done_ms += 1000 * (time.perf_counter() - self.t0)
        return self.done_ms

    def ms(self) -> float:
        return self.done_ms + 1000 * (time.perf_counter() - self.t0)


def log_step(log: RunLog, cfg: Config, step: int, loss: Tensor, train_ms: float) -> float:
    """The step line, written a step late so that reading the loss waits for no queued work; stops on NaN."""
    value = loss.item()
    log(f"step:{step}/{cfg.num_iterations} train_loss:{value:.4f} lr_mult:{lr_multiplier(step - 1, cfg):.4f} "
        f"train_time:{train_ms:.0f}ms step_avg:{train_ms / step:.2f}ms")
    if not math.isfinite(value):
        log(f"stopped: loss is {value} at step {step}\n=== end of run ===")
        raise Diverged(f"training loss became {value} at step {step}; the run diverged (lower the learning rates?)")
    return value


def run(cfg: Config, ctx: Dist, argv: list[str]) -> dict:
    accum, loader, checkpoint = preflight(cfg, ctx)
    log = RunLog(cfg, ctx)
    lineage = (checkpoint["lineage"] if checkpoint else []) + [log.run_id]
    write_header(log, cfg, ctx, argv, accum, checkpoint)
    result = {"val_losses": {}, "train_losses": [], "log_path": log.path if log.active else None}
    try:
        torch.manual_seed(cfg.seed)
        model = GPT(cfg).to(device=ctx.device, dtype=getattr(torch, cfg.param_dtype))
        optimizers, set_schedule = build_optimizers(cfg, model, ctx.rank, ctx.world_size)
        train_model: nn.Module = model
        if ctx.world_size > 1:
            device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            train_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)
        if cfg.compile and ctx.device.type == "cuda":
            compile_model(cfg, model)
        warm_up(cfg, model, train_model, optimizers, set_schedule, accum, ctx)
        result["model"] = model
        train(cfg, ctx, log, lineage, model, train_model, optimizers, set_schedule, loader, checkpoint, result)
    finally:
        if log.active:
            print(f"log: {log.path}", flush=True)
    return result


def train(cfg: Config, ctx: Dist, log: RunLog, lineage: list[str], model: GPT, train_model: nn.Module, optimizers: list,
          set_schedule: Callable, loader: TrainLoader, checkpoint: dict | None, result: dict) -> None:
    log("=== training ===")
    val_losses, train_losses = result["val_losses"], result["train_losses"]
    start, start_ms = restore_checkpoint(checkpoint, model, optimizers, ctx.device) if checkpoint else (0, 0.0)
    val_losses.update(checkpoint["val_losses"] if checkpoint else {})
    clock, pending = Clock(ctx.device, start_ms), None
    clock.start()
    for step in range(start, cfg.num_iterations + 1):
        last = step == cfg.num_iterations
        if last or (cfg.val_loss_every > 0 and step % cfg.val_loss_every == 0):
            train_ms = clock.pause()
            if pending:
                train_losses.append(log_step(log, cfg, *pending))
                pending = None
            if step not in val_losses:  # a resumed run's first step was validated before its checkpoint
                val_losses[step] = evaluate(train_model, cfg, ctx)
            log(f"step:{step}/{cfg.num_iterations} val_loss:{val_losses[step]:.4f} train_time:{train_ms:.0f}ms "
                f"step_avg:{train_ms / max(step, 1):.2f}ms")
            clock.start()
        if cfg.checkpoint_every > 0 and step > start and (last or step % cfg.checkpoint_every == 0):
            train_ms = clock.pause()
            if pending:  # a non-finite loss stops the run before it is saved
                train_losses.append(log_step(log, cfg, *pending))
                pending = None
            if ctx.master:
                path = checkpoint_path(cfg, log.run_id, step)
                save_checkpoint(path, cfg, lineage, model, optimizers, step, train_ms, val_losses, loader, ctx.device)
                log(f"checkpoint: {path}")
                for deleted in prune_checkpoints(cfg.checkpoint_dir, lineage, cfg.keep_checkpoints):
                    log(f"checkpoint deleted: {deleted}")
            if ctx.world_size > 1:
                dist.barrier()  # every rank moves on only once the file is written
            clock.start()
        if last:
            break
        loss = train_step(model, train_model, optimizers, set_schedule, step, loader.next_step(), ctx)
        if pending:
            train_losses.append(log_step(log, cfg, *pending))
        pending = (step + 1, loss, clock.ms())
    result["train_ms"] = clock.done_ms
    if ctx.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(ctx.device) // 2**20
        reserved = torch.cuda.max_memory_reserved(ctx.device) // 2**20
        log(f"peak memory allocated: {peak} MiB reserved: {reserved} MiB")
    log("=== end of run ===")


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(argv)
    ctx = init_distributed()
    try:
        return run(cfg, ctx, argv)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError, CheckpointError, FastOpsError) as e:
        print("\n".join(f"error: {line}" for line in str(e).splitlines()), file=sys.stderr)
        sys.exit(2)
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

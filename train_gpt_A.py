"""GPT speedrun baseline, one of two twin scripts: train_gpt_A.py (AdamW) and train_gpt_M.py (Muon).

    torchrun --standalone --nproc_per_node=8 train_gpt_M.py      # a baseline on 8 GPUs
    python train_gpt_M.py --preset=tiny                            # a small model on CPU, about a minute
    python train_gpt_M.py --help                                   # every configuration field

The math is stated in SPEC.md. The twins differ only in their optimizer section, the body of
build_optimizers and configuration values: `diff train_gpt_A.py train_gpt_M.py` is the ablation.
"""
import dataclasses
import glob
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch._dynamo  # imported before any process group, or gloo's threads outlive destroy_process_group
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

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
    vocab_size: int = 50_257  # GPT-2 tokens; the output layer is padded to a multiple of 128
    num_layers: int = 12  # transformer blocks
    model_dim: int = 768  # residual width
    num_heads: int = 6  # attention heads; head dim = model_dim / num_heads
    mlp_ratio: int = 4  # MLP hidden width / model_dim
    attn_window: int = 1024  # tokens: a query sees keys with q - kv < attn_window
    attn_scale: float = 0.12  # multiplies q.k, in place of 1/sqrt(head_dim)
    rope_base: float = 1024.0  # RoPE frequencies run from 1 to 1/rope_base (radians per token)
    tied_embed: bool = True  # embedding and output layer share one weight
    logit_softcap: float = 0.0  # logits = cap * sigmoid(z / (softcap_temp * sqrt(dim))); 0 = off
    softcap_temp: float = 7.5  # temperature of the soft-cap, per sqrt(model_dim)
    param_dtype: str = "bfloat16"  # dtype of parameters and activations (SPEC: bfloat16)
    loss_chunk: int = 8192  # tokens whose logits the output layer and loss hold at once
    # optimization
    num_iterations: int = 4375  # optimizer steps
    warmup_steps: int = 256  # steps of linear LR warm-up, (step+1)/warmup_steps; 0 = none
    cooldown_frac: float = 0.3  # fraction of the steps over which the LR decays linearly at the end
    final_lr_frac: float = 0.1  # LR multiplier reached at the last step
    adam_lr: float = 0.0021  # AdamW learning rate, every parameter
    adam_beta1: float = 0.9  # AdamW first-moment decay
    adam_beta2: float = 0.95  # AdamW second-moment decay
    adam_eps: float = 1e-10  # AdamW denominator epsilon
    weight_decay: float = 0.1  # AdamW decoupled weight decay, times the LR
    # evaluation and logging
    val_loss_every: int = 125  # steps between validations; 0 = only at the end
    log_dir: str = "logs"  # folder of the run logs
    # checkpoints
    checkpoint_every: int = 0  # steps between checkpoints, also written at the end; 0 = none
    checkpoint_dir: str = "checkpoints"  # folder of checkpoint files
    resume: str = ""  # checkpoint file to continue from
    # run
    seed: int = 0  # initial weights; the data order is fixed by the files
    compile: bool = True  # torch.compile the model (CUDA only)
    activation_budget: float = 1.0  # fraction of the activations compile keeps for the backward; less = recompute more
    warmup_compile_steps: int = 3  # steps on random tokens before timing; the state is restored
    preset: str = ""  # named group of overrides applied before the others: "tiny"


BASELINE = "A"
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
        warmup_steps=10,
        val_loss_every=20,
        adam_lr=0.01,
    ),
}


class ConfigError(ValueError):
    """A configuration override that names no field or gives a value of the wrong type."""


def _convert(name: str, text: str, kind: type) -> object:
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{name}: expected a boolean (true/false), got {text!r}")
    try:
        return kind(text.replace("_", "")) if kind in (int, float) else kind(text)
    except ValueError:
        raise ConfigError(f"--{name}: expected {kind.__name__}, got {text!r}") from None


def parse_config(argv: list[str]) -> Config:
    """`--field=value` overrides on top of the preset (if any) on top of the defaults."""
    kinds = {f.name: f.type for f in dataclasses.fields(Config)}
    overrides: dict[str, object] = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"arguments are --field=value, got {arg!r} (see --help)")
        name, text = arg[2:].split("=", 1)
        if name not in kinds:
            raise ConfigError(f"unknown field --{name} (see --help)")
        overrides[name] = _convert(name, text, kinds[name])
    preset = overrides.get("preset", "")
    if preset and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    values = {**PRESETS.get(preset, {}), **overrides}
    cfg = Config(**values)
    for f in dataclasses.fields(Config):
        value = getattr(cfg, f.name)
        if f.type in (int, float) and value < 0:
            raise ConfigError(f"--{f.name} must not be negative, got {value}")
    if not 0 < cfg.activation_budget <= 1:
        raise ConfigError(f"--activation_budget is a fraction in (0, 1], got {cfg.activation_budget}")
    if cfg.param_dtype not in ("bfloat16", "float32"):
        raise ConfigError(f"--param_dtype is bfloat16 or float32, got {cfg.param_dtype!r}")
    if min(cfg.seq_len, cfg.batch_tokens, cfg.num_layers, cfg.num_heads, cfg.val_tokens, cfg.loss_chunk) == 0:
        raise ConfigError("seq_len, batch_tokens, num_layers, num_heads, val_tokens and loss_chunk must be positive")
    if cfg.model_dim % cfg.num_heads or (cfg.model_dim // cfg.num_heads) % 4:
        raise ConfigError(f"model_dim {cfg.model_dim} must split into {cfg.num_heads} heads of a multiple of 4")
    return cfg


def config_help() -> str:
    lines = [f"usage: {os.path.basename(__file__)} [--field=value ...]", "", "fields (default):"]
    for f in dataclasses.fields(Config):
        lines.append(f"  --{f.name}={f.default!r}  ({f.type.__name__})")
    lines.append(f"presets: {', '.join(f'{k}: {v}' for k, v in PRESETS.items())}")
    return "\n".join(lines)


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


def validation_batches(pattern: str, val_tokens: int, seq_len: int, rank: int, world_size: int, device: torch.device):
    """The first val_tokens (+1) tokens of the validation files; batch b of rank r is slice b * world_size + r."""
    needed = val_tokens + 1
    parts, have = [], 0
    for path in find_shards(pattern):
        parts.append(np.asarray(load_shard(path)[: needed - have]))
        have += len(parts[-1])
        if have >= needed:
            break
    if have < needed:
        raise DataError(f"validation files {pattern!r} hold {have} tokens; val_tokens={val_tokens} needs {needed}")
    tokens = np.concatenate(parts)
    for b in range(val_tokens // (seq_len * world_size)):
        start = (b * world_size + rank) * seq_len
        window = torch.from_numpy(tokens[start : start + seq_len + 1].astype(np.int64)).to(device)
        yield window[:-1], window[1:]


# -----------------------------------------------------------------------------
# Model

EOT_TOKEN = 50256  # GPT-2 <|endoftext|>, first token of every document
FLEX_BLOCK = 128  # flex-attention tile size, in tokens
VOCAB_MULTIPLE = 128  # the output layer is padded to a multiple of this
LSE_BLOCK = 128  # logits per partial max and sum of the loss's log-sum-exp


def norm(x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """RMS norm over the last dim (float32 eps, as F.rms_norm), then RoPE when the tables are given."""
    return RMSNorm.apply(x, *(rope or (None, None)))


def document_ids(tokens_T: Tensor) -> Tensor:
    return (tokens_T == EOT_TOKEN).cumsum(0)


def make_mask_mod(docs_T: Tensor, window: int):
    """Causal, same-document and sliding-window mask as a flex-attention mask_mod."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (docs_T[q_idx] == docs_T[kv_idx]) & (q_idx - kv_idx < window)

    return mask_mod


def dense_mask(docs_T: Tensor, window: int) -> Tensor:
    idx = torch.arange(docs_T.numel(), device=docs_T.device)
    return make_mask_mod(docs_T, window)(None, None, idx[:, None], idx[None, :])


def block_mask(docs_T: Tensor, window: int) -> BlockMask:
    """Flex-attention BlockMask built from block-level bounds (no T x T evaluation): a tile is
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


def rope_frequencies(head_dim: int, base: float, device: torch.device) -> Tensor:
    """Truncated RoPE: head_dim/4 frequencies from 1 down to 1/base, then head_dim/4 zeros."""
    quarter = head_dim // 4
    freqs = base ** -torch.linspace(0, 1, quarter, dtype=torch.float32, device=device)
    return torch.cat([freqs, freqs.new_zeros(quarter)])


def rope_tables(T: int, head_dim: int, base: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and sin of the RoPE angles, float32, shaped (1, T, 1, head_dim/2) to broadcast over q_BTHD."""
    positions_T = torch.arange(T, dtype=torch.float32, device=device)
    angle_TF = torch.outer(positions_T, rope_frequencies(head_dim, base, device))
    return angle_TF.cos()[None, :, None, :], angle_TF.sin()[None, :, None, :]


def apply_rope(x_BTHD: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x_BTHD.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, -x1 * sin + x2 * cos), dim=-1).type_as(x_BTHD)


class RMSNorm(torch.autograd.Function):
    """rms_norm(x), then RoPE if cos and sin are given, keeping for the backward only the output and
    the inverse RMS, not x: the rotation is orthogonal, so the output rotated back is the normalised
    input n, and dx = rinv * (g - n * mean(g * n)) for the gradient g rotated back."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor | None = None, sin: Tensor | None = None) -> Tensor:
        x_f32 = x.float()
        rinv = torch.rsqrt(x_f32.square().mean(-1, keepdim=True) + torch.finfo(x_f32.dtype).eps)
        y = (x_f32 * rinv).type_as(x)
        if cos is not None:
            y = apply_rope(y, cos, sin)
        ctx.save_for_backward(y, rinv, cos, sin)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        y, rinv, cos, sin = ctx.saved_tensors
        n, g = y.float(), grad.float()
        if cos is not None:
            n, g = apply_rope(n, cos, -sin), apply_rope(g, cos, -sin)
        return (rinv * (g - n * (g * n).mean(-1, keepdim=True))).type_as(grad), None, None


class ReLUSquare(torch.autograd.Function):
    """relu(x)^2 keeping only its output for the backward (relu(x) = sqrt(output)), not x as well."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = F.relu(x).square()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        (y,) = ctx.saved_tensors
        return (2 * y.float().sqrt() * grad.float()).type_as(grad)


def attention_mask(docs_T: Tensor, window: int) -> BlockMask | Tensor:
    """Built once per forward and shared by every layer: a BlockMask on GPU, a dense T x T mask on CPU."""
    return block_mask(docs_T, window) if docs_T.is_cuda else dense_mask(docs_T, window)


def attend(q_BTHD: Tensor, k_BTHD: Tensor, v_BTHD: Tensor, mask: BlockMask | Tensor, scale: float) -> Tensor:
    """flex-attention for a BlockMask; SDPA for a dense mask (CPU, where flex-attention has no backward)."""
    q_BHTD, k_BHTD, v_BHTD = (t.transpose(1, 2) for t in (q_BTHD, k_BTHD, v_BTHD))
    if isinstance(mask, BlockMask):
        y_BHTD = flex_attention(q_BHTD, k_BHTD, v_BHTD, block_mask=mask, scale=scale)
    else:
        y_BHTD = F.scaled_dot_product_attention(q_BHTD, k_BHTD, v_BHTD, attn_mask=mask, scale=scale)
    return y_BHTD.transpose(1, 2)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        dim = cfg.model_dim
        self.num_heads, self.head_dim = cfg.num_heads, dim // cfg.num_heads
        self.scale = cfg.attn_scale
        bound = math.sqrt(3) * 0.5 / math.sqrt(dim)
        self.qkv_w = nn.Parameter(torch.empty(3, dim, dim).uniform_(-bound, bound))
        self.proj = nn.Linear(dim, dim, bias=False)
        self.proj.weight.detach().zero_()

    def forward(self, x_BTC: Tensor, mask: BlockMask | Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        B, T, C = x_BTC.shape
        # v in a product of its own: as a view of one qkv output it would keep q and k's inputs alive
        qk_BT2HD = F.linear(x_BTC, self.qkv_w[:2].flatten(0, 1)).view(B, T, 2, self.num_heads, self.head_dim)
        v_BTHD = F.linear(x_BTC, self.qkv_w[2]).view(B, T, self.num_heads, self.head_dim)
        q_BTHD, k_BTHD = (norm(t_BTHD, rope) for t_BTHD in qk_BT2HD.unbind(2))
        y_BTHD = attend(q_BTHD, k_BTHD, v_BTHD, mask, self.scale)
        return self.proj(y_BTHD.reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.fc = nn.Linear(cfg.model_dim, cfg.mlp_ratio * cfg.model_dim, bias=False)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.model_dim, cfg.model_dim, bias=False)
        self.proj.weight.detach().zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(ReLUSquare.apply(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.attn = CausalSelfAttention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, mask: BlockMask | Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        x = x + self.attn(norm(x), mask, rope)
        return x + self.mlp(norm(x))


def padded_vocab(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def blocked_logsumexp(z_nV: Tensor) -> Tensor:
    """logsumexp over the last dim, combined from the maxima and sums of blocks of LSE_BLOCK logits:
    the compiler reads each block once, where a whole row of 50,304 is read once for its max and
    again for its sum."""
    n, V = z_nV.shape
    block = LSE_BLOCK if V % LSE_BLOCK == 0 else V
    z_nbB = z_nV.view(n, V // block, block)
    max_nb = z_nbB.amax(-1)
    sum_nb = torch.exp(z_nbB - max_nb[..., None]).sum(-1)
    max_n = max_nb.amax(-1)
    return max_n + torch.log((sum_nb * torch.exp(max_nb - max_n[:, None])).sum(-1))


def logit_loss(logits_nV: Tensor, targets_n: Tensor, softcap: float, softcap_scale: float, n_total: int, grads: bool):
    """Summed cross-entropy of one chunk of logits, in float32: cap * sigmoid(z / softcap_scale),
    or z if softcap is 0. With grads, also d(mean loss over n_total)/d(logits), computed in float32
    and rounded to the logits' dtype, as autograd would. run() compiles this function."""
    z_nV = logits_nV.float()
    if softcap > 0:
        sig_nV = torch.sigmoid(z_nV / softcap_scale)
        z_nV = softcap * sig_nV
    lse_n = blocked_logsumexp(z_nV)
    loss_sum = (lse_n - z_nV.gather(1, targets_n[:, None])[:, 0]).sum()
    if not grads:
        return loss_sum, None
    onehot_nV = torch.arange(z_nV.size(1), device=targets_n.device) == targets_n[:, None]
    grad_nV = (torch.exp(z_nV - lse_n[:, None]) - onehot_nV.float()) / n_total
    if softcap > 0:
        grad_nV = grad_nV * (softcap / softcap_scale) * sig_nV * (1 - sig_nV)
    return loss_sum, grad_nV.to(logits_nV.dtype)


def head_loss(x_NC: Tensor, w_VC: Tensor, targets_N: Tensor, softcap: float, softcap_scale: float, chunk: int, grads: bool,
              chunk_loss: Callable = logit_loss):
    """Mean cross-entropy of the output layer x @ w^T, `chunk` rows at a time, so that at most
    chunk x V logits exist at once. With grads, also d(loss)/dx and d(loss)/dw, summed over the
    chunks (w's in float32)."""
    N = x_NC.size(0)
    total = torch.zeros((), dtype=torch.float32, device=x_NC.device)
    dx_chunks, dw_VC = [], torch.zeros(w_VC.shape, dtype=torch.float32, device=w_VC.device) if grads else None
    for start in range(0, N, chunk):
        x_nC = x_NC[start : start + chunk]
        loss_sum, grad_nV = chunk_loss(x_nC @ w_VC.T, targets_N[start : start + chunk], softcap, softcap_scale, N, grads)
        total += loss_sum
        if grads:
            dx_chunks.append(grad_nV @ w_VC)
            dw_VC += (grad_nV.T @ x_nC).float()
    loss = total / N
    return (loss, torch.cat(dx_chunks), dw_VC.to(w_VC.dtype)) if grads else loss


class HeadLoss(torch.autograd.Function):
    """head_loss with its gradients made in the forward, so that the logits of all N tokens
    (N x V float32: 13 GB at 65,536 tokens) never exist at once and are not kept for the backward."""

    @staticmethod
    def forward(ctx, x_NC: Tensor, w_VC: Tensor, targets_N: Tensor, softcap: float, softcap_scale: float, chunk: int,
                chunk_loss: Callable = logit_loss):
        loss, dx_NC, dw_VC = head_loss(x_NC, w_VC, targets_N, softcap, softcap_scale, chunk, True, chunk_loss)
        ctx.save_for_backward(dx_NC, dw_VC)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        dx_NC, dw_VC = ctx.saved_tensors
        return dx_NC * grad_loss, dw_VC * grad_loss, None, None, None, None, None


def output_loss(x_NC: Tensor, w_VC: Tensor, targets_N: Tensor, softcap: float, softcap_scale: float, chunk: int,
                chunk_loss: Callable) -> Tensor:
    if torch.is_grad_enabled() and (x_NC.requires_grad or w_VC.requires_grad):
        return HeadLoss.apply(x_NC, w_VC, targets_N, softcap, softcap_scale, chunk, chunk_loss)
    return head_loss(x_NC, w_VC, targets_N, softcap, softcap_scale, chunk, False, chunk_loss)


class GPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        vocab = padded_vocab(cfg.vocab_size)
        self.embed = nn.Embedding(vocab, cfg.model_dim)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.lm_head = nn.Linear(cfg.model_dim, vocab, bias=False)
        if cfg.tied_embed:
            self.embed.weight = self.lm_head.weight
        else:
            self.lm_head.weight.detach().zero_()
        self.softcap = cfg.logit_softcap
        self.softcap_scale = cfg.softcap_temp * math.sqrt(cfg.model_dim)
        self.window, self.rope_base, self.loss_chunk = cfg.attn_window, cfg.rope_base, cfg.loss_chunk
        self.head_dim = cfg.model_dim // cfg.num_heads
        # compile_model() puts compiled versions here; the loss's chunk loop stays eager, since compiled
        # whole it would keep every chunk's logits alive together
        self.compiled_body: Callable = self.body
        self.chunk_loss: Callable = logit_loss

    def body(self, inputs_T: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        """Embedding, blocks and final norm: the input of the output layer, x_NC."""
        mask = attention_mask(document_ids(inputs_T), self.window)
        x = norm(self.embed(inputs_T)[None])
        for block in self.blocks:
            x = block(x, mask, rope)
        return norm(x)[0]

    def forward(self, inputs_T: Tensor, targets_T: Tensor) -> Tensor:
        # the RoPE tables enter the compiled body as inputs: made inside it, every kernel recomputes cos and sin
        rope = rope_tables(inputs_T.numel(), self.head_dim, self.rope_base, inputs_T.device)
        x_NC = self.compiled_body(inputs_T, rope)
        return output_loss(x_NC, self.lm_head.weight, targets_T, self.softcap, self.softcap_scale, self.loss_chunk,
                           self.chunk_loss)


# -----------------------------------------------------------------------------
# Optimizer: AdamW from torch.optim, nothing of our own


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


def build_optimizers(cfg: Config, model: GPT, rank: int, world_size: int):
    """The optimizers, and a function that sets their schedules at a step."""
    fused = next(model.parameters()).is_cuda
    adamw = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.adam_lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
        fused=fused,
    )
    optimizers: list[torch.optim.Optimizer] = [adamw]
    for group in adamw.param_groups:
        group["initial_lr"] = group["lr"]

    def set_schedule(step: int) -> None:
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lr_multiplier(step, cfg)

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
    micro_batches, rest = divmod(cfg.batch_tokens, cfg.seq_len)
    if rest:
        raise ConfigError(f"batch_tokens {cfg.batch_tokens} is not a multiple of seq_len {cfg.seq_len}")
    if micro_batches % world_size:
        sizes = [n for n in range(1, micro_batches + 1) if micro_batches % n == 0]
        raise ConfigError(
            f"world size {world_size} cannot keep the global batch of {micro_batches} x {cfg.seq_len} tokens; "
            f"world sizes that can: {', '.join(map(str, sizes))}"
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
        if not self.active:
            return
        os.makedirs(cfg.log_dir, exist_ok=True)
        self.run_id = f"{BASELINE}_{time.strftime('%Y%m%d-%H%M%S')}_{uuid.uuid4().hex[:6]}"
        self.path = os.path.join(cfg.log_dir, f"{self.run_id}.txt")
        self.file = open(self.path, "w")

    def __call__(self, text: str, echo: bool = True) -> None:
        if self.active:
            self.file.write(text + "\n")
            self.file.flush()
            if echo:
                print(text, flush=True)


# -----------------------------------------------------------------------------
# Checkpoints

CHECKPOINT_FORMAT = 1  # layout version of the checkpoint file
SHAPE_FIELDS = ("vocab_size", "num_layers", "model_dim", "num_heads", "mlp_ratio", "tied_embed")
CHECKPOINT_KEYS = ("format", "baseline", "script", "shape", "config", "model", "optimizers", "step", "train_ms", "val_losses", "loader", "rng")


class CheckpointError(RuntimeError):
    """A checkpoint to resume from that is unreadable, truncated, or from another script or model shape."""


def save_checkpoint(
    path: str,
    cfg: Config,
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


def load_checkpoint(path: str, cfg: Config) -> dict:
    """Read a checkpoint and refuse, before any training work, one that is truncated, from the other
    script, from another model shape or past the last step."""
    if not os.path.isfile(path):
        raise CheckpointError(f"--resume={path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn or foreign file fails inside torch.load in many ways
        reason = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path}: truncated or not a checkpoint ({type(e).__name__}: {reason})") from None
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt] if isinstance(ckpt, dict) else list(CHECKPOINT_KEYS)
    if missing:
        raise CheckpointError(f"{path}: truncated or not a checkpoint (missing {', '.join(missing)})")
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {ckpt['format']}, this script reads format {CHECKPOINT_FORMAT}")
    if ckpt["baseline"] != BASELINE:
        raise CheckpointError(f"{path}: checkpoint from {ckpt['script']}, this is {os.path.basename(__file__)}")
    differing = [
        f"{name}={ckpt['shape'].get(name)!r} in the checkpoint, {getattr(cfg, name)!r} here"
        for name in SHAPE_FIELDS
        if ckpt["shape"].get(name) != getattr(cfg, name)
    ]
    if differing:
        raise CheckpointError(f"{path}: checkpoint of another model shape: {'; '.join(differing)}")
    if ckpt["step"] > cfg.num_iterations:
        raise CheckpointError(f"{path}: checkpoint at step {ckpt['step']}, past num_iterations={cfg.num_iterations}")
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


def evaluate(model: nn.Module, cfg: Config, ctx: Dist) -> float:
    total, count = torch.zeros((), device=ctx.device, dtype=torch.float64), 0
    with torch.no_grad():
        for inputs, targets in validation_batches(cfg.val_files, cfg.val_tokens, cfg.seq_len, ctx.rank, ctx.world_size, ctx.device):
            total += model(inputs, targets).double()
            count += 1
    if ctx.world_size > 1:
        dist.all_reduce(total)
    return total.item() / (count * ctx.world_size)


def compile_model(cfg: Config, model: GPT) -> None:
    """torch.compile the model's body and its per-chunk loss (the chunk loop and products stay eager)."""
    torch._functorch.config.activation_memory_budget = cfg.activation_budget
    model.compiled_body = torch.compile(model.body, dynamic=False)
    model.chunk_loss = torch.compile(logit_loss, dynamic=False)


def run(cfg: Config, ctx: Dist, argv: list[str]) -> dict:
    accum = accumulation_steps(cfg, ctx.world_size)
    check_val_tokens(cfg, ctx.world_size)
    loader = TrainLoader(cfg.train_files, cfg.batch_tokens, cfg.seq_len, ctx.rank, ctx.world_size, ctx.device)
    if loader.capacity() < cfg.num_iterations:
        raise DataError(
            f"{cfg.train_files!r} holds enough tokens for {loader.capacity()} steps of {cfg.batch_tokens} tokens, "
            f"num_iterations={cfg.num_iterations} needs more; download more shards with: {DOWNLOAD_HINT}"
        )
    next(validation_batches(cfg.val_files, cfg.val_tokens, cfg.seq_len, 0, 1, torch.device("cpu")))
    if ctx.device.type == "cuda" and cfg.seq_len % FLEX_BLOCK:
        raise ConfigError(f"seq_len {cfg.seq_len} must be a multiple of {FLEX_BLOCK} for flex-attention")
    checkpoint = load_checkpoint(cfg.resume, cfg) if cfg.resume else None
    if checkpoint is not None:
        loader.seek(**checkpoint["loader"])

    log = RunLog(cfg, ctx)
    log(f"run_id: {log.run_id if log.active else ''}\nbaseline: {BASELINE}\nscript: {os.path.basename(__file__)}")
    log(f"date: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
    log(f"command: {' '.join([os.path.basename(__file__), *argv])}")
    with open(__file__) as f:
        log(f"=== source: {os.path.basename(__file__)} ===\n{f.read().rstrip()}\n=== end of source ===", echo=False)
    log(f"config: {json.dumps(dataclasses.asdict(cfg))}")
    log("\n".join(system_report(ctx.device, ctx.world_size)) + f"\ngrad_accum_steps: {accum}")
    if checkpoint is not None:
        log(f"resumed_from: {cfg.resume} step:{checkpoint['step']}")
    log(f"nvidia-smi:\n{nvidia_smi()}", echo=False)

    torch.manual_seed(cfg.seed)
    model = GPT(cfg).to(device=ctx.device, dtype=getattr(torch, cfg.param_dtype))
    optimizers, set_schedule = build_optimizers(cfg, model, ctx.rank, ctx.world_size)
    train_model: nn.Module = model
    if ctx.world_size > 1:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)
    if cfg.compile and ctx.device.type == "cuda":
        compile_model(cfg, model)

    def train_step(step: int, batches: list[tuple[Tensor, Tensor]]) -> Tensor:
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

    # Compile and warm up on random tokens, then restore the initial state: warm-up never trains.
    initial_model = {k: v.clone() for k, v in model.state_dict().items()}
    initial_opts = [opt.state_dict() for opt in optimizers]
    rng = torch.Generator().manual_seed(cfg.seed + 1)
    for step in range(cfg.warmup_compile_steps):
        random = torch.randint(0, cfg.vocab_size, (accum, cfg.seq_len + 1), generator=rng).to(ctx.device)
        train_step(step, [(row[:-1], row[1:]) for row in random])
        with torch.no_grad():
            train_model(random[0, :-1], random[0, 1:])
    model.load_state_dict(initial_model)
    for opt, state in zip(optimizers, initial_opts):
        opt.load_state_dict(state)
    del initial_model, initial_opts
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)

    log("=== training ===")
    val_losses: dict[int, float] = {}
    train_losses: list[float] = []
    pending: list[tuple[int, Tensor]] = []
    synchronize = torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)

    def check_finite(entries: list[tuple[int, Tensor]]) -> None:
        for s, loss in entries:
            train_losses.append(loss.item())
            if not math.isfinite(train_losses[-1]):
                log(f"stopped: loss is {train_losses[-1]} at step {s}\n=== end of run ===")
                raise FloatingPointError(f"training loss became {train_losses[-1]} at step {s}")
        entries.clear()

    start, train_ms = 0, 0.0
    if checkpoint is not None:  # only after warm-up, which would disturb the restored states
        start, train_ms = restore_checkpoint(checkpoint, model, optimizers, ctx.device)
        val_losses.update(checkpoint["val_losses"])
    synchronize()
    t0 = time.perf_counter()
    for step in range(start, cfg.num_iterations + 1):
        last = step == cfg.num_iterations
        if last or (cfg.val_loss_every > 0 and step % cfg.val_loss_every == 0):
            synchronize()
            train_ms += 1000 * (time.perf_counter() - t0)
            check_finite(pending)
            if step not in val_losses:  # a resumed run's first step was validated before its checkpoint
                val_losses[step] = evaluate(train_model, cfg, ctx)
            log(f"step:{step}/{cfg.num_iterations} val_loss:{val_losses[step]:.4f} train_time:{train_ms:.0f}ms step_avg:{train_ms / max(step, 1):.2f}ms")
            synchronize()
            t0 = time.perf_counter()
        if cfg.checkpoint_every > 0 and step > start and (last or step % cfg.checkpoint_every == 0):
            synchronize()
            train_ms += 1000 * (time.perf_counter() - t0)
            check_finite(pending)  # a non-finite loss stops the run before it is saved
            if ctx.master:
                path = os.path.join(cfg.checkpoint_dir, f"{log.run_id}_step{step:06d}.pt")
                save_checkpoint(path, cfg, model, optimizers, step, train_ms, val_losses, loader, ctx.device)
                log(f"checkpoint: {path}")
            if ctx.world_size > 1:
                dist.barrier()  # every rank moves on only once the file is written
            synchronize()
            t0 = time.perf_counter()
        if last:
            break
        loss = train_step(step, loader.next_step())
        check_finite(pending)  # the previous step's loss: checking this one would stall the queue
        pending.append((step + 1, loss))
        elapsed = train_ms + 1000 * (time.perf_counter() - t0)
        log(f"step:{step + 1}/{cfg.num_iterations} train_time:{elapsed:.0f}ms step_avg:{elapsed / (step + 1):.2f}ms")

    if ctx.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(ctx.device) // 2**20
        reserved = torch.cuda.max_memory_reserved(ctx.device) // 2**20
        log(f"peak memory allocated: {peak} MiB reserved: {reserved} MiB")
    log("=== end of run ===")
    return {"val_losses": val_losses, "train_losses": train_losses, "train_ms": train_ms, "model": model,
            "log_path": log.path if log.active else None}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(config_help())
        return {}
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
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

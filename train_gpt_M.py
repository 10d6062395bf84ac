"""GPT speedrun baseline, one of two twin scripts: train_gpt_A.py (AdamW) and train_gpt_M.py (Muon).

    torchrun --standalone --nproc_per_node=8 train_gpt_M.py      # the baseline on 8 GPUs
    python train_gpt_M.py --preset=tiny                            # a small model on CPU
    python train_gpt_M.py --help                                   # every configuration field

SPEC.md states the math; the model section below is that math in plain PyTorch ops, the place to change the
model. fast_ops.py, beside this file, holds tested drop-ins for some of those ops (less memory, more speed),
chosen once at start-up and named in the log; without it, or with --fast_ops=false, the plain ops run.
`diff train_gpt_A.py train_gpt_M.py` is the ablation: the optimizer section, the body of build_optimizers and
configuration values.
"""
import argparse
import dataclasses
import glob
import importlib.util
import inspect
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
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
    import fast_ops
except ImportError:  # this script alone: the plain ops run, and the log says so
    fast_ops = None

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# Model: the math of SPEC.md in plain PyTorch ops. The model calls the ops of `Ops` through its `ops`, which
# holds these functions or their drop-ins from fast_ops.py.

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

class Ops(NamedTuple):
    """The ops the model calls by name."""

    rms_norm: Callable
    qk_norm_rope: Callable
    mlp: Callable
    output_loss: Callable

def plain_ops() -> Ops:
    """The ops above as they are when the model is built, so that an edited or patched op takes effect."""
    return Ops(rms_norm, qk_norm_rope, mlp, output_loss)

def document_ids(tokens_T: Tensor, eot_token: int) -> Tensor:
    """Running count of the end-of-text token, which starts every document."""
    return (tokens_T == eot_token).cumsum(0)

def make_mask_mod(docs_T: Tensor, window: int):
    """A query attends to keys at or before it, in its own document, fewer than `window` tokens back."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (docs_T[q_idx] == docs_T[kv_idx]) & (q_idx - kv_idx < window)

    return mask_mod

class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: "Config"):
        super().__init__()
        dim = cfg.model_dim
        self.num_heads, self.head_dim, self.scale = cfg.num_heads, dim // cfg.num_heads, cfg.attn_scale
        bound = math.sqrt(3) * 0.5 / math.sqrt(dim)
        self.qkv_w = nn.Parameter(torch.empty(3, dim, dim).uniform_(-bound, bound))
        self.proj = nn.Linear(dim, dim, bias=False)
        self.proj.weight.detach().zero_()

    def forward(self, x_BTC: Tensor, mask: "BlockMask | Tensor", rope: tuple[Tensor, Tensor], ops: Ops) -> Tensor:
        B, T, C = x_BTC.shape
        # v in a product of its own: as a view of one qkv output it would keep q and k's inputs alive
        qk_BTND = F.linear(x_BTC, self.qkv_w[:2].flatten(0, 1)).view(B, T, 2 * self.num_heads, self.head_dim)
        v_BTHD = F.linear(x_BTC, self.qkv_w[2]).view(B, T, self.num_heads, self.head_dim)
        q_BTHD, k_BTHD = ops.qk_norm_rope(qk_BTND, *rope)
        y_BTHD = attention(q_BTHD, k_BTHD, v_BTHD, mask, self.scale)
        return self.proj(y_BTHD.reshape(B, T, C))

class MLP(nn.Module):
    def __init__(self, cfg: "Config"):
        super().__init__()
        self.fc = nn.Linear(cfg.model_dim, cfg.mlp_ratio * cfg.model_dim, bias=False)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.model_dim, cfg.model_dim, bias=False)
        self.proj.weight.detach().zero_()

    def forward(self, x: Tensor, ops: Ops) -> Tensor:
        return ops.mlp(x, self.fc.weight, self.proj.weight)

class Block(nn.Module):
    def __init__(self, cfg: "Config"):
        super().__init__()
        self.attn = CausalSelfAttention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, mask: "BlockMask | Tensor", rope: tuple[Tensor, Tensor], ops: Ops) -> Tensor:
        x = x + self.attn(ops.rms_norm(x), mask, rope, ops)
        return x + self.mlp(ops.rms_norm(x), ops)

class GPT(nn.Module):
    """`ops`: the implementation of each op by name (select_ops); by default the plain ops."""

    def __init__(self, cfg: "Config", ops: dict[str, Callable] | None = None):
        super().__init__()
        self.ops = Ops(**{name: ops[name] for name in Ops._fields}) if ops else plain_ops()
        vocab = padded_vocab(cfg.vocab_size)
        self.embed = nn.Embedding(vocab, cfg.model_dim)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
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
            x = block(x, mask, (cos, sin), self.ops)
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
# Fast ops: each op's implementation, chosen once per run. fast_ops.py names a drop-in for some ops on some
# devices; the others run as written above. The log names every op's choice and carries fast_ops.py's source.

def select_ops(cfg: "Config", device: torch.device) -> tuple[dict[str, Callable], str]:
    """The implementation of every op of the model and the optimizer, and the log line that names them."""
    plain = {**plain_ops()._asdict(), **optimizer_ops()}
    if fast_ops is None:
        return plain, "fast_ops: plain (fast_ops.py not found beside the script)"
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    choice = fast_ops.choose(list(plain), device.type, capability, fast_ops.TRITON, cfg.fast_ops)
    return {**plain, **fast_ops.drop_ins(choice, plain, cfg.loss_chunk)}, fast_ops.describe(choice)

def fast_ops_errors(cfg: "Config", ops: dict[str, Callable], device: torch.device) -> list[str]:
    """Each drop-in against its plain op on small inputs: an edited plain op is refused, not silently replaced."""
    if fast_ops is None:
        return []
    plain = {**plain_ops()._asdict(), **optimizer_ops()}
    return fast_ops.check_fast_ops(ops, plain, device, cfg.logit_softcap, cfg.softcap_temp * math.sqrt(cfg.model_dim))

# -----------------------------------------------------------------------------
# Configuration

@dataclass
class Config:
    # data
    train_files: str = "data/fineweb10B/fineweb_train_*.bin"  # glob of training shards
    seq_len: int = 65_536  # tokens per forward pass, per process; a multiple of 128 (flex-attention's tile)
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
    muon_weight_decay: float = 0.0  # Muon decoupled weight decay, times the LR
    muon_momentum: float = 0.95  # Muon momentum after its warm-up
    muon_momentum_start: float = 0.85  # Muon momentum at step 0
    muon_momentum_warmup: int = 300  # steps of linear momentum warm-up
    ns_steps: int = 5  # Newton-Schulz iterations per update
    head_lr: float = 0.22  # Adam learning rate, output layer (and the embedding when tied: one weight)
    embed_lr: float = 0.6  # Adam learning rate, embedding (untied only)
    scalar_lr: float = 0.04  # Adam learning rate, parameters of fewer than 2 dims
    adam_weight_decay: float = 0.0  # Adam decoupled weight decay, times the LR, all of Adam's parameters
    adam_beta1: float = 0.8  # Adam first-moment decay
    adam_beta2: float = 0.95  # Adam second-moment decay
    adam_eps: float = 1e-10  # Adam denominator epsilon
    # evaluation and logging
    val_files: str = "data/fineweb10B/fineweb_val_*.bin"  # glob of validation shards
    val_tokens: int = 10_485_760  # tokens per validation pass
    val_loss_every: int = 125  # steps between validations; 0 = only at the end
    log_dir: str = "logs"  # folder of the run logs: <run_id>.txt, and <run_id>.jsonl for other tools
    wandb_project: str = ""  # Weights & Biases project that rank 0 also logs to (pip install wandb); "" = none
    # checkpoints
    checkpoint_every: int = 0  # steps between checkpoints, also written at the end; 0 = none
    checkpoint_dir: str = "checkpoints"  # folder of a folder per run, named as its log
    keep_checkpoints: int = 3  # newest checkpoints of a run kept, older ones deleted; 0 = keep all
    resume: str = ""  # checkpoint file to continue from (never deleted)
    resume_changes: bool = False  # allow resuming with other model, batch, schedule or optimizer settings
    # run
    seed: int = 0  # initial weights; the data order is fixed by the files
    fast_ops: bool = True  # fast_ops.py's drop-ins where it has them for this device; false = plain ops only
    loss_chunk: int = 8192  # tokens whose logits the fast output loss holds at once
    compile: bool = True  # torch.compile the model (CUDA only)
    activation_budget: float = 1.0  # fraction of the activations compile keeps for the backward; less = recompute more
    warmup_compile_steps: int = 3  # steps on random tokens before timing; the state is restored
    preset: str = ""  # named group of overrides applied before the others: tiny

BASELINE = "M"
PRESETS: dict[str, dict[str, object]] = {  # tiny: a small model on the embedded sample, for CPU
    "tiny": dict(train_files=os.path.join(HERE, "data/sample/sample_train_*.bin"), seq_len=128, batch_tokens=8 * 128,
                 num_layers=2, model_dim=64, num_heads=2, attn_window=96, param_dtype="float32", num_iterations=60,
                 muon_momentum_warmup=20, val_files=os.path.join(HERE, "data/sample/sample_val_*.bin"),
                 val_tokens=8192, val_loss_every=20),
}
# Valid values of every number field: "> 0", ">= 0", or an interval with [ ] for included ends.
LIMITS: dict[str, str] = dict(
    seq_len="> 0", batch_tokens="> 0", vocab_size="> 0", eot_token=">= 0", num_layers="> 0", model_dim="> 0",
    num_heads="> 0", mlp_ratio="> 0", attn_window="> 0", attn_scale="> 0", rope_base="> 0", logit_softcap=">= 0",
    softcap_temp="> 0", num_iterations="> 0", warmup_steps=">= 0", cooldown_frac="[0, 1]", final_lr_frac="[0, 1]",
    muon_lr="> 0", muon_weight_decay=">= 0", muon_momentum="[0, 1)", muon_momentum_start="[0, 1)",
    muon_momentum_warmup=">= 0", ns_steps=">= 0", head_lr="> 0", embed_lr="> 0", scalar_lr="> 0",
    adam_weight_decay=">= 0", adam_beta1="[0, 1)", adam_beta2="[0, 1)", adam_eps=">= 0", val_tokens="> 0",
    val_loss_every=">= 0", checkpoint_every=">= 0", keep_checkpoints=">= 0",
    seed="[0, 4294967295]", loss_chunk="> 0", activation_budget="(0, 1]", warmup_compile_steps=">= 0",
)
CHOICES: dict[str, tuple[str, ...]] = dict(param_dtype=("bfloat16", "float32"), preset=("", *PRESETS))
# topics of fields that may differ on resume without --resume_changes: how (not what) to compute, where
# outputs go, how often to validate and save
RESUME_FREE_TOPICS = ("evaluation and logging", "checkpoints", "run")

class ConfigError(ValueError):
    """A configuration refused before anything starts: one line per problem."""

def in_limits(value: float, rule: str) -> bool:
    if " or " in rule:  # a sentinel, then the range: "-1 or >= 0"
        sentinel, rest = rule.split(" or ", 1)
        return value == float(sentinel) or in_limits(value, rest)
    if rule in ("> 0", ">= 0"):
        return value > 0 or (rule == ">= 0" and value == 0)
    lo_bracket, lo, hi, hi_bracket = re.fullmatch(r"([\[(])(\S+), (\S+)([\])])", rule).groups()
    above = value >= float(lo) if lo_bracket == "[" else value > float(lo)
    below = value <= float(hi) if hi_bracket == "]" else value < float(hi)
    return above and below

def config_errors(cfg: Config) -> list[str]:
    """One message per field that is out of range or does not fit with another, on any device."""
    errors = [f"--{name}={getattr(cfg, name)!r} is out of range: must be {'' if rule[0] in '<>-' else 'in '}{rule}"
              for name, rule in LIMITS.items() if not in_limits(getattr(cfg, name), rule)]
    errors += [f"--{name}={getattr(cfg, name)!r}: choose one of {', '.join(map(repr, options))}"
               for name, options in CHOICES.items() if getattr(cfg, name) not in options]
    if errors:
        return errors
    return [message for broken, message in [
        (cfg.model_dim % cfg.num_heads or cfg.model_dim // cfg.num_heads % 4,
         f"--model_dim={cfg.model_dim} must split into --num_heads={cfg.num_heads} heads of a multiple of 4"),
        (cfg.seq_len % FLEX_BLOCK,
         f"--seq_len={cfg.seq_len} must be a multiple of {FLEX_BLOCK} (flex-attention's tile)"),
        (cfg.batch_tokens % cfg.seq_len,
         f"--batch_tokens={cfg.batch_tokens} is not a multiple of --seq_len={cfg.seq_len}"),
        (cfg.eot_token >= cfg.vocab_size, f"--eot_token={cfg.eot_token} is not below --vocab_size={cfg.vocab_size}"),
        (cfg.warmup_steps > cfg.num_iterations,
         f"--warmup_steps={cfg.warmup_steps} is longer than the run (--num_iterations={cfg.num_iterations})"),
        (cfg.wandb_project and importlib.util.find_spec("wandb") is None,
         f"--wandb_project={cfg.wandb_project!r} needs the wandb package: pip install wandb"),
        *[(not getattr(cfg, name).strip(), f"--{name}='' names nothing")
          for name in ("log_dir", "checkpoint_dir", "train_files", "val_files")],
    ] if broken]

def world_size_errors(cfg: Config, world_size: int) -> list[str]:
    """The global batch and the validation pass must split evenly over the processes; the refusal names ways
    out that pass every check as written."""
    if cfg.batch_tokens % (world_size * cfg.seq_len):
        micro = cfg.batch_tokens // cfg.seq_len
        ways = []
        for fix, why in ((dict(seq_len=cfg.batch_tokens // world_size), "the same tokens per step; documents longer "
                          "than a sequence are cut more often"),
                         (dict(batch_tokens=world_size * cfg.seq_len), "one sequence per process; more tokens per "
                          "step, for which the learning rates and step count were not tuned")):
            trial = dataclasses.replace(cfg, **fix)
            if config_errors(trial) or trial.batch_tokens % (world_size * trial.seq_len):
                continue
            val_batch = world_size * trial.seq_len
            if trial.val_tokens % val_batch:
                fix["val_tokens"] = max(1, trial.val_tokens // val_batch) * val_batch
            ways.append(" ".join(f"--{k}={v}" for k, v in fix.items()) + f" ({why})")
        sizes = [n for n in range(1, micro + 1) if micro % n == 0]
        return [f"world size {world_size} cannot keep the global batch of {micro} x {cfg.seq_len} tokens (world "
                f"sizes that can: {', '.join(map(str, sizes))}); for {world_size} processes use " + " or ".join(ways)]
    val_batch = world_size * cfg.seq_len
    if cfg.val_tokens % val_batch:
        lower = cfg.val_tokens // val_batch * val_batch
        nearest = ", ".join(str(v) for v in (lower, lower + val_batch) if v > 0)
        return [f"--val_tokens={cfg.val_tokens} is not a multiple of the validation batch (world size {world_size} "
                f"x seq_len {cfg.seq_len} = {val_batch}); nearest valid values: {nearest}"]
    return []

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
    if text.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("1", "true", "yes", "on")

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
        rule = f"; {rule}" if rule else ""
        group.add_argument(f"--{f.name}", type=parse_bool if f.type is bool else f.type, default=f.default,
                           metavar=f.type.__name__.upper(), help=f"{text} (default {f.default!r}{rule})")
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
        self.seek(0, 0)

    def files_for(self, steps: int) -> list[str]:
        """The shards that `steps` steps read, from their headers."""
        counts = np.cumsum([steps_in_shard(shard_token_count(f), self.batch_tokens) for f in self.files])
        return self.files[: int(np.searchsorted(counts, steps)) + 1] if counts[-1] >= steps else []

    def seek(self, file_index: int, pos: int) -> None:
        """Continue from a saved position: it counts global tokens, so any world size can take it up."""
        if file_index >= len(self.files):
            raise DataError(f"the saved data position is in shard {file_index + 1}, but only {len(self.files)} "
                            f"shard(s) match")
        self.file_index, self.pos = file_index, pos
        self.tokens = load_shard(self.files[file_index])

    def next_step(self) -> list[tuple[Tensor, Tensor]]:
        while self.pos + self.batch_tokens + 1 > len(self.tokens):
            if self.file_index + 1 >= len(self.files):
                raise DataError(f"training data exhausted after {len(self.files)} shard(s)")
            self.seek(self.file_index + 1, 0)
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

def validation_batches(pattern: str, val_tokens: int, seq_len: int, rank: int, world_size: int,
                       device: torch.device):
    """Batch b of rank r is slice b * world_size + r of the validation tokens."""
    tokens = validation_tokens(pattern, val_tokens)
    for b in range(val_tokens // (seq_len * world_size)):
        start = (b * world_size + rank) * seq_len
        window = torch.from_numpy(tokens[start : start + seq_len + 1].astype(np.int64)).to(device)
        yield window[:-1], window[1:]

def data_errors(cfg: Config, loader: TrainLoader, ctx: "Dist") -> list[str]:
    """Too few training tokens, training files that are the validation files, and token ids that the
    vocabulary does not hold: the processes share the reading of the shards that the run reads."""
    files = loader.files_for(cfg.num_iterations)
    if not files:
        capacity = sum(steps_in_shard(shard_token_count(f), cfg.batch_tokens) for f in loader.files)
        return [f"{cfg.train_files!r} holds enough tokens for {capacity} steps of {cfg.batch_tokens} tokens, "
                f"num_iterations={cfg.num_iterations} needs more; download more shards with: {DOWNLOAD_HINT}"]
    val_files = find_shards(cfg.val_files)
    if shared := sorted(set(map(os.path.realpath, loader.files)) & set(map(os.path.realpath, val_files))):
        return [f"--train_files and --val_files both match {shared[0]}: validation would measure the training data"]
    largest = torch.full((len(files) + 1,), -1, dtype=torch.int64, device=ctx.device)
    for i in range(ctx.rank, len(files), ctx.world_size):
        tokens = load_shard(files[i])
        largest[i] = int(tokens.max()) if len(tokens) else -1
    largest[-1] = int(validation_tokens(cfg.val_files, cfg.val_tokens).max())
    if ctx.world_size > 1:
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    worst = int(largest.argmax())
    if int(largest[worst]) >= cfg.vocab_size:
        where = cfg.val_files if worst == len(files) else files[worst]
        return [f"--vocab_size={cfg.vocab_size} is too small for the data: token id {int(largest[worst])} in "
                f"{where}; use --vocab_size={int(largest[worst]) + 1} or more"]
    return []

# -----------------------------------------------------------------------------
# Optimizer: Muon, orthogonalised momentum SGD for the matrices inside the blocks

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz coefficients (a, b, c)
NS_EPS = 1e-7  # added to the Frobenius norm before dividing by it

def plain_gram(X_nRK: Tensor, C_nRR: Tensor | None = None, beta: float = 0.0, alpha: float = 1.0) -> Tensor:
    """beta C + alpha X X^T, batched: Newton-Schulz's symmetric products."""
    if C_nRR is None:
        return torch.bmm(X_nRK, X_nRK.mT) if alpha == 1 else alpha * torch.bmm(X_nRK, X_nRK.mT)
    return torch.baddbmm(C_nRR, X_nRK, X_nRK.mT, beta=beta, alpha=alpha)

def optimizer_ops() -> dict[str, Callable]:
    """The optimizer's ops that fast_ops.py may replace."""
    return dict(gram=plain_gram)

def newton_schulz(G_NRC: Tensor, steps: int, gram_op: Callable = plain_gram) -> Tensor:
    """Quintic Newton-Schulz iteration toward the nearest semi-orthogonal matrix, in bfloat16,
    batched over the leading dim; tall matrices are iterated transposed (the smaller Gram)."""
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
        # A is symmetric, so A A = A A^T: a Gram product like X X^T, which the fast op computes from half the tiles
        B_nRR = gram_op(A_nRR, A_nRR, beta=b, alpha=c)
        X_nRC = torch.baddbmm(X_nRC, B_nRR, X_nRC, beta=a)
    X = X_nRC.view(X.shape)
    return X.mT if tall else X

class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose update is orthogonalised by Newton-Schulz and applied as
    p -= lr * max(1, rows/cols)^0.5 * update, after a decoupled weight decay p *= 1 - lr * weight_decay. A 3-D
    weight is a stack of matrices, each orthogonalised alone. Same-shaped matrices form one batch, split
    across ranks and all-gathered."""

    def __init__(self, params, lr: float, momentum: float, ns_steps: int, weight_decay: float = 0.0, rank: int = 0,
                 world_size: int = 1, gram_op: Callable = plain_gram):
        super().__init__(params, dict(lr=lr, momentum=momentum, ns_steps=ns_steps, weight_decay=weight_decay))
        self.rank, self.world_size, self.gram_op = rank, world_size, gram_op

    def orthogonalize(self, updates_NRC: Tensor, steps: int) -> Tensor:
        if self.world_size == 1:
            return newton_schulz(updates_NRC, steps, self.gram_op)
        n = updates_NRC.size(0)
        per_rank = -(-n // self.world_size)
        padding = updates_NRC.new_zeros(per_rank * self.world_size - n, *updates_NRC.shape[1:])
        mine_NRC = torch.cat([updates_NRC, padding])[self.rank * per_rank : (self.rank + 1) * per_rank]
        mine_NRC = newton_schulz(mine_NRC, steps, self.gram_op).contiguous()
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
            if group["weight_decay"] > 0:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
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
    assert sorted(grouped) == sorted(id(p) for p in model.parameters()), "every parameter must be in one group"

def build_optimizers(cfg: Config, model: GPT, ops: dict[str, Callable], ctx: "Dist"):
    """The optimizers, and a function that sets their schedules at a step. `ops` and `ctx`: the optimizer's
    ops (select_ops) and the processes, for optimizers that use them."""
    fused = next(model.parameters()).is_cuda
    matrices = [p for p in model.blocks.parameters() if p.ndim >= 2]
    scalars = [p for p in model.parameters() if p.ndim < 2]
    head = [model.lm_head.weight]
    embed = [] if model.embed.weight is model.lm_head.weight else [model.embed.weight]
    groups = [dict(params=head, lr=cfg.head_lr), dict(params=embed, lr=cfg.embed_lr),
              dict(params=scalars, lr=cfg.scalar_lr)]
    adam = torch.optim.Adam([g for g in groups if g["params"]], betas=(cfg.adam_beta1, cfg.adam_beta2),
                            eps=cfg.adam_eps, weight_decay=cfg.adam_weight_decay,
                            decoupled_weight_decay=cfg.adam_weight_decay > 0, fused=fused)
    muon = Muon(matrices, lr=cfg.muon_lr, momentum=cfg.muon_momentum, ns_steps=cfg.ns_steps,
                weight_decay=cfg.muon_weight_decay, rank=ctx.rank, world_size=ctx.world_size, gram_op=ops["gram"])
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

def folder_problem(folder: str) -> str | None:
    """Why files cannot be written into `folder` (made if missing), or None; leaves nothing behind."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a folder"
    try:
        with open(os.path.join(existing, f".write_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"), "w") as f:
            os.remove(f.name)
    except OSError as e:
        return f"{existing} cannot be written ({e.strerror})"
    return None

TRAINING_START = "=== training ==="

class RunLog:
    """From rank 0 only: lines to log_dir/<run_id>.txt and stdout; their records (steps, validations and a first
    one with the configuration) to log_dir/<run_id>.jsonl and to Weights & Biases. Keeps the training section,
    which a checkpoint carries into the log of a run resumed from it."""

    def __init__(self, cfg: Config, ctx: Dist):
        self.active, self.wandb = ctx.master, None
        self.run_id = f"{BASELINE}_{time.strftime('%Y%m%d-%H%M%S')}_{uuid.uuid4().hex[:6]}"
        self.path = os.path.join(cfg.log_dir, f"{self.run_id}.txt")
        self.training: list | None = None  # after "=== training ===": its lines, and [line, record] pairs
        if self.active:
            os.makedirs(cfg.log_dir, exist_ok=True)
            self.file, self.jsonl = open(self.path, "w"), open(self.path[: -len(".txt")] + ".jsonl", "w")
            if cfg.wandb_project:
                import wandb

                self.wandb = wandb.init(project=cfg.wandb_project, name=self.run_id, config=dataclasses.asdict(cfg))

    def __call__(self, text: str, echo: bool = True, record: dict | None = None) -> None:
        if self.training is not None:
            self.training.append([text, record] if record else text)
        if text == TRAINING_START:
            self.training = []
        if self.active:
            self.file.write(text + "\n")
            self.file.flush()
            if record is not None:
                self.jsonl.write(json.dumps(record) + "\n")
                self.jsonl.flush()
            if self.wandb is not None and record is not None and "step" in record:
                self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
            if echo:
                print(text, flush=True)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()

def write_header(t: "Training", argv: list[str], ops_line: str, checkpoint: dict | None) -> None:
    """Run id, command, the code that runs (this script's source and fast_ops.py's), configuration, versions."""
    log = t.log
    log(f"run_id: {log.run_id}\nbaseline: {BASELINE}\nscript: {os.path.basename(__file__)}")
    log(f"date: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
    log(f"command: {' '.join([os.path.basename(__file__), *argv])}")
    for path in [__file__] + ([fast_ops.__file__] if fast_ops else []):
        with open(path) as f:
            log(f"=== source: {os.path.basename(path)} ===\n{f.read().rstrip()}\n=== end of source ===", echo=False)
    device, world_size = t.ctx.device, t.ctx.world_size
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"
    versions = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda)
    log(f"config: {json.dumps(dataclasses.asdict(t.cfg))}", record=dict(run_id=log.run_id, baseline=BASELINE,
                                                                       config=dataclasses.asdict(t.cfg), **versions))
    log("\n".join(f"{k}: {v}" for k, v in versions.items()) + f"\ndevice: {name} x{world_size}\nworld_size: "
        f"{world_size}\ngrad_accum_steps: {t.loader.accum_steps}\n{ops_line}")
    if checkpoint is not None:
        log(f"resumed_from: {t.cfg.resume} step:{checkpoint['step']} run:{checkpoint['run_id']}")
        for change in checkpoint["changes"]:
            log(f"resume_change: {change}")
    smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout if shutil.which("nvidia-smi") else ""
    log(f"nvidia-smi:\n{smi.strip() or '(not available)'}", echo=False)
    log(TRAINING_START)
    for line in checkpoint["history"] if checkpoint else []:
        text, record = line if isinstance(line, list) else (line, None)
        log(text, echo=False, record=record)

# -----------------------------------------------------------------------------
# Checkpoints: checkpoint_dir/<run id>/stepNNNNNN.pt, a folder per run (a resumed run writes its own)

CHECKPOINT_FORMAT = 3  # layout version of the checkpoint file
SHAPE_FIELDS = ("vocab_size", "num_layers", "model_dim", "num_heads", "mlp_ratio", "tied_embed")
CHECKPOINT_KEYS = ("format", "baseline", "script", "run_id", "torch", "shape", "config", "model", "optimizers",
                   "step", "train_ms", "val_losses", "loader", "rng", "history")

class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, or one to resume from that is unreadable, truncated, or from
    another script, model shape or configuration."""

def save_checkpoint(t: "Training", step: int, train_ms: float, val_losses: dict[int, float]) -> str:
    """Everything a resumed run needs after `step` steps, written to a temporary file and renamed (a kill
    mid-write leaves the previous checkpoints whole); then the run's older checkpoints beyond keep_checkpoints
    go. Only tensors, containers and plain numbers, so that torch.load(weights_only=True) reads it."""
    folder = os.path.join(t.cfg.checkpoint_dir, t.log.run_id)
    path = os.path.join(folder, f"step{step:06d}.pt")
    state = {
        "format": CHECKPOINT_FORMAT, "baseline": BASELINE, "script": os.path.basename(__file__),
        "run_id": t.log.run_id, "torch": str(torch.__version__), "config": dataclasses.asdict(t.cfg),
        "shape": {name: getattr(t.cfg, name) for name in SHAPE_FIELDS}, "model": t.model.state_dict(),
        "optimizers": [opt.state_dict() for opt in t.optimizers], "step": step, "train_ms": train_ms,
        "val_losses": dict(val_losses), "loader": {"file_index": t.loader.file_index, "pos": t.loader.pos},
        "rng": {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(t.ctx.device) if t.ctx.device.type == "cuda" else None},
        "history": list(t.log.training),
    }
    os.makedirs(folder, exist_ok=True)
    try:
        with open(path + ".tmp", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename names it the checkpoint
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as "unexpected pos"
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        free = shutil.disk_usage(folder).free
        cause = f"the disk is full ({free // 2**20} MiB free)" if free < 2**30 else getattr(e, "strerror", None) or e
        message = f"checkpoint {path} could not be written: {cause}; the earlier checkpoints are intact"
        raise Stopped(message, f"stopped: {message}\n=== end of run ===") from None
    done = sorted(f for f in os.listdir(folder) if re.fullmatch(r"step\d{6}\.pt", f))
    doomed = [os.path.join(folder, f) for f in (done[: -t.cfg.keep_checkpoints] if t.cfg.keep_checkpoints else [])]
    # and the temporary files of killed writes: this run's, and those of the run it resumed from
    for other in {folder, os.path.dirname(t.cfg.resume) if t.cfg.resume else folder}:
        doomed += [os.path.join(other, f) for f in os.listdir(other) if f.endswith(".pt.tmp")]
    for doomed_path in doomed:
        os.remove(doomed_path)
        t.log(f"checkpoint deleted: {doomed_path}")
    return path

def load_checkpoint(path: str, cfg: Config) -> dict:
    """Read a checkpoint and refuse, before any training work, one that is unreadable, from the other
    script, from another model shape, past the last step, or from another configuration (unless
    --resume_changes); returns it with "changes" listing the configuration fields that differ."""
    if os.path.isdir(path):
        raise CheckpointError(f"--resume={path} is a folder; give a checkpoint file in it, such as "
                              f"{os.path.join(path, 'step000100.pt')}")
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
        raise CheckpointError(f"{path}: checkpoint format {ckpt['format']}, this script reads format "
                              f"{CHECKPOINT_FORMAT}")
    if ckpt["baseline"] != BASELINE:
        raise CheckpointError(f"{path}: checkpoint from {ckpt['script']}, this is {os.path.basename(__file__)}")
    differing = [f"{name}={ckpt['shape'].get(name)!r} in the checkpoint, {getattr(cfg, name)!r} here"
                 for name in SHAPE_FIELDS if ckpt["shape"].get(name) != getattr(cfg, name)]
    if differing:
        raise CheckpointError(f"{path}: checkpoint of another model shape: {'; '.join(differing)}")
    if ckpt["step"] > cfg.num_iterations:
        raise CheckpointError(f"{path}: checkpoint at step {ckpt['step']}, past num_iterations={cfg.num_iterations}")
    free = {name for name, (topic, _) in field_help().items() if topic in RESUME_FREE_TOPICS}
    ckpt["changes"] = [f"{name}: {ckpt['config'].get(name)!r} -> {value!r}"
                       for name, value in dataclasses.asdict(cfg).items()
                       if name not in free and ckpt["config"].get(name) != value]
    if ckpt["changes"] and not cfg.resume_changes:
        raise CheckpointError(f"{path}: this run's configuration differs from the checkpoint's "
                              f"({'; '.join(ckpt['changes'])}); pass --resume_changes=true if that is intended")
    if ckpt["step"] == cfg.num_iterations:
        raise NothingToDo(f"{path} is at step {ckpt['step']}, the run's last: nothing to do; to train on, give "
                          f"more steps (--num_iterations=N --resume_changes=true)")
    return ckpt

class NothingToDo(Exception):
    """Resuming a checkpoint of the run's last step."""

def restore_checkpoint(ckpt: dict, t: "Training") -> None:
    """Load the model, optimizer and RNG states (preflight set the data position)."""
    t.model.load_state_dict(ckpt["model"])
    for opt, state in zip(t.optimizers, ckpt["optimizers"], strict=True):
        opt.load_state_dict(state)
    torch.set_rng_state(ckpt["rng"]["cpu"])
    if t.ctx.device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], t.ctx.device)

# -----------------------------------------------------------------------------
# Training

@dataclass
class Training:
    """What the training loop works on."""

    cfg: Config
    ctx: Dist
    log: RunLog
    model: GPT
    train_model: nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizers: list[torch.optim.Optimizer]
    set_schedule: Callable[[int], None]
    loader: TrainLoader
    signum: int = 0  # SIGINT or SIGTERM, once received: stop at the next step boundary

class Stopped(Exception):
    """The run stops early: `log_line` ends its log, the message goes to stderr, and the process exits with
    `exit_code`."""

    def __init__(self, message: str, log_line: str, exit_code: int = 1):
        super().__init__(message)
        self.log_line, self.exit_code = log_line, exit_code

def preflight(cfg: Config, ctx: Dist, ops: dict[str, Callable]) -> tuple[TrainLoader, dict | None]:
    """Every refusal that needs the world size, the files or the device, before a log file exists: the same on
    every process, but for the output folders, which rank 0 checks for all. Returns the loader and the
    checkpoint to resume (or None)."""
    outputs = [("log_dir", cfg.log_dir)] + [("checkpoint_dir", cfg.checkpoint_dir)] * (cfg.checkpoint_every > 0)
    errors = [f"--{name}={folder!r}: {problem}" for name, folder in outputs
              if ctx.master and (problem := folder_problem(folder))]
    if ctx.world_size > 1:
        refused = torch.tensor(len(errors), device=ctx.device)
        dist.all_reduce(refused)
        errors = errors or ["an output folder was refused on rank 0"] * bool(refused.item())
    if errors := errors + world_size_errors(cfg, ctx.world_size):
        raise ConfigError("\n".join(errors))
    loader = TrainLoader(cfg.train_files, cfg.batch_tokens, cfg.seq_len, ctx.rank, ctx.world_size, ctx.device)
    if errors := data_errors(cfg, loader, ctx):
        raise DataError("\n".join(errors))
    checkpoint = load_checkpoint(cfg.resume, cfg) if cfg.resume else None
    if checkpoint is not None:
        loader.seek(**checkpoint["loader"])
    if errors := fast_ops_errors(cfg, ops, ctx.device):
        raise ConfigError("\n".join(errors))
    return loader, checkpoint

def compile_model(cfg: Config, model: GPT) -> None:
    """torch.compile the model's body, and the plain loss (the fast loss compiles its own chunks: compiled
    whole, its chunk loop would keep every chunk's logits alive together)."""
    torch._functorch.config.activation_memory_budget = cfg.activation_budget
    model.body = torch.compile(model.body, dynamic=False)
    if model.ops.output_loss is output_loss:
        model.ops = model.ops._replace(output_loss=torch.compile(output_loss, dynamic=False))

def train_step(t: Training, step: int, batches: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor | None]:
    """One optimizer step over the micro-batches. Returns the mean loss and, with several processes, how many
    of them were asked to stop, as tensors read a step later (no sync)."""
    loss_sum = torch.zeros((), device=t.ctx.device)
    for i, (inputs, targets) in enumerate(batches):
        syncing = t.ctx.world_size == 1 or i == len(batches) - 1
        with nullcontext() if syncing else t.train_model.no_sync():
            loss = t.train_model(inputs, targets)
            (loss / len(batches)).backward()
        loss_sum += loss.detach().float()
    t.set_schedule(step)
    for opt in t.optimizers:
        opt.step()
    t.model.zero_grad(set_to_none=True)
    if t.ctx.world_size == 1:
        return loss_sum / len(batches), None
    stats = torch.stack([loss_sum / len(batches), torch.full_like(loss_sum, t.signum > 0)])
    dist.all_reduce(stats)  # the stop votes travel with the loss: every process stops at the same step
    return stats[0] / t.ctx.world_size, stats[1]

def warm_up(t: Training) -> None:
    """Compile and warm up on random tokens, then restore the initial state: warm-up never trains."""
    initial_model = {k: v.clone() for k, v in t.model.state_dict().items()}
    initial_opts = [opt.state_dict() for opt in t.optimizers]
    rng = torch.Generator().manual_seed(t.cfg.seed + 1)
    for step in range(t.cfg.warmup_compile_steps):
        random = torch.randint(0, t.cfg.vocab_size, (t.loader.accum_steps, t.cfg.seq_len + 1), generator=rng)
        random = random.to(t.ctx.device)
        train_step(t, step, [(row[:-1], row[1:]) for row in random])
        with torch.no_grad():
            t.train_model(random[0, :-1], random[0, 1:])
    t.model.load_state_dict(initial_model)
    for opt, state in zip(t.optimizers, initial_opts):
        opt.load_state_dict(state)
    if t.ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(t.ctx.device)

def evaluate(t: Training) -> float:
    total, count = torch.zeros((), device=t.ctx.device, dtype=torch.float64), 0
    cfg, ctx = t.cfg, t.ctx
    with torch.no_grad():
        for inputs, targets in validation_batches(cfg.val_files, cfg.val_tokens, cfg.seq_len, ctx.rank,
                                                  ctx.world_size, ctx.device):
            total += t.train_model(inputs, targets).double()
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

class StepLines:
    """A step's line is written when the next step has been queued, so that reading its loss never waits for
    queued GPU work. Stops the run on a non-finite loss; notes when any process was asked to stop."""

    def __init__(self, t: Training):
        self.t, self.pending, self.losses, self.stop = t, None, [], False

    def add(self, step: int, stats: tuple[Tensor, Tensor | None], train_ms: float) -> None:
        self.flush()
        self.pending = (step, stats, train_ms)

    def flush(self) -> None:
        if self.pending is None:
            return
        (step, (loss, votes), train_ms), self.pending = self.pending, None
        value, cfg = loss.item(), self.t.cfg
        self.stop = self.stop or (votes.item() > 0 if votes is not None else self.t.signum > 0)
        lr_mult = lr_multiplier(step - 1, cfg)
        self.t.log(f"step:{step}/{cfg.num_iterations} train_loss:{value:.4f} lr_mult:{lr_mult:.4f} "
                   f"train_time:{train_ms:.0f}ms step_avg:{train_ms / step:.2f}ms",
                   record=dict(step=step, train_loss=value, lr_mult=lr_mult, train_time_ms=train_ms,
                               tokens=step * cfg.batch_tokens))
        if not math.isfinite(value):
            raise Stopped(f"training loss became {value} at step {step}; the run diverged (lower the learning rates?)",
                          f"stopped: loss is {value} at step {step}\n=== end of run ===")
        self.losses.append(value)

def train(t: Training, checkpoint: dict | None) -> dict:
    """Validation every val_loss_every steps and at the end, checkpoints every checkpoint_every steps and at the
    end, and a stop at the next step boundary when asked (SIGINT, SIGTERM). Returns the losses."""
    cfg = t.cfg
    start, val_losses = (checkpoint["step"], dict(checkpoint["val_losses"])) if checkpoint else (0, {})
    clock, lines = Clock(t.ctx.device, checkpoint["train_ms"] if checkpoint else 0.0), StepLines(t)
    clock.start()
    for step in range(start, cfg.num_iterations + 1):
        last = step == cfg.num_iterations
        validate = last or (cfg.val_loss_every > 0 and step % cfg.val_loss_every == 0)
        save = cfg.checkpoint_every > 0 and step > start and (last or step % cfg.checkpoint_every == 0)
        if validate or save or lines.stop:
            train_ms = clock.pause()
            lines.flush()
            if lines.stop:
                stop(t, step, train_ms, val_losses)
            if step not in val_losses and validate:  # a resumed run's first step was validated before its checkpoint
                val_losses[step] = evaluate(t)
                record = dict(step=step, val_loss=val_losses[step], train_time_ms=train_ms,
                              tokens=step * cfg.batch_tokens)
                t.log(f"step:{step}/{cfg.num_iterations} val_loss:{val_losses[step]:.4f} train_time:{train_ms:.0f}ms "
                      f"step_avg:{train_ms / max(step, 1):.2f}ms", record=record)
            if save and t.ctx.master:
                t.log(f"checkpoint: {save_checkpoint(t, step, train_ms, val_losses)}")
            if save and t.ctx.world_size > 1:
                dist.barrier()  # every rank moves on only once the file is written
            clock.start()
        if last:
            break
        stats = train_step(t, step, t.loader.next_step())
        lines.add(step + 1, stats, clock.ms())
    if t.ctx.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(t.ctx.device) // 2**20
        reserved = torch.cuda.max_memory_reserved(t.ctx.device) // 2**20
        t.log(f"peak memory allocated: {peak} MiB reserved: {reserved} MiB")
    t.log("=== end of run ===")
    return {"val_losses": val_losses, "train_losses": lines.losses, "train_ms": clock.done_ms, "model": t.model,
            "log_path": t.log.path if t.log.active else None}

def stop(t: Training, step: int, train_ms: float, val_losses: dict[int, float]) -> None:
    """Asked to stop at this step boundary: save a checkpoint when checkpoints are on, then end the run."""
    path = None
    if t.cfg.checkpoint_every > 0 and t.ctx.master:
        path = save_checkpoint(t, step, train_ms, val_losses)
        t.log(f"checkpoint: {path}")
    if t.cfg.checkpoint_every > 0 and t.ctx.world_size > 1:
        dist.barrier()
    name = signal.Signals(t.signum).name if t.signum else "a signal to another process"
    how = f"resume with --resume={path}" if path else "no checkpoint written (checkpoints are off: --checkpoint_every)"
    message = f"interrupted at step {step} by {name}; {how}"
    raise Stopped(message, message, 128 + (t.signum or signal.SIGTERM))

def run(cfg: Config, ctx: Dist, argv: list[str]) -> dict:
    ops, ops_line = select_ops(cfg, ctx.device)
    loader, checkpoint = preflight(cfg, ctx, ops)
    torch.manual_seed(cfg.seed)
    model = GPT(cfg, ops).to(device=ctx.device, dtype=getattr(torch, cfg.param_dtype))
    optimizers, set_schedule = build_optimizers(cfg, model, ops, ctx)
    train_model: nn.Module = model
    if ctx.world_size > 1:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)
    t = Training(cfg, ctx, RunLog(cfg, ctx), model, train_model, optimizers, set_schedule, loader)
    write_header(t, argv, ops_line, checkpoint)
    def ask_to_stop(signum: int, frame) -> None:
        t.signum = t.signum or signum

    handlers = {}
    if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
        handlers = {s: signal.signal(s, ask_to_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if cfg.compile and ctx.device.type == "cuda":
            compile_model(cfg, model)
        warm_up(t)
        if checkpoint is not None:
            restore_checkpoint(checkpoint, t)
        return train(t, checkpoint)
    except Stopped as e:
        t.log(e.log_line)
        raise
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        t.log.close()
        if t.log.active:
            print(f"log: {t.log.path}", flush=True)

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
    says = int(os.environ.get("RANK", 0)) == 0  # every process stops alike; one says why
    try:
        main()
    except (ConfigError, DataError, CheckpointError) as e:
        if says:
            print("\n".join(f"error: {line}" for line in str(e).splitlines()), file=sys.stderr)
        sys.exit(2)
    except NothingToDo as e:
        if says:
            print(e)
    except Stopped as e:
        if says:
            print(f"error: {e}" if e.exit_code == 1 else e, file=sys.stderr)
        # launched by run.sh, whose torchrun would report an interrupted process as failed: run.sh exits 130/143
        sys.exit(0 if e.exit_code > 128 and "RUN_SH_LAUNCHED" in os.environ else e.exit_code)

"""SPEC.md 'Model', 'A: AdamW baseline' and 'M: Muon baseline' in executable form: the attention
mask, RoPE, the model's initialisation and forward math, Newton-Schulz, Muon, the optimizer groups
and the learning-rate and momentum schedules.

Every test loads the real train_gpt_{A,M}.py, draws fresh random inputs (the seed is drawn at
random and printed; set MODEL_OPTIM_SEED=<n> to replay a failure) and checks one SPEC property
against a reference written here from the SPEC text, never from the scripts' own helpers.
"""
import importlib.util
import math
import os
import secrets
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import gpu_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOT = 50256
TILE = 128  # flex-attention tile, SPEC: block mask over 128 x 128 tiles


def load(baseline: str):
    """The real script as module train_gpt_{A,M} (shared with any other test that loaded it)."""
    name = f"train_gpt_{baseline}"
    path = os.path.join(ROOT, f"{name}.py")
    module = sys.modules.get(name)
    if module is not None and os.path.abspath(getattr(module, "__file__", "")) == os.path.abspath(path):
        return module
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(params=["A", "M"])
def mod(request):
    return load(request.param)


@pytest.fixture
def M():
    return load("M")


@pytest.fixture(autouse=True)
def random_seed():
    """Fresh randomness each run, reproducible from the printed seed."""
    seed = int(os.environ.get("MODEL_OPTIM_SEED", secrets.randbits(31)))
    torch.manual_seed(seed)
    print(f"MODEL_OPTIM_SEED={seed}")
    return seed


def tiny_config(mod, **overrides):
    fields = dict(num_layers=2, model_dim=64, num_heads=2, param_dtype="float32", seq_len=1024)
    return mod.Config(**{**fields, **overrides})


def model_of(mod, cfg, fast_ops: bool = False):
    """The model with the plain ops, or with the ops fast_ops.py chooses for an H100 (kernels interpreted)."""
    return mod.GPT(cfg, gpu_ops(mod, cfg) if fast_ops else None)


def optimizers_of(mod, cfg, model, ops=None):
    """build_optimizers on one CPU process, with the plain ops unless `ops` are given."""
    cpu = torch.device("cpu")
    return mod.build_optimizers(cfg, model, ops or mod.select_ops(cfg, cpu)[0], mod.Dist(0, 0, 1, cpu))


# -----------------------------------------------------------------------------
# References written from the SPEC text


def reference_doc_ids(tokens, eot=EOT):
    """Document id = running count of token 50256 (which starts each document), python loop."""
    ids, count = [], 0
    for t in tokens.tolist():
        count += t == eot
        ids.append(count)
    return torch.tensor(ids)


def reference_mask(doc_ids, window):
    """allowed[q, kv]: causal AND same document AND q - kv < window, pair by pair."""
    T = doc_ids.numel()
    q = torch.arange(T)[:, None]
    kv = torch.arange(T)[None, :]
    return (kv <= q) & (doc_ids[:, None] == doc_ids[None, :]) & (q - kv < window)


def reference_attention(q_BTHD, k_BTHD, v_BTHD, allowed_TT, scale):
    """softmax(q k^T * scale + mask) v in float64; (B, T, H, D) layout in and out."""
    q, k, v = (t.double().transpose(1, 2) for t in (q_BTHD, k_BTHD, v_BTHD))
    scores = (q @ k.transpose(-2, -1)) * scale
    scores = scores.masked_fill(~allowed_TT, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def reference_rope(x_BTHD, base):
    """Truncated RoPE in float64: D/4 frequencies (1/base)^linspace(0,1,D/4), then D/4 zeros;
    y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos over the two halves of the head vector."""
    T, D = x_BTHD.size(1), x_BTHD.size(3)
    freqs = torch.cat(
        [(1.0 / base) ** torch.linspace(0, 1, D // 4, dtype=torch.float64), torch.zeros(D // 4, dtype=torch.float64)]
    )
    angle = torch.arange(T, dtype=torch.float64)[:, None] * freqs[None, :]
    cos, sin = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]
    x1, x2 = x_BTHD.double()[..., : D // 2], x_BTHD.double()[..., D // 2 :]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)


def rms(x, eps):
    return x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps)


def random_tokens(T, layout):
    """Token sequences of several documents (EOT at the start of each)."""
    tokens = torch.randint(0, EOT, (T,))
    if layout == "mixed":
        # documents of mixed lengths: single tokens, short, medium and long (several tiles);
        # the sequence may start mid-document (doc id 0); one boundary right at a tile edge
        pos = int(torch.randint(0, 40, ()).item())
        while pos < T:
            tokens[pos] = EOT
            kind = int(torch.randint(0, 4, ()).item())
            lo, hi = [(1, 2), (2, 30), (30, 200), (200, 600)][kind]
            pos += int(torch.randint(lo, hi, ()).item())
        if T // TILE > 1:
            tokens[TILE * int(torch.randint(1, T // TILE, ()).item())] = EOT
    elif layout == "eot_dense":
        tokens[torch.rand(T) < 0.3] = EOT
    elif layout == "single_doc":
        tokens[0] = EOT
    elif layout == "no_eot":
        pass
    else:
        raise ValueError(layout)
    return tokens


LAYOUTS = ["mixed", "mixed", "eot_dense", "single_doc", "no_eot"]


# -----------------------------------------------------------------------------
# 1. Attention mask


def test_document_ids_are_running_count_of_eot(mod):
    for layout in LAYOUTS:
        tokens = random_tokens(int(torch.randint(1, 700, ()).item()) + TILE, layout)
        assert torch.equal(mod.document_ids(tokens, EOT).long(), reference_doc_ids(tokens))


@pytest.fixture(scope="module")
def compiled_flex():
    """torch.compile'd flex_attention: unlike eager flex_attention on CPU, it honours the BlockMask's
    tile lists (skipped tiles are skipped, full tiles ignore mask_mod), so BlockMask errors show up."""
    import torch._dynamo
    import torch.nn.attention.flex_attention as fa

    with pytest.MonkeyPatch.context() as mp:
        # one compilation per (script, window): keep dynamo from falling back to eager
        mp.setattr(torch._dynamo.config, "recompile_limit", 64)
        yield fa, torch.compile(fa.flex_attention, dynamic=False)


def run_flex_attention(mod, compiled_flex, q, k, v, docs, window, scale):
    """The script's attention with a BlockMask, flex_attention replaced by the compiled one (wherever the
    script looks it up); fails if the script did not go through it."""
    fa, compiled = compiled_flex
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return compiled(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fa, "flex_attention", counted)
        if hasattr(mod, "flex_attention"):
            mp.setattr(mod, "flex_attention", counted)
        y = mod.attention(q, k, v, mod.block_mask(docs, window), scale)
    assert len(calls) == 1, "attention must call flex_attention for a BlockMask (patched here with the compiled one)"
    return y


@pytest.mark.parametrize("window", [300, 2048])  # smaller than, larger than the 1024-token sequence
def test_flex_attention_compiled_matches_dense_reference(mod, compiled_flex, window):
    T, H, D, scale = 1024, 2, 64, 0.12
    for layout in LAYOUTS:
        tokens = random_tokens(T, layout)
        docs = reference_doc_ids(tokens)
        q, k, v = (torch.randn(1, T, H, D) for _ in range(3))
        y = run_flex_attention(mod, compiled_flex, q, k, v, docs, window, scale)
        assert y.shape == (1, T, H, D)
        expected = reference_attention(q, k, v, reference_mask(docs, window), scale)
        err = (y.double() - expected).abs().max().item()
        assert err < 1e-4, f"layout {layout}, window {window}: max abs error {err}"


def test_compiled_flex_sees_wrong_tile_lists(compiled_flex):
    """Canary for the test above: with every causal tile wrongly listed as full (mask_mod ignored),
    compiled flex-attention must give a visibly different result on a many-document sequence."""
    from torch.nn.attention.flex_attention import BlockMask

    A = load("A")
    T, H, D, window, scale = 1024, 2, 64, 300, 0.12
    tokens = random_tokens(T, "eot_dense")
    docs = reference_doc_ids(tokens)
    nb = T // TILE
    full = torch.tril(torch.ones(nb, nb, dtype=torch.bool))
    order = torch.argsort(full.int(), dim=-1, descending=True, stable=True).int()[None, None]
    wrong = BlockMask.from_kv_blocks(
        torch.zeros(1, 1, nb, dtype=torch.int32), order.clone(), full.sum(-1, dtype=torch.int32)[None, None], order,
        BLOCK_SIZE=TILE, mask_mod=A.make_mask_mod(docs, window),
    )
    _, compiled = compiled_flex
    q, k, v = (torch.randn(1, H, T, D) for _ in range(3))
    y = compiled(q, k, v, block_mask=wrong, scale=scale).transpose(1, 2)
    expected = reference_attention(*(t.transpose(1, 2) for t in (q, k, v)), reference_mask(docs, window), scale)
    assert (y.double() - expected).abs().max().item() > 0.1


def listed_tiles(num_blocks, indices, nb):
    """counts[q_tile, kv_tile]: how often the BlockMask lists the kv tile for the q tile."""
    num = num_blocks.reshape(-1, nb)[0].long()
    idx = indices.reshape(-1, nb, indices.size(-1))[0].long()
    valid = torch.arange(idx.size(-1))[None, :] < num[:, None]
    return torch.zeros(nb, nb, dtype=torch.int64).scatter_add_(1, idx, valid.long())


@pytest.mark.parametrize("T", [128, 384, 1024, 2048])
def test_block_mask_tile_classification(mod, T):
    """From the BlockMask's lists: a tile is full iff all its 128 x 128 pairs are allowed, listed
    (partial or full) iff any pair is allowed, never both, never twice."""
    windows = [1, 64, 127, 128, 129, 256, 300, 1024, T, T + 500, int(torch.randint(2, 2 * T, ()).item())]
    nb = T // TILE
    for window in windows:
        for layout in LAYOUTS:
            tokens = random_tokens(T, layout)
            docs = reference_doc_ids(tokens)
            bm = mod.block_mask(docs, window)
            assert tuple(bm.BLOCK_SIZE) == (TILE, TILE)
            tiles = reference_mask(docs, window).view(nb, TILE, nb, TILE).permute(0, 2, 1, 3).flatten(2)
            all_allowed, any_allowed = tiles.all(-1), tiles.any(-1)
            partial = listed_tiles(bm.kv_num_blocks, bm.kv_indices, nb)
            full = listed_tiles(bm.full_kv_num_blocks, bm.full_kv_indices, nb)
            where = f"layout {layout}, T {T}, window {window}"
            assert partial.max() <= 1 and full.max() <= 1, f"{where}: a tile listed twice"
            assert not (partial.bool() & full.bool()).any(), f"{where}: a tile both partial and full"
            assert torch.equal(full.bool(), all_allowed), f"{where}: full tiles != tiles with all pairs allowed"
            assert torch.equal(
                (partial + full).bool(), any_allowed
            ), f"{where}: listed tiles != tiles with any pair allowed"


def test_block_mask_mask_mod_is_the_spec_mask(mod):
    """The mask_mod that partial tiles evaluate is causal AND same document AND q - kv < window."""
    T = 512
    for window in (1, 100, 128, 700):
        tokens = random_tokens(T, "mixed")
        docs = reference_doc_ids(tokens)
        bm = mod.block_mask(docs, window)
        idx = torch.arange(T)
        got = bm.mask_mod(torch.tensor(0), torch.tensor(0), idx[:, None], idx[None, :])
        assert torch.equal(got.expand(T, T), reference_mask(docs, window))


def test_dense_attention_matches_reference(mod):
    """The CPU training path (SDPA with a dense mask) computes the same masked attention."""
    for T in (128, 200, 512):
        for window in (1, 37, 128, 300, 4096):
            tokens = random_tokens(T, LAYOUTS[int(torch.randint(0, len(LAYOUTS), ()).item())])
            docs = reference_doc_ids(tokens)
            B, H, D = int(torch.randint(1, 3, ()).item()), 3, 16
            q, k, v = (torch.randn(B, T, H, D) for _ in range(3))
            scale = float(torch.empty(()).uniform_(0.05, 0.5))
            y = mod.attention(q, k, v, mod.dense_mask(docs, window), scale)
            expected = reference_attention(q, k, v, reference_mask(docs, window), scale)
            assert y.shape == (B, T, H, D)
            assert (y.double() - expected).abs().max().item() < 1e-5, f"T {T}, window {window}"


# -----------------------------------------------------------------------------
# 2. RoPE


def rope(mod, x_BTHD, base):
    """The script's RoPE: its tables for x's length and head dim in x's dtype (as the model's buffers), then rotary."""
    cos, sin = mod.rope_tables(x_BTHD.size(1), x_BTHD.size(3), base)
    return mod.rotary(x_BTHD, cos.to(x_BTHD.dtype), sin.to(x_BTHD.dtype))


@pytest.mark.parametrize("D", [4, 32, 128])
def test_rope_tables_are_float32_cos_and_sin_of_the_truncated_angles(mod, D):
    """cos(t f_i), sin(t f_i) for f = (1/base)^linspace(0, 1, D/4) followed by D/4 zeros, in float32
    (to float32 rounding of the angle t f_i: a few ulps of t)."""
    base, T = float(torch.empty(()).uniform_(10, 5000)), int(torch.randint(1, 3000, ()).item())
    cos, sin = mod.rope_tables(T, D, base)
    assert cos.shape == sin.shape == (1, T, 1, D // 2) and cos.dtype == sin.dtype == torch.float32
    freqs = torch.cat(
        [(1.0 / base) ** torch.linspace(0, 1, D // 4, dtype=torch.float64), torch.zeros(D // 4, dtype=torch.float64)]
    )
    angle = torch.arange(T, dtype=torch.float64)[:, None] * freqs
    tol = 8 * T * torch.finfo(torch.float32).eps
    assert (cos[0, :, 0].double() - angle.cos()).abs().max() < tol and (
        sin[0, :, 0].double() - angle.sin()
    ).abs().max() < tol
    assert torch.equal(cos[0, :, 0, D // 4 :], torch.ones(T, D // 4)) and torch.equal(
        sin[0, :, 0, D // 4 :], torch.zeros(T, D // 4)
    )


def test_model_rounds_rope_tables_to_bfloat16_with_its_parameters(mod):
    """SPEC: the reference keeps the tables as buffers, and casting the model to bfloat16 rounds them."""
    cfg = tiny_config(mod, seq_len=256)
    model = mod.GPT(cfg)
    cos, sin = mod.rope_tables(256, cfg.model_dim // cfg.num_heads, cfg.rope_base)
    assert torch.equal(model.rope_cos, cos) and torch.equal(model.rope_sin, sin)
    model = model.bfloat16()
    assert model.rope_cos.dtype == torch.bfloat16 and torch.equal(model.rope_cos, cos.bfloat16())
    assert torch.equal(model.rope_sin, sin.bfloat16())
    assert "rope_cos" not in model.state_dict()


@pytest.mark.parametrize("fast_ops", [False, True])
def test_bfloat16_model_rotates_with_the_rounded_tables(mod, fast_ops):
    """The forward hands q/k's rotation the model's bfloat16 tables, not float32 ones made on the way."""
    cfg = tiny_config(mod, seq_len=256, param_dtype="bfloat16")
    model = model_of(mod, cfg, fast_ops).bfloat16()
    seen, real = [], model.ops.qk_norm_rope
    model.ops = model.ops._replace(qk_norm_rope=lambda x, cos, sin: seen.append((cos, sin)) or real(x, cos, sin))
    with torch.no_grad():
        model(random_tokens(64, "mixed"))
    cos, sin = mod.rope_tables(64, cfg.model_dim // cfg.num_heads, cfg.rope_base)
    assert len(seen) == cfg.num_layers  # one call a layer: queries and keys together
    for got_cos, got_sin in seen:
        assert got_cos.dtype == got_sin.dtype == torch.bfloat16
        assert torch.equal(got_cos, cos.bfloat16()) and torch.equal(got_sin, sin.bfloat16())


@pytest.mark.parametrize("D", [16, 128])
def test_rope_matches_formula(mod, D):
    """y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos with the SPEC's truncated frequencies, base 1024."""
    x = torch.randn(2, 300, 3, D)
    y = rope(mod, x, 1024.0)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert torch.allclose(y.double(), reference_rope(x, 1024.0), atol=2e-4, rtol=1e-4)


def test_rope_zero_frequency_quarter_is_left_unrotated(mod):
    D, T = 128, 200
    x = torch.randn(1, T, 2, D)
    y = rope(mod, x, 1024.0)
    q = D // 4
    still = list(range(q, 2 * q)) + list(range(3 * q, 4 * q))  # pairs (i, i + D/2), i in the zero quarter
    moving = list(range(0, q)) + list(range(2 * q, 3 * q))
    assert torch.equal(y[..., still], x[..., still])
    # every rotated pair i really turns, at positions where its angle t * f_i is far from 0 mod 2 pi
    freqs = (1.0 / 1024) ** torch.linspace(0, 1, q, dtype=torch.float64)
    t = torch.arange(T, dtype=torch.float64)[:, None]
    turning = (torch.sin(t * freqs / 2).abs() > 0.05)[None, :, None, :].expand(1, T, 2, q)
    moved = (y[..., moving] - x[..., moving]).abs()
    moved = torch.maximum(moved[..., :q], moved[..., q:])  # a rotated pair moves in at least one coordinate
    assert (moved[turning] > 0).all()
    assert turning.any(1).all()


def test_rope_preserves_head_vector_norm(mod):
    x = torch.randn(2, 513, 3, 64) * torch.rand(2, 513, 3, 1) * 10
    y = rope(mod, x, 1024.0)
    assert torch.allclose(y.double().norm(dim=-1), x.double().norm(dim=-1), rtol=1e-5, atol=1e-6)


def test_rope_dot_product_depends_only_on_relative_position(mod):
    D, T = 64, 1024
    for _ in range(10):
        i, j = torch.randint(0, T // 2, (2,)).tolist()
        d = int(torch.randint(0, T // 2, ()).item())
        qv, kv = F.normalize(torch.randn(D), dim=0), F.normalize(torch.randn(D), dim=0)
        x = torch.zeros(1, T, 1, D)
        x[0, i, 0], x[0, i + d, 0] = qv, kv
        y1 = rope(mod, x, 1024.0)
        x = torch.zeros(1, T, 1, D)
        x[0, j, 0], x[0, j + d, 0] = qv, kv
        y2 = rope(mod, x, 1024.0)
        dot1 = (y1[0, i, 0].double() @ y1[0, i + d, 0].double()).item()
        dot2 = (y2[0, j, 0].double() @ y2[0, j + d, 0].double()).item()
        assert dot1 == pytest.approx(dot2, abs=2e-5), (i, j, d)


def test_rope_computes_in_float32_for_bfloat16_input(mod):
    """bfloat16 input and tables (SPEC): the products and sums are float32, so the result is the
    exact rotation by the rounded tables up to the final bfloat16 rounding (half an ulp: at most 2^-8 of
    the value; float32 adds under 1e-6)."""
    x = torch.randn(1, 4096, 2, 64).bfloat16()
    y = rope(mod, x, 1024.0)
    assert y.dtype == torch.bfloat16
    cos, sin = (t.bfloat16().double() for t in mod.rope_tables(4096, 64, 1024.0))
    x1, x2 = x.double().chunk(2, dim=-1)
    exact = torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)
    assert ((y.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()


# -----------------------------------------------------------------------------
# Model: shapes, initialisation, forward math


def test_model_shapes_and_no_extra_parameters(mod):
    cfg = tiny_config(mod)
    model = mod.GPT(cfg)
    assert mod.padded_vocab(50257) == 50304
    assert mod.padded_vocab(50304) == 50304 and mod.padded_vocab(50305) == 50432
    assert model.embed.weight.shape == (50304, 64)
    assert model.lm_head.weight.shape == (50304, 64)
    assert len(model.blocks) == 2
    for block in model.blocks:
        assert block.attn.qkv_w.shape == (3, 64, 64)
        assert block.attn.proj.weight.shape == (64, 64)
        assert block.mlp.fc.weight.shape == (256, 64)
        assert block.mlp.proj.weight.shape == (64, 256)
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Linear)), "no biases anywhere"
    assert all(p.ndim >= 2 for p in model.parameters()), "RMSNorm has no weight, no biases: no 1-D parameter"
    per_block = 3 * 64 * 64 + 64 * 64 + 2 * 256 * 64
    embeds = 1 if cfg.tied_embed else 2
    assert sum(p.numel() for p in model.parameters()) == 2 * per_block + embeds * 50304 * 64


def test_embedding_tying_and_init(mod):
    dim = 64
    model = mod.GPT(tiny_config(mod))
    if mod.BASELINE == "A":
        assert model.embed.weight is model.lm_head.weight
        w = model.lm_head.weight.detach()
        bound = 1 / math.sqrt(dim)  # the output Linear's default init: uniform(-1/sqrt(dim), 1/sqrt(dim))
        assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.01)
    else:
        assert model.embed.weight is not model.lm_head.weight
        assert torch.count_nonzero(model.lm_head.weight) == 0
        e = model.embed.weight.detach()
        assert e.std().item() == pytest.approx(1.0, abs=0.01)
        assert abs(e.mean().item()) < 0.01


def test_block_init(mod):
    dim = 64
    model = mod.GPT(tiny_config(mod))
    b = math.sqrt(3) * 0.5 / math.sqrt(dim)
    for block in model.blocks:
        assert torch.count_nonzero(block.attn.proj.weight) == 0
        assert torch.count_nonzero(block.mlp.proj.weight) == 0
        w = block.attn.qkv_w.detach()
        assert w.abs().max() <= b and w.abs().max() > 0.99 * b
        assert w.std().item() == pytest.approx(b / math.sqrt(3), rel=0.03)
        fc = block.mlp.fc.weight.detach()  # PyTorch default Linear init
        assert fc.abs().max() <= 1 / math.sqrt(dim) and fc.abs().max() > 0.99 / math.sqrt(dim)


def reference_attention_module(attn, x_BTC, allowed, eps):
    """SPEC attention in float64: q, k, v = x W[0]^T, x W[1]^T, x W[2]^T split into heads; q and k
    RMS-normalised over the head dim, then rotated (base 1024); scale 0.12; output projection."""
    B, T, C = x_BTC.shape
    H = attn.num_heads
    D = C // H
    W = attn.qkv_w.detach().double()
    x = x_BTC.double()
    q, k, v = ((x @ W[i].T).view(B, T, H, D) for i in range(3))
    q, k = reference_rope(rms(q, eps), 1024.0), reference_rope(rms(k, eps), 1024.0)
    y = reference_attention(q, k, v, allowed, 0.12).reshape(B, T, C)
    return y @ attn.proj.weight.detach().double().T


def test_attention_module_matches_spec_math(mod):
    window = int(torch.randint(8, 300, ()).item())
    cfg = tiny_config(mod, attn_window=window)
    attn = mod.GPT(cfg).blocks[0].attn
    with torch.no_grad():  # q, k far from unit RMS, so that their normalisation matters
        attn.qkv_w.normal_(0, float(torch.empty(()).uniform_(0.3, 1.0)))
        attn.proj.weight.normal_(0, 1 / 8)
    tokens = random_tokens(256, "mixed")
    docs = reference_doc_ids(tokens)
    x = torch.randn(1, 256, 64)
    y = attn(x, mod.dense_mask(docs, window), mod.rope_tables(256, 32, 1024.0), mod.plain_ops())
    expected = reference_attention_module(attn, x, reference_mask(docs, window), torch.finfo(torch.float32).eps)
    assert y.shape == x.shape
    assert (y.double() - expected).abs().max().item() < 1e-4


def relu_squared(h):
    return F.relu(h).square()


def reference_loss(model, inputs, targets, cfg, softcap, params=None, activation=relu_squared):
    """The SPEC forward, in float64, from the model's parameters (or from `params`, float64 tensors
    by the model's parameter names, to differentiate through); `activation` is the MLP's."""
    dim, H = cfg.model_dim, cfg.num_heads
    D = dim // H
    eps = torch.finfo(torch.float32).eps
    T = inputs.numel()
    allowed = reference_mask(reference_doc_ids(inputs, cfg.eot_token), cfg.attn_window)
    names = {id(p): name for name, p in model.named_parameters()}
    W = (lambda p: params[names[id(p)]]) if params is not None else (lambda p: p.detach().double())  # noqa: E731
    x = rms(W(model.embed.weight)[inputs], eps)
    for block in model.blocks:
        h = rms(x, eps)
        qkv = W(block.attn.qkv_w)
        q, k, v = ((h @ qkv[i].T).view(1, T, H, D) for i in range(3))
        q, k = reference_rope(rms(q, eps), 1024.0), reference_rope(rms(k, eps), 1024.0)
        y = reference_attention(q, k, v, allowed, 0.12).reshape(T, dim)
        x = x + y @ W(block.attn.proj.weight).T
        h = rms(x, eps)
        x = x + activation(h @ W(block.mlp.fc.weight).T) @ W(block.mlp.proj.weight).T
    logits = rms(x, eps) @ W(model.lm_head.weight).T
    if softcap:
        logits = 30 * torch.sigmoid(logits / (7.5 * math.sqrt(dim)))
    return F.cross_entropy(logits, targets)


def spec_case(mod, fast_ops: bool, **overrides):
    """A config, a randomised model and its inputs and targets: 256 tokens and GPT-2's vocabulary with the plain
    ops; with the fast ones, whose kernels run under Triton's interpreter (0.1 s per 50,304-logit row of the loss
    kernel), 64 tokens of a 512-token vocabulary."""
    cfg = tiny_config(mod, **(dict(vocab_size=512, eot_token=511) if fast_ops else {}), **overrides)
    T = 64 if fast_ops else 256
    tokens = random_tokens(T + 1, "mixed")
    inputs = torch.where(tokens == EOT, cfg.eot_token, tokens % cfg.eot_token)[:-1]
    return cfg, randomize(model_of(mod, cfg, fast_ops)), inputs, torch.randint(0, cfg.vocab_size, (T,))


def randomize(model):
    """Random weights everywhere (the zero-initialised ones too), q and k far from unit RMS."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 1.0 if "embed" in name or "lm_head" in name else 1 / math.sqrt(p.size(-1))
            p.normal_(0, 0.5 if "qkv" in name else std)
    return model


@pytest.mark.parametrize("fast_ops", [False, True])
def test_forward_loss_matches_spec_math(mod, fast_ops):
    """embed -> rmsnorm -> blocks (pre-norm attention with RMS-normed, rotated q and k, scale 0.12,
    document/causal/window mask; ReLU^2 MLP) -> rmsnorm -> output layer -> (M: 30*sigmoid(z/(7.5
    sqrt(dim)))) -> mean cross-entropy; A has plain logits. With the plain ops and with the fast ones."""
    cfg, model, inputs, targets = spec_case(mod, fast_ops, attn_window=int(torch.randint(8, 200, ()).item()))
    loss = model(inputs, targets)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    expected = reference_loss(model, inputs, targets, cfg, softcap=mod.BASELINE == "M").item()
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("fast_ops", [False, True])
def test_parameter_gradients_match_spec_math(mod, fast_ops):
    """The backward of the whole model gives, in float32, float64 autograd's gradients through the
    SPEC forward, for every parameter: with the plain ops (autograd), and with the fast ops (chunked
    output layer and loss, norms and ReLU^2 that keep their outputs rather than inputs)."""
    cfg, model, inputs, targets = spec_case(mod, fast_ops, attn_window=int(torch.randint(8, 200, ()).item()),
                                            loss_chunk=int(torch.randint(16, 300, ()).item()))
    model(inputs, targets).backward()
    params = {name: p.detach().double().requires_grad_() for name, p in model.named_parameters()}
    reference_loss(model, inputs, targets, cfg, softcap=mod.BASELINE == "M", params=params).backward()
    for name, p in model.named_parameters():
        expected = params[name].grad
        assert expected.abs().max() > 0, name
        err = (p.grad.double() - expected).abs().max() / expected.abs().max()
        assert err < 1e-4, (name, err.item())


@pytest.mark.parametrize("fast_ops", [False, True])
def test_forward_without_targets_returns_float32_logits(mod, fast_ops):
    """GPT.forward(inputs) gives every position's float32 logits (soft-capped in M), the ones whose
    cross-entropy is the loss forward(inputs, targets) returns."""
    cfg, model, inputs, targets = spec_case(mod, fast_ops, param_dtype="bfloat16")
    model = model.bfloat16()
    with torch.no_grad():
        logits = model(inputs)
        loss = model(inputs, targets)
    assert logits.shape == (len(inputs), mod.padded_vocab(cfg.vocab_size)) and logits.dtype == torch.float32
    if mod.BASELINE == "M":
        assert 0 < logits.min() and logits.max() < 30
    assert F.cross_entropy(logits, targets).item() == pytest.approx(loss.item(), rel=1e-5)


def test_logits_and_loss_in_float32_for_bfloat16_model(mod):
    """A bfloat16 model (the SPEC's dtype) takes the output-layer product in bfloat16, then the
    soft-cap (M) and the loss in float32."""
    cfg = tiny_config(mod, param_dtype="bfloat16", loss_chunk=int(torch.randint(1, 200, ()).item()))
    model = mod.GPT(cfg).bfloat16()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 3.0)
    seen = []
    model.blocks[-1].register_forward_hook(lambda m, i, out: seen.append(out))
    tokens = random_tokens(129, "mixed")
    loss = model(tokens[:-1], tokens[1:])
    assert seen[0].dtype == torch.bfloat16 and loss.dtype == torch.float32
    logits = (F.rms_norm(seen[0][0], (cfg.model_dim,)) @ model.lm_head.weight.T).float()
    if mod.BASELINE == "M":
        logits = 30 * torch.sigmoid(logits / (7.5 * math.sqrt(cfg.model_dim)))
    assert loss.item() == pytest.approx(F.cross_entropy(logits.double(), tokens[1:]).item(), rel=1e-5)


# -----------------------------------------------------------------------------
# 3. Newton-Schulz (M)


def ns_shapes():
    n = int(torch.randint(16, 80, ()).item())
    return {"wide": (n, 3 * n), "tall": (4 * n, n), "batched_wide": (3, n, 2 * n), "batched_tall": (2, 3 * n, n)}


def random_square(*shape):
    """Square matrices with singular values spread over [0.05, 1] x a random scale. (Square Gaussian
    matrices have singular values near 0 that 5 steps cannot lift: that is NS, not a defect.)"""
    U = torch.linalg.qr(torch.randn(*shape, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(*shape, dtype=torch.float64))[0]
    s = torch.empty(*shape[:-1], dtype=torch.float64).uniform_(0.05, 1.0) * float(torch.empty(()).uniform_(0.1, 10))
    return ((U * s[..., None, :]) @ V.mT).float()


def test_newton_schulz_singular_values_near_one(M):
    """5 quintic steps put every singular value in about [0.68, 1.21] (empirical on many inputs);
    asserted band [0.6, 1.25]. Output bfloat16."""
    inputs = [torch.randn(*shape) * float(torch.empty(()).uniform_(0.01, 100)) for shape in ns_shapes().values()]
    n = int(torch.randint(16, 80, ()).item())
    inputs += [random_square(n, n), random_square(3, n, n)]
    for G in inputs:
        X = M.newton_schulz(G, 5)
        assert X.dtype == torch.bfloat16 and X.shape == G.shape
        s = torch.linalg.svdvals(X.double())
        assert s.min() >= 0.6 and s.max() <= 1.25, (tuple(G.shape), s.min().item(), s.max().item())


def test_newton_schulz_zero_steps_divides_by_frobenius_norm(M):
    for shape in ns_shapes().values():
        G = torch.randn(*shape) * float(torch.empty(()).uniform_(0.01, 100))
        X = M.newton_schulz(G, 0)
        g = G.bfloat16().double()
        expected = g / (g.norm(dim=(-2, -1), keepdim=True) + 1e-7)
        assert torch.allclose(X.double(), expected, rtol=2**-7, atol=1e-6)


def test_newton_schulz_one_step_is_the_quintic(M):
    """X <- a X + (b A + c A A) X with A = X X^T, (a, b, c) = (3.4445, -4.7750, 2.0315)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    for shape in ns_shapes().values():
        G = torch.randn(*shape)
        X = M.newton_schulz(G, 1).double()
        g = G.bfloat16().double()
        tall = g.size(-2) > g.size(-1)
        x = g.mT if tall else g
        x = x / x.norm(dim=(-2, -1), keepdim=True)
        A = x @ x.mT
        y = a * x + (b * A + c * A @ A) @ x
        y = y.mT if tall else y
        assert ((X - y).norm() / y.norm()).item() < 0.02, tuple(shape)


@pytest.mark.parametrize("steps", [1, 5])
def test_newton_schulz_maps_singular_values_by_the_quintic(M, steps):
    """NS keeps the singular vectors and maps each singular value s / ||G||_F through
    p(s) = 3.4445 s - 4.7750 s^3 + 2.0315 s^5, `steps` times. Low-rank inputs put normalised
    singular values near 1, where all three coefficients matter (p(1) = 0.701)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    # bfloat16 arithmetic, amplified by the quintic near its fixed points: over 2,000 draws of this test
    # (CPU, torch 2.13) the largest deviation was 0.0064 after 1 step and 0.093 after 5
    tol = {1: 0.015, 5: 0.15}[steps]
    for rank in (1, 1, 2, 3, 4):
        n = int(torch.randint(16, 80, ()).item())
        m = int(torch.randint(n, 3 * n, ()).item())
        U = torch.linalg.qr(torch.randn(m, rank, dtype=torch.float64))[0]
        V = torch.linalg.qr(torch.randn(n, rank, dtype=torch.float64))[0]
        s = torch.empty(rank, dtype=torch.float64).uniform_(0.2, 1.0)
        G = ((U * s) @ V.T).float() * float(torch.empty(()).uniform_(0.1, 10))
        X = M.newton_schulz(G, steps).double()
        if torch.rand(()) < 0.5:  # tall or wide
            X = M.newton_schulz(G.T.contiguous(), steps).double().T
        e = s / s.norm()
        for _ in range(steps):
            e = a * e + b * e**3 + c * e**5
        # on the input's singular subspace (bfloat16 noise outside it grows with the steps)
        got = torch.linalg.svdvals(U.T @ X @ V)
        assert (got - e.sort(descending=True).values).abs().max().item() < tol, (rank, got, e)


def test_newton_schulz_tall_is_transposed(M):
    """Tall matrices are iterated transposed: NS(G^T) is exactly NS(G)^T in bfloat16 (iterating the
    tall matrix itself gives the same math but other roundings, about 1e-2 apart)."""
    for shape in ns_shapes().values():
        G = torch.randn(*shape)
        assert torch.equal(M.newton_schulz(G.mT.contiguous(), 5), M.newton_schulz(G, 5).mT)


def test_newton_schulz_scale_invariant(M):
    """Normalised by the Frobenius norm first: scaling by a power of two changes nothing."""
    for shape in ns_shapes().values():
        G = torch.randn(*shape)
        c = 2.0 ** int(torch.randint(-12, 13, ()).item())
        assert torch.allclose(M.newton_schulz(G * c, 5).float(), M.newton_schulz(G, 5).float(), atol=1e-2, rtol=0)


# -----------------------------------------------------------------------------
# 4. Muon (world size 1)


def test_muon_orthogonalises_qkv_slices_separately(M):
    n = int(torch.randint(16, 64, ()).item())
    p = nn.Parameter(torch.randn(3, n, n))
    lr, m = float(torch.empty(()).uniform_(0.01, 0.1)), float(torch.empty(()).uniform_(0.8, 0.99))
    opt = M.Muon([p], lr=lr, momentum=m, ns_steps=5)
    g = torch.randn(3, n, n)
    before = p.detach().clone()
    p.grad = g.clone()
    opt.step()
    buf = torch.lerp(torch.zeros_like(g), g, 1 - m)
    update = torch.lerp(g, buf, m)
    expected = torch.stack([M.newton_schulz(update[i], 5).float() for i in range(3)])
    assert torch.allclose(before - p.detach(), lr * expected, atol=1e-6, rtol=1e-4)


def test_muon_update_scale_by_shape(M):
    """p -= lr * max(1, rows/cols)^0.5 * NS(update): a (4n, n) weight moves 2x, a (n, 4n) weight 1x."""
    n = int(torch.randint(8, 40, ()).item())
    shapes_scales = [((4 * n, n), 2.0), ((n, 4 * n), 1.0), ((n, n), 1.0), ((2 * n, n), math.sqrt(2))]
    params = [nn.Parameter(torch.randn(*s)) for s, _ in shapes_scales]
    lr, m = 0.05, 0.95
    opt = M.Muon(params, lr=lr, momentum=m, ns_steps=5)
    before = [p.detach().clone() for p in params]
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    for (shape, scale), p, b, g in zip(shapes_scales, params, before, grads):
        update = torch.lerp(g, torch.lerp(torch.zeros_like(g), g, 1 - m), m)
        expected = lr * scale * M.newton_schulz(update, 5).float()
        assert torch.allclose(b - p.detach(), expected, atol=1e-6, rtol=1e-4), shape


def test_muon_nesterov_momentum(M):
    """buf = lerp(buf, g, 1 - m); update = lerp(g, buf, m); the group's current momentum is used."""
    n = int(torch.randint(8, 48, ()).item())
    p = nn.Parameter(torch.randn(n, 2 * n))
    lr = 0.05
    opt = M.Muon([p], lr=lr, momentum=0.9, ns_steps=5)
    buf = torch.zeros_like(p)
    for step in range(3):
        m = float(torch.empty(()).uniform_(0.8, 0.97))
        for group in opt.param_groups:
            group["momentum"] = m
        g = torch.randn_like(p)
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        buf = torch.lerp(buf, g, 1 - m)
        update = torch.lerp(g, buf, m)
        assert torch.allclose(opt.state[p]["momentum_buffer"], buf, atol=1e-6, rtol=1e-5), step
        expected = lr * M.newton_schulz(update, 5).float()
        assert torch.allclose(before - p.detach(), expected, atol=1e-6, rtol=1e-4), step


def test_muon_momentum_warmup(M):
    """0.85 at step 0, linearly to 0.95 at step 300, then 0.95."""
    cfg = tiny_config(M)
    optimizers, set_schedule = optimizers_of(M, cfg, M.GPT(cfg))
    muon = [o for o in optimizers if isinstance(o, M.Muon)]
    assert len(muon) == 1
    for step, expected in [
        (0, 0.85),
        (75, 0.875),
        (150, 0.90),
        (299, 0.85 + 0.1 * 299 / 300),
        (300, 0.95),
        (301, 0.95),
        (2499, 0.95),
    ]:
        set_schedule(step)
        for group in muon[0].param_groups:
            assert group["momentum"] == pytest.approx(expected, abs=1e-12), step


# -----------------------------------------------------------------------------
# 5. Optimizer groups


def group_of_each_parameter(model, optimizers):
    """{id(param): [(optimizer, group), ...]} over every group of every optimizer."""
    seen = {id(p): [] for p in model.parameters()}
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                seen.setdefault(id(p), []).append((opt, group))
    return seen


@pytest.mark.parametrize("flip_tied", [False, True])
def test_every_parameter_in_exactly_one_group(mod, flip_tied):
    cfg = tiny_config(mod)
    if flip_tied:
        cfg = tiny_config(mod, tied_embed=not cfg.tied_embed)
    model = mod.GPT(cfg)
    optimizers, _ = optimizers_of(mod, cfg, model)
    seen = group_of_each_parameter(model, optimizers)
    names = {id(p): n for n, p in model.named_parameters()}
    for pid, places in seen.items():
        assert pid in names, "an optimizer holds a tensor that is not a model parameter"
        assert len(places) == 1, f"{names[pid]} is in {len(places)} groups"


def test_adamw_groups_A():
    A = load("A")
    cfg = tiny_config(A)
    model = A.GPT(cfg)
    optimizers, _ = optimizers_of(A, cfg, model)
    assert len(optimizers) == 1 and isinstance(optimizers[0], torch.optim.AdamW)
    (group,) = optimizers[0].param_groups
    assert {id(p) for p in group["params"]} == {id(p) for p in model.parameters()}
    assert group["lr"] == 0.0021 and tuple(group["betas"]) == (0.9, 0.95)
    assert group["eps"] == 1e-10 and group["weight_decay"] == 0.1


@pytest.mark.parametrize("tied", [True, False])
def test_adamw_groups_of_their_own_for_the_embedding_and_output_layer_A(tied):
    """Fields of their own for the output layer (the tied weight when tied) and an untied embedding: a group
    each, the other parameters keep adam_lr and weight_decay; a field left at 0 (lr) or -1 (decay) follows them."""
    A = load("A")
    lrs, decays = torch.rand(2).tolist(), torch.rand(2).tolist()
    cfg = tiny_config(A, tied_embed=tied, head_lr=lrs[0], embed_lr=lrs[1], head_weight_decay=decays[0],
                      embed_weight_decay=decays[1])
    model = A.GPT(cfg)
    (adamw,), _ = optimizers_of(A, cfg, model)
    setting = {id(p): (g["lr"], g["weight_decay"]) for g in adamw.param_groups for p in g["params"]}
    assert setting[id(model.lm_head.weight)] == (lrs[0], decays[0])
    assert setting[id(model.embed.weight)] == ((lrs[0], decays[0]) if tied else (lrs[1], decays[1]))
    assert all(setting[id(p)] == (0.0021, 0.1) for p in model.blocks.parameters())
    assert len(adamw.param_groups) == (2 if tied else 3)
    follow = tiny_config(A, tied_embed=tied, head_lr=lrs[0], embed_weight_decay=-1.0)
    (adamw,), _ = optimizers_of(A, follow, model := A.GPT(follow))
    setting = {id(p): (g["lr"], g["weight_decay"]) for g in adamw.param_groups for p in g["params"]}
    assert setting[id(model.lm_head.weight)] == (lrs[0], 0.1) and setting[id(model.embed.weight)] == (
        (lrs[0], 0.1) if tied else (0.0021, 0.1))


def test_muon_decoupled_weight_decay(M):
    """p <- p * (1 - lr * weight_decay) - lr * NS(update): against the same step without decay, the weight
    moves by -lr * weight_decay * p, exactly the decay (0, the default, is the SPEC's Muon)."""
    n = int(torch.randint(8, 40, ()).item())
    start, g = torch.randn(n, 2 * n), torch.randn(n, 2 * n)
    lr, wd = 0.05, float(torch.empty(()).uniform_(0.01, 2))
    moved = []
    for decay in (wd, 0.0):
        param = nn.Parameter(start.clone())
        param.grad = g.clone()
        M.Muon([param], lr=lr, momentum=0.9, ns_steps=5, weight_decay=decay).step()
        moved.append(param.detach())
    assert torch.allclose(moved[0], moved[1] - lr * wd * start, rtol=0, atol=1e-6)


def test_adam_weight_decay_is_decoupled_M(M):
    """With a zero gradient Adam's step is 0, so a decoupled decay alone moves a weight: p <- p * (1 - lr * wd)."""
    wd = float(torch.empty(()).uniform_(0.001, 0.5))
    cfg = tiny_config(M, adam_weight_decay=wd)
    model = M.GPT(cfg)
    adam = next(o for o in optimizers_of(M, cfg, model)[0] if not isinstance(o, M.Muon))
    before = model.embed.weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    adam.step()
    assert torch.allclose(model.embed.weight.detach(), before * (1 - cfg.embed_lr * wd), rtol=1e-6, atol=0)


def test_muon_and_adam_groups_M(M):
    cfg = tiny_config(M)
    model = M.GPT(cfg)
    optimizers, _ = optimizers_of(M, cfg, model)
    muons = [o for o in optimizers if isinstance(o, M.Muon)]
    adams = [o for o in optimizers if isinstance(o, torch.optim.Adam)]
    assert len(muons) == 1 and len(adams) == 1 and len(optimizers) == 2
    muon, adam = muons[0], adams[0]
    matrices = {id(p) for p in model.blocks.parameters() if p.ndim >= 2}
    assert {id(p) for g in muon.param_groups for p in g["params"]} == matrices
    for g in muon.param_groups:
        assert g["lr"] == 0.05 and g.get("weight_decay", 0) == 0 and g["ns_steps"] == 5 and g["momentum"] == 0.95
    lr_of = {id(p): g["lr"] for g in adam.param_groups for p in g["params"]}
    assert lr_of == {id(model.lm_head.weight): 0.22, id(model.embed.weight): 0.6}
    for g in adam.param_groups:
        assert tuple(g["betas"]) == (0.8, 0.95) and g["eps"] == 1e-10 and g["weight_decay"] == 0


@pytest.mark.parametrize("fast_ops", [True, False])
def test_muon_takes_the_chosen_gram_products(M, fast_ops):
    """Newton-Schulz's symmetric products are the op select_ops chose: fast_ops.py's kernel where it is
    chosen (an H100 here), else the plain PyTorch products (also with --fast_ops=false)."""
    cfg = tiny_config(M)
    ops = gpu_ops(M, cfg) if fast_ops else M.select_ops(tiny_config(M, fast_ops=False), torch.device("cpu"))[0]
    optimizers, _ = optimizers_of(M, cfg, M.GPT(cfg), ops)
    muon = next(o for o in optimizers if isinstance(o, M.Muon))
    assert muon.gram_op is ops["gram"] and (muon.gram_op is M.plain_gram) == (not fast_ops)


def test_scalar_parameters_go_to_adam_M(M):
    cfg = tiny_config(M)
    model = M.GPT(cfg)
    model.blocks[0].register_parameter("gain", nn.Parameter(torch.ones(64)))
    model.register_parameter("temperature", nn.Parameter(torch.ones(())))
    optimizers, _ = optimizers_of(M, cfg, model)
    seen = group_of_each_parameter(model, optimizers)
    for p in (model.blocks[0].gain, model.temperature):
        (opt, group), = seen[id(p)]
        assert isinstance(opt, torch.optim.Adam) and not isinstance(opt, M.Muon)
        assert group["lr"] == 0.04 and group["weight_decay"] == 0


# -----------------------------------------------------------------------------
# 6. Learning-rate schedules


def spec_multiplier(step, baseline):
    if baseline == "A":
        n, warmup, cooldown = 4375, 256, 0.3
    else:
        n, warmup, cooldown = 2500, 0, 0.4
    if step < warmup:
        return (step + 1) / warmup
    if step < (1 - cooldown) * n:
        return 1.0
    w = (n - step) / (cooldown * n)
    return w + (1 - w) * 0.1


BREAKPOINTS = {
    "A": [(0, 1 / 256), (127, 0.5), (255, 1.0), (256, 1.0), (3062, 1.0), (4374, None), (4375, 0.1)],
    "M": [(0, 1.0), (1499, 1.0), (1500, 1.0), (1750, 0.775), (2000, 0.55), (2499, None), (2500, 0.1)],
}


def test_lr_multiplier_breakpoints(mod):
    cfg = mod.Config()
    for step, expected in BREAKPOINTS[mod.BASELINE]:
        if expected is None:  # last step: w + (1 - w) * 0.1 with w = (1 - step/n) / cooldown
            n, cooldown = cfg.num_iterations, (0.3 if mod.BASELINE == "A" else 0.4)
            w = (1 - step / n) / cooldown
            expected = w + (1 - w) * 0.1
            assert 0.1 < expected < 0.11
        assert mod.lr_multiplier(step, cfg) == pytest.approx(expected, rel=1e-9, abs=1e-12), step
    if mod.BASELINE == "A":
        assert 0.999 < mod.lr_multiplier(3063, cfg) < 1.0  # the decay starts after step 0.7 * 4375 = 3062.5


def test_lr_multiplier_every_step(mod):
    cfg = mod.Config()
    for step in range(cfg.num_iterations + 1):
        assert mod.lr_multiplier(step, cfg) == pytest.approx(spec_multiplier(step, mod.BASELINE), rel=1e-9), step


def test_set_schedule_sets_group_lrs(mod):
    cfg = tiny_config(mod)
    model = mod.GPT(cfg)
    optimizers, set_schedule = optimizers_of(mod, cfg, model)
    if mod.BASELINE == "A":
        base = {id(p): 0.0021 for p in model.parameters()}
    else:
        base = {id(p): 0.05 for p in model.blocks.parameters()}
        base[id(model.lm_head.weight)], base[id(model.embed.weight)] = 0.22, 0.6
    steps = [s for s, _ in BREAKPOINTS[mod.BASELINE]] + torch.randint(0, cfg.num_iterations + 1, (5,)).tolist()
    for step in steps:
        set_schedule(step)
        expected = spec_multiplier(step, mod.BASELINE)
        for opt in optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    assert group["lr"] == pytest.approx(base[id(p)] * expected, rel=1e-9), step

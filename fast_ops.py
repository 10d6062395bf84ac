"""Fast ops: drop-ins for named plain ops of train_gpt_A.py and train_gpt_M.py, with the same arguments.

The scripts' model section is the math in plain PyTorch ops; each op named below has a drop-in here that
keeps less for the backward or runs faster, and is tested against its plain op (tests/test_fast_ops.py).
The scripts choose once, at start-up, with choose(); the run log names each op's implementation
(describe()) and carries this file's source; check_fast_ops() compares every drop-in with the plain op
it replaces, so that an edited plain op is refused rather than silently replaced.

    rms_norm      kept-output  keeps its output and inverse RMS for the backward, not its input
    qk_norm_rope  triton       the queries' and keys' RMSNorm + RoPE as one Triton kernel each way
    mlp           triton-tma   ReLU^2 in the epilogue of the first product, its derivative in the backward's
                  kept-output  the same products by PyTorch (GPUs without TMA, before Hopper)
    output_loss   triton       chunked output layer; each chunk's loss and gradient from one Triton kernel
                  chunked      the same chunks, their loss and gradient compiled from PyTorch (no Triton)
    gram          triton-tma   Newton-Schulz's symmetric products from the tiles on and above the diagonal

On CPU the plain ops run; the tests run the kernels there under Triton's interpreter (TRITON_INTERPRET=1).
FAST_OPS_CAPABILITY=8.0 makes a newer GPU choose as an A100 would (the kept-output MLP, plain Gram products).
"""
import functools
import math
import os
import re
import types
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
    from triton.tools.tensor_descriptor import TensorDescriptor

    TRITON = True
except ImportError:  # the kernels below are then defined but never launched: choose() picks none of them
    triton, tl, TRITON = types.SimpleNamespace(jit=lambda fn: fn), types.SimpleNamespace(constexpr=None), False
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # kernels run on the CPU (tests)

# -----------------------------------------------------------------------------
# Choosing the implementations, once per run

TMA_CAPABILITY = (9, 0)  # tensor descriptors (TMA) need Hopper or later
# FAST_OPS_CAPABILITY=8.0: choose as a GPU of that compute capability would, to run an older GPU's path on a newer one
CAPABILITY_VARIABLE = "FAST_OPS_CAPABILITY"
# check_fast_ops's bound on the relative difference: rounding gives ~1e-6 in float32 and ~4e-3 in bfloat16;
# an edited plain op differs by O(1)
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


class Choice(NamedTuple):
    """Each op's implementation ("plain": the script's own op), and why every op is plain if it is (or which
    capability the choice was forced to)."""

    impls: dict[str, str]
    reason: str = ""


def choose(names: list[str], device_type: str, capability: tuple[int, int] | None, triton_present: bool,
           enabled: bool) -> Choice:
    """The implementation of each named op for a device ("cuda" or "cpu"), its compute capability, whether
    Triton is present and --fast_ops. On CPU the plain ops run (autograd, as the model section writes them)."""
    if not enabled or device_type != "cuda":
        return Choice({name: "plain" for name in names}, "--fast_ops=false" if not enabled else "no CUDA")
    forced = os.environ.get(CAPABILITY_VARIABLE, "")
    if forced:
        if not re.fullmatch(r"\d+\.\d+", forced):
            raise ValueError(f"{CAPABILITY_VARIABLE}={forced!r}: expected a compute capability such as 8.0")
        capability = tuple(int(part) for part in forced.split("."))
    tma = triton_present and capability is not None and capability >= TMA_CAPABILITY
    best = dict(
        rms_norm="kept-output",
        qk_norm_rope="triton" if triton_present else "plain",
        mlp="triton-tma" if tma else "kept-output",
        output_loss="triton" if triton_present else "chunked",
        gram="triton-tma" if tma else "plain",
    )
    reason = f"{CAPABILITY_VARIABLE}={forced}" if forced else ""
    return Choice({name: best.get(name, "plain") for name in names}, reason)


def describe(choice: Choice) -> str:
    """The run log's line, e.g. 'fast_ops: rms_norm=kept-output mlp=triton-tma ...' or 'fast_ops: plain (no CUDA)'."""
    if all(impl == "plain" for impl in choice.impls.values()):
        return f"fast_ops: plain ({choice.reason})"
    line = "fast_ops: " + " ".join(f"{name}={impl}" for name, impl in choice.impls.items())
    return f"{line} ({choice.reason})" if choice.reason else line


def drop_ins(choice: Choice, plain: dict[str, Callable], loss_chunk: int) -> dict[str, Callable]:
    """The chosen drop-ins by op name (plain ops left out). `plain` is the script's ops: a drop-in runs its
    plain op for shapes its kernel cannot take; loss_chunk is the rows whose logits the output loss holds."""
    makers = {
        ("rms_norm", "kept-output"): lambda: KeptOutputRMSNorm.apply,
        ("qk_norm_rope", "triton"): lambda: functools.partial(qk_norm_rope, plain_op=plain["qk_norm_rope"]),
        ("mlp", "triton-tma"): lambda: mlp_triton,
        ("mlp", "kept-output"): lambda: mlp_kept_output,
        ("output_loss", "triton"): lambda: functools.partial(
            fast_output_loss, chunk=loss_chunk, chunk_loss=fused_logit_loss_grad),
        ("output_loss", "chunked"): lambda: functools.partial(
            fast_output_loss, chunk=loss_chunk, chunk_loss=torch.compile(logit_loss_grad, dynamic=False)),
        ("gram", "triton-tma"): lambda: functools.partial(gram, plain_op=plain["gram"]),
    }
    return {name: makers[(name, impl)]() for name, impl in choice.impls.items() if impl != "plain"}


def check_fast_ops(ops: dict[str, Callable], plain: dict[str, Callable], device: torch.device, softcap: float,
                   softcap_scale: float) -> list[str]:
    """Each drop-in in `ops` against the plain op it replaces, outputs and gradients, on small random float32
    inputs; one message per drop-in that no longer computes what its plain op computes."""
    gen = torch.Generator(device=device).manual_seed(0)
    N, H, D, V = 96, 2, 16, 300

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, device=device, generator=gen)

    angles = randn(1, N, 1, D // 2)
    half = randn(2, 128, 64).bfloat16()  # Newton-Schulz's products run in bfloat16, on whole 128-row tiles
    inputs = {  # each op's arguments, and how many leading ones are differentiated
        "rms_norm": lambda: ((randn(1, N, H, D) * 3,), 1),
        "qk_norm_rope": lambda: ((randn(1, N, 2 * H, D) * 3, angles.cos(), angles.sin()), 1),
        "mlp": lambda: ((randn(N, D), randn(4 * D, D), randn(D, 4 * D)), 3),
        "output_loss": lambda: ((randn(N, D), randn(V, D), torch.randint(0, V, (N,), device=device, generator=gen),
                                 softcap, softcap_scale), 2),
        "gram": lambda: ((randn(2, 128, 64).bfloat16(), half @ half.mT, -4.775, 2.0315), 0),
    }
    problems = []
    for name, fast_op in ops.items():
        if fast_op is plain[name]:
            continue
        args, differentiated = inputs[name]()
        results = []
        for op in (fast_op, plain[name]):
            leaves = [a.clone().requires_grad_() for a in args[:differentiated]]
            outs = op(*leaves, *args[differentiated:])
            outs = outs if isinstance(outs, tuple) else (outs,)
            if leaves:
                weights = torch.Generator(device=device).manual_seed(1)
                sum((out * torch.randn(out.shape, device=device, generator=weights)).sum() for out in outs).backward()
            results.append([out.detach() for out in outs] + [a.grad for a in leaves])
        for got, want in zip(*results, strict=True):
            err = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()
            if not err < CHECK_TOLERANCE[got.dtype]:
                problems.append(f"the fast op for {name} no longer matches the model section's {name} "
                                f"(relative difference {err:.2g}); run with --fast_ops=false, or update its "
                                f"drop-in in fast_ops.py")
                break
    return problems


def emulated(t: Tensor) -> bool:
    """Under the interpreter, whose bfloat16 casts truncate and whose bfloat16 products are wrong, the kernels
    round by hand and multiply in float32 (exact for bfloat16 inputs)."""
    return TRITON_INTERPRETED and t.dtype == torch.bfloat16


def dot_precision(t: Tensor) -> str:
    """tl.dot's precision: float32 products in full ("ieee"), and always under the interpreter."""
    return "ieee" if t.dtype == torch.float32 or TRITON_INTERPRETED else "tf32"


@triton.jit
def _round_rne(x, dtype: tl.constexpr, EMULATE: tl.constexpr):
    """x rounded to dtype, to nearest even: with EMULATE, by hand (the interpreter's bfloat16 cast truncates)."""
    if EMULATE:
        b = x.to(tl.uint32, bitcast=True)
        x = (((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)
    return x.to(dtype)


# -----------------------------------------------------------------------------
# rms_norm


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


# -----------------------------------------------------------------------------
# qk_norm_rope: a program takes a block of NORM_ROPE_BLOCK_T tokens and goes through their 2H heads, so that it
# loads the tables once; the head vector's two halves are two tiles, in float32 with the plain op's roundings.
# q and k are two outputs, so that the backward takes attention's two gradients as they are.

NORM_ROPE_BLOCK_T = 8  # tokens per program: 4 to 32 all run at memory speed on an H100 (bench/qk_norm_rope.py)
NORM_ROPE_NUM_WARPS = 2  # warps per program
NORM_ROPE_INTERPRETER_BLOCK_T = 64  # tokens per program under the interpreter, whose cost is per program

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
    x1 = tl.load(x, mask=inside, other=0.0).to(tl.float32)
    x2 = tl.load(x + D // 2, mask=inside, other=0.0).to(tl.float32)
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
        _norm_rope_head(x_ptr, q_ptr, k_ptr, rinv_ptr, c, s, t, d, inside, b, head, T, sx_b, sx_t, sx_h, eps, H, D,
                        EMULATE)


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
    g1 = tl.load(g, mask=inside, other=0.0).to(tl.float32)
    g2 = tl.load(g + D // 2, mask=inside, other=0.0).to(tl.float32)
    y1 = tl.load(y, mask=inside, other=0.0).to(tl.float32)
    y2 = tl.load(y + D // 2, mask=inside, other=0.0).to(tl.float32)
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
    """A power-of-two half head, and the tables' last dim contiguous."""
    half = x_BTND.size(-1) // 2
    return x_BTND.size(-1) == 2 * half and half & (half - 1) == 0 and cos.stride(-1) == sin.stride(-1) == 1


def norm_rope_block_t() -> int:
    return NORM_ROPE_INTERPRETER_BLOCK_T if TRITON_INTERPRETED else NORM_ROPE_BLOCK_T


def fused_norm_rope(qk_BTND: Tensor, cos: Tensor, sin: Tensor, block_t: int | None = None,
                    num_warps: int = NORM_ROPE_NUM_WARPS) -> tuple[Tensor, Tensor, Tensor]:
    """rotary(rms_norm(x)) of the 2H heads as one Triton kernel: the queries, the keys and the float32 inverse
    RMS r. The launch settings exist for bench/qk_norm_rope.py and the tests."""
    B, T, N, D = qk_BTND.shape
    block_t = block_t or norm_rope_block_t()
    x = qk_BTND if qk_BTND.stride(-1) == 1 else qk_BTND.contiguous()
    q_BTHD, k_BTHD = (x.new_empty(B, T, N // 2, D) for _ in range(2))
    rinv_BTN1 = torch.empty(B, N, T, 1, dtype=torch.float32, device=x.device).transpose(1, 2)  # a head's r together
    _norm_rope_kernel[(triton.cdiv(T, block_t), B)](
        x, q_BTHD, k_BTHD, rinv_BTN1, cos, sin, T, x.stride(0), x.stride(1), x.stride(2), cos.stride(1),
        torch.finfo(torch.float32).eps, H=N // 2, D=D, BLOCK_T=block_t, EMULATE=emulated(x), num_warps=num_warps,
    )
    return q_BTHD, k_BTHD, rinv_BTN1


def fused_norm_rope_grad(grad_q: Tensor, grad_k: Tensor, q_BTHD: Tensor, k_BTHD: Tensor, rinv_BTN1: Tensor,
                         cos: Tensor, sin: Tensor, block_t: int | None = None,
                         num_warps: int = NORM_ROPE_NUM_WARPS) -> Tensor:
    """The input gradient of fused_norm_rope, from the queries' and the keys' gradients in any layout: the
    rotation is orthogonal, so the outputs rotated back are the normalised vectors n, and
    dx = r * (g_n - n * mean(g_n * n)) for the output gradient rotated back, g_n."""
    B, T, H, D = q_BTHD.shape
    block_t = block_t or norm_rope_block_t()
    gq, gk = (g if g.stride(-1) == 1 else g.contiguous() for g in (grad_q, grad_k))
    dx_BTND = q_BTHD.new_empty(B, T, 2 * H, D)
    _norm_rope_grad_kernel[(triton.cdiv(T, block_t), B)](
        gq, gk, q_BTHD, k_BTHD, rinv_BTN1, cos, sin, dx_BTND, T, *gq.stride()[:3], *gk.stride()[:3], cos.stride(1),
        H=H, D=D, BLOCK_T=block_t, EMULATE=emulated(q_BTHD), num_warps=num_warps,
    )
    return dx_BTND


class FusedNormRope(torch.autograd.Function):
    """qk_norm_rope keeping its outputs (which attention keeps anyway) and the inverse RMS r, not its input: the
    forward writes the queries and the keys apart, the backward reads their two gradients where attention left
    them and writes the one input gradient (no concatenation)."""

    @staticmethod
    def forward(ctx, qk_BTND: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        q_BTHD, k_BTHD, rinv_BTN1 = fused_norm_rope(qk_BTND, cos, sin)
        ctx.save_for_backward(q_BTHD, k_BTHD, rinv_BTN1, cos, sin)
        return q_BTHD, k_BTHD

    @staticmethod
    def backward(ctx, grad_q: Tensor, grad_k: Tensor):
        q_BTHD, k_BTHD, rinv_BTN1, cos, sin = ctx.saved_tensors
        return fused_norm_rope_grad(grad_q, grad_k, q_BTHD, k_BTHD, rinv_BTN1, cos, sin), None, None


def qk_norm_rope(qk_BTND: Tensor, cos: Tensor, sin: Tensor, plain_op: Callable) -> tuple[Tensor, Tensor]:
    """The drop-in: the kernels, or the plain op for head sizes they do not take."""
    if norm_rope_kernel_ready(qk_BTND, cos, sin):
        return FusedNormRope.apply(qk_BTND, cos, sin)
    return plain_op(qk_BTND, cos, sin)


# -----------------------------------------------------------------------------
# mlp: products with ReLU^2 (or its derivative) in the epilogue, as a persistent matrix product whose tiles come
# and go through tensor descriptors (TMA), so that a tile's epilogue overlaps the next tile's loads. Tiles
# measured on one H100 at 65,536 x 768 x 3,072 (bench/mlp.py; bench/NOTES.md).

MLP_TILE = (128, 256, 64)  # bfloat16 tile: rows, columns, inner
MLP_GROUP_M = 8  # row blocks swept together, so that their rows of A stay in L2
MLP_NUM_WARPS, MLP_NUM_STAGES = 8, 3  # warps per program; inner tiles loaded ahead
MLP_TILE_FP32 = (64, 64, 32)  # float32 (start-up check, tests): a bfloat16-sized tile overflows shared memory
MLP_INTERPRETER_PROGRAMS = 4  # persistent programs under the Triton interpreter
SM_COUNT: dict[int, int] = {}  # multiprocessors per CUDA device index, looked up once

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
            c_desc.store([off_m, off_n + BLOCK_N // 2],
                         _epilogue(h1, y_desc, off_m, off_n + BLOCK_N // 2, GRAD, EMULATE))
        else:
            c_desc.store([off_m, off_n], _epilogue(acc, y_desc, off_m, off_n, GRAD, EMULATE))


def fused_matmul_epilogue(a_NK: Tensor, b: Tensor, y_NH: Tensor | None, b_kn: bool,
                          tile: tuple[int, int, int] | None = None, num_warps: int = MLP_NUM_WARPS,
                          num_stages: int = MLP_NUM_STAGES) -> Tensor:
    """relu(a @ b)^2, or (a @ b) * 2 sqrt(y) when y is given, as one Triton kernel; b is K x H if b_kn, else
    H x K. Every tensor has contiguous rows of a multiple of 16 bytes (TMA). `tile` and the launch settings
    exist for bench/mlp.py."""
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
        N, H, K, GRAD=y_NH is not None, B_KN=b_kn, PRECISION=dot_precision(a_NK), EMULATE=emulated(a_NK),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=MLP_GROUP_M, num_warps=num_warps,
        num_stages=num_stages,
    )
    return c_NH


def tma_ready(*tensors: Tensor) -> bool:
    """Rows contiguous and a multiple of 16 bytes long, as tensor descriptors need."""
    return all(t.stride(-1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 for t in tensors)


def matmul_relu_square(x_NC: Tensor, w_HC: Tensor, kernel: bool) -> Tensor:
    """relu(x @ w^T)^2, the product rounded to the inputs' dtype first, as an unfused product would write it:
    by the kernel where chosen and the rows suit TMA, else by PyTorch."""
    if kernel and tma_ready(x_NC, w_HC):
        return fused_matmul_epilogue(x_NC, w_HC, None, b_kn=False)
    return F.relu(x_NC @ w_HC.T).square()


def matmul_relu_square_grad(g_NC: Tensor, w_CH: Tensor, y_NH: Tensor, kernel: bool) -> Tensor:
    """(g @ w) * 2 sqrt(y): the gradient before ReLU^2 from the gradient after it and its output y."""
    if kernel and tma_ready(g_NC, w_CH, y_NH):
        return fused_matmul_epilogue(g_NC, w_CH, y_NH, b_kn=True)
    return (2 * y_NH.float().sqrt() * (g_NC @ w_CH).float()).type_as(g_NC)


class FusedMLP(torch.autograd.Function):
    """mlp keeping the input x and ReLU^2's output y, not the hidden pre-activations h: the backward's product
    that makes the hidden gradient multiplies it by ReLU^2's derivative, 2 relu(h) = 2 sqrt(y). With the kernel,
    h and its gradient before the derivative never reach memory: per layer four passes over the T x 4C hidden
    tensor fewer."""

    @staticmethod
    def forward(ctx, x: Tensor, fc_w: Tensor, proj_w: Tensor, kernel: bool) -> Tensor:
        x_NC = x.reshape(-1, x.size(-1))
        y_NH = matmul_relu_square(x_NC, fc_w, kernel)
        ctx.save_for_backward(x_NC, y_NH, fc_w, proj_w)
        ctx.x_shape, ctx.kernel = x.shape, kernel
        return (y_NH @ proj_w.T).view(*x.shape[:-1], proj_w.size(0))

    @staticmethod
    def backward(ctx, grad: Tensor):
        x_NC, y_NH, fc_w, proj_w = ctx.saved_tensors
        g_NC = grad.reshape(-1, grad.size(-1)).contiguous()
        dh_NH = matmul_relu_square_grad(g_NC, proj_w, y_NH, ctx.kernel)
        return (dh_NH @ fc_w).view(ctx.x_shape), dh_NH.T @ x_NC, g_NC.T @ y_NH, None


def mlp_triton(x: Tensor, fc_w: Tensor, proj_w: Tensor) -> Tensor:
    return FusedMLP.apply(x, fc_w, proj_w, True)


def mlp_kept_output(x: Tensor, fc_w: Tensor, proj_w: Tensor) -> Tensor:
    return FusedMLP.apply(x, fc_w, proj_w, False)


# -----------------------------------------------------------------------------
# output_loss: the output layer and loss `chunk` rows at a time, each chunk's loss and gradient made in the
# forward by one kernel (measured on one H100, 8,192 x 50,304 logits, in its development versions: 0.68-0.70 ms
# plain and 0.77-0.78 ms soft-capped, against 1.3 / 1.9 ms for the compiled PyTorch chunk; bench/NOTES.md).

LSE_BLOCK = 128  # logits per partial max and sum of the PyTorch chunk's log-sum-exp
LOSS_BLOCK_V = 4096  # logits of a row per step of the kernel's loops
LOSS_NUM_WARPS = 8
FIXED_SHIFT_MAX_SOFTCAP = 60.0  # up to this cap, exp(z - softcap) stays a normal float32 for z in [0, cap]
LOG2_E = 1.4426950408889634  # log2(e), for the kernel's arguments

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
                            FAST: tl.constexpr, EMULATE: tl.constexpr):
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
        x_next = tl.load(row_ptr + start + BLOCK_V + cols, mask=cols < V - start - BLOCK_V,
                         eviction_policy="evict_last")
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
        x_next = tl.load(row_ptr + prev + cols, mask=cols < tl.where(prev >= 0, V - prev, 0),
                         eviction_policy="evict_first")
        if SOFTCAP:
            s, t = _sigmoid_parts(x, k2, FAST)
            q = _exp2(t * -cap_log2e if FIXED_SHIFT else (cap * s - shift) * LOG2E, FAST) * c1
            g = tl.where(cols == target - start, q - g_scale, q) * (s * t)
        else:
            q = _exp2((x - shift) * LOG2E, FAST) * c1
            g = tl.where(cols == target - start, q - g_scale, q)
        tl.store(row_ptr + start + cols, _round_rne(g, logits_ptr.dtype.element_ty, EMULATE), mask=cols < V - start,
                 eviction_policy="evict_first")


def fused_logit_loss_grad(logits_nV: Tensor, targets_n: Tensor, softcap: float, softcap_scale: float,
                          grad_scale: float, grads: bool) -> tuple[Tensor, Tensor]:
    """logit_loss_grad as one Triton kernel that writes the gradient over the logits (also without grads:
    evaluation just discards it). Rows must be contiguous."""
    n, V = logits_nV.shape
    assert logits_nV.stride(1) == 1 and targets_n.shape == (n,), "rows of logits must be contiguous, one target each"
    use_cap = softcap > 0
    loss_n = torch.empty(n, dtype=torch.float32, device=logits_nV.device)
    _logit_loss_grad_kernel[(n,)](
        logits_nV, targets_n, loss_n, V, logits_nV.stride(0), -LOG2_E / softcap_scale if use_cap else 0.0,
        softcap, softcap * LOG2_E, grad_scale * softcap / softcap_scale if use_cap else grad_scale,
        SOFTCAP=use_cap, FIXED_SHIFT=use_cap and softcap <= FIXED_SHIFT_MAX_SOFTCAP,
        BLOCK_V=min(LOSS_BLOCK_V, triton.next_power_of_2(V)), FAST=not TRITON_INTERPRETED,
        EMULATE=emulated(logits_nV), num_warps=LOSS_NUM_WARPS,
    )
    return loss_n, logits_nV


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


def chunked_output_loss(x_NC: Tensor, w_VC: Tensor, targets_N: Tensor, softcap: float, softcap_scale: float,
                        chunk: int, chunk_loss: Callable, grads: bool):
    """Mean cross-entropy of the output layer, `chunk` rows at a time, so that at most chunk x V logits
    exist at once. With grads, also d(loss)/dx and d(loss)/dw, summed over the chunks (w's in float32)."""
    N = x_NC.size(0)
    total = torch.zeros((), dtype=torch.float32, device=x_NC.device)
    dx_NC = torch.empty_like(x_NC) if grads else None
    dw_VC = torch.zeros(w_VC.shape, dtype=torch.float32, device=w_VC.device) if grads else None
    for start in range(0, N, chunk):
        x_nC = x_NC[start : start + chunk]
        loss_n, grad_nV = chunk_loss(x_nC @ w_VC.T, targets_N[start : start + chunk], softcap, softcap_scale, 1 / N,
                                     grads)
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
        loss, dx_NC, dw_VC = chunked_output_loss(x_NC, w_VC, targets_N, softcap, softcap_scale, chunk, chunk_loss,
                                                 True)
        ctx.save_for_backward(dx_NC, dw_VC)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        # in training grad_loss is 1 / accumulation steps, a power of two: the scaling is exact in bfloat16
        dx_NC, dw_VC = ctx.saved_tensors
        return dx_NC * grad_loss, dw_VC * grad_loss, None, None, None, None, None


def fast_output_loss(x_NC: Tensor, w_VC: Tensor, targets_N: Tensor, softcap: float, softcap_scale: float, *,
                     chunk: int, chunk_loss: Callable) -> Tensor:
    """output_loss, `chunk` rows at a time, each chunk's loss and gradient by `chunk_loss`
    (fused_logit_loss_grad, or logit_loss_grad)."""
    if torch.is_grad_enabled() and (x_NC.requires_grad or w_VC.requires_grad):
        return ChunkedOutputLoss.apply(x_NC, w_VC, targets_N, softcap, softcap_scale, chunk, chunk_loss)
    return chunked_output_loss(x_NC, w_VC, targets_N, softcap, softcap_scale, chunk, chunk_loss, False)


# -----------------------------------------------------------------------------
# gram: beta C + alpha X X^T for a batch of matrices, C symmetric (Newton-Schulz's X X^T and b A + c A A). The
# result is symmetric, so a program computes a tile on or above the diagonal and also writes its mirror.

GRAM_TILE = (128, 64)  # bfloat16 tile: rows (= columns), inner
GRAM_NUM_WARPS, GRAM_NUM_STAGES = 8, 3  # warps per program; inner tiles loaded ahead
GRAM_TILE_FP32 = (32, 32)  # float32 (start-up check, tests): a bfloat16-sized tile overflows shared memory
UPPER_TILES: dict[tuple[int, str], Tensor] = {}  # (row blocks, device): the (i, j) of the tiles with i <= j

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
    return X_nRK.size(1) % block == 0 and X_nRK.is_contiguous() and tma_ready(X_nRK.flatten(0, 1))


def fused_gram(X_nRK: Tensor, C_nRR: Tensor | None = None, beta: float = 0.0, alpha: float = 1.0,
               tile: tuple[int, int] | None = None, num_warps: int = GRAM_NUM_WARPS,
               num_stages: int = GRAM_NUM_STAGES) -> Tensor:
    """beta C + alpha X X^T for a batch of matrices X (n x R x K) and symmetric C, as one Triton kernel that
    computes the tiles on and above the diagonal. `tile` and the launch settings exist for bench/muon.py."""
    n, R, K = X_nRK.shape
    block, block_k = tile or (GRAM_TILE if X_nRK.dtype == torch.bfloat16 else GRAM_TILE_FP32)
    key = (R // block, str(X_nRK.device))
    if key not in UPPER_TILES:
        upper = torch.triu_indices(R // block, R // block).T.contiguous()
        UPPER_TILES[key] = upper.to(device=X_nRK.device, dtype=torch.int32)
    tiles = UPPER_TILES[key]
    out_nRR = X_nRK.new_empty(n, R, R)
    x_desc = TensorDescriptor.from_tensor(X_nRK.view(n * R, K), [block, block_k])
    out_desc = TensorDescriptor.from_tensor(out_nRR.view(n * R, R), [block, block])
    c_desc = out_desc if C_nRR is None else TensorDescriptor.from_tensor(C_nRR.reshape(n * R, R), [block, block])
    _gram_kernel[(tiles.size(0), n)](
        x_desc, c_desc, out_desc, tiles, R, K, alpha, beta, HAS_C=C_nRR is not None, PRECISION=dot_precision(X_nRK),
        EMULATE=emulated(X_nRK), BLOCK=block, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    )
    return out_nRR


def gram(X_nRK: Tensor, C_nRR: Tensor | None = None, beta: float = 0.0, alpha: float = 1.0, *,
         plain_op: Callable) -> Tensor:
    """The drop-in: the kernel, or the plain op for shapes that are not whole tiles."""
    block = GRAM_TILE[0] if X_nRK.dtype == torch.bfloat16 else GRAM_TILE_FP32[0]
    if gram_kernel_ready(X_nRK, block):
        return fused_gram(X_nRK, C_nRR, beta, alpha)
    return plain_op(X_nRK, C_nRR, beta, alpha)

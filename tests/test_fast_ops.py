"""fast_ops.py: which implementation each op gets on each device, and every drop-in against the plain op it
replaces in the scripts' model section (forward and gradients, float32 and bfloat16, fresh random inputs; the
kernels under Triton's interpreter). An edit to the model section trains with --fast_ops=false, with gradients
equal to float64 autograd's, and is refused with fast ops on instead of silently replaced. The model section is
the same in both twins (test_end_to_end), so these tests run once, on train_gpt_M.py's plain ops."""
import functools
import math
import os
import secrets
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fast_ops
from conftest import gpu_ops, load_script, tiny_args
from test_model_optim import random_tokens, randomize, reference_loss, tiny_config

M = load_script("M")
NAMES = ["rms_norm", "qk_norm_rope", "mlp", "output_loss", "gram"]
H100, A100 = (9, 0), (8, 0)

# Relative error, ||fast - plain|| / ||plain||, that each dtype allows, from the largest seen over
# 300 draws of every case of test_fast_op_matches_its_plain_op (CPU, torch 2.13), times about 3 or more.
# float32: both compute the same formula in another order (largest seen 1.1e-6, the output loss; the
# other ops under 1e-7). bfloat16: the fast backward reads the op's output rounded to bfloat16 where
# autograd reads its input (the MLP: sqrt of ReLU^2's rounded output for relu(h)), and the loss rounds
# the logits and their gradient to bfloat16 (largest seen 3.5e-3, the MLP, and 3.0e-3, the output loss;
# bfloat16's ulp is 2^-8 = 3.9e-3 relative).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# Chunkings of the fast loss sum the same float32 rows in other orders: over 300 draws of
# test_fast_output_loss_chunks_that_do_and_do_not_divide_the_rows the loss moved by up to 8.4e-7 and the
# gradients by 3.5e-7, relative; in the model (test_model_loss_does_not_depend_on_loss_chunk, 100
# draws) the loss by 5.9e-7 and the gradients by up to 5.0e-6.
CHUNK_RTOL = 2e-5


@pytest.fixture(autouse=True)
def random_seed():
    """Fresh randomness each run, reproducible from the printed seed."""
    seed = int(os.environ.get("FAST_OPS_SEED", secrets.randbits(31)))
    torch.manual_seed(seed)
    print(f"FAST_OPS_SEED={seed}")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-300)).item()


def plain_table() -> dict:
    return {**M.plain_ops()._asdict(), **M.optimizer_ops()}


# -----------------------------------------------------------------------------
# The choice, once per run


def test_choice_for_an_h100_an_a100_a_gpu_without_triton_and_the_cpu():
    choose, describe = fast_ops.choose, fast_ops.describe
    assert describe(choose(NAMES, "cuda", H100, True, True)) == (
        "fast_ops: rms_norm=kept-output qk_norm_rope=triton mlp=triton-tma output_loss=triton gram=triton-tma")
    # no tensor descriptors (TMA) before Hopper: the MLP keeps its memory saving with PyTorch products
    assert describe(choose(NAMES, "cuda", A100, True, True)) == (
        "fast_ops: rms_norm=kept-output qk_norm_rope=triton mlp=kept-output output_loss=triton gram=plain")
    assert describe(choose(NAMES, "cuda", H100, False, True)) == (
        "fast_ops: rms_norm=kept-output qk_norm_rope=plain mlp=kept-output output_loss=chunked gram=plain")
    assert describe(choose(NAMES, "cpu", None, True, True)) == "fast_ops: plain (no CUDA)"
    assert describe(choose(NAMES, "cuda", H100, True, False)) == "fast_ops: plain (--fast_ops=false)"
    # A has no Newton-Schulz: its line names no gram
    assert "gram" not in describe(choose(NAMES[:4], "cuda", H100, True, True))


def test_a_forced_capability_chooses_as_that_gpu_and_says_so(monkeypatch):
    """FAST_OPS_CAPABILITY=8.0 on an H100: the A100's choice, named in the log line; a malformed value refused."""
    monkeypatch.setenv("FAST_OPS_CAPABILITY", "8.0")
    assert fast_ops.describe(fast_ops.choose(NAMES, "cuda", H100, True, True)) == (
        "fast_ops: rms_norm=kept-output qk_norm_rope=triton mlp=kept-output output_loss=triton gram=plain "
        "(FAST_OPS_CAPABILITY=8.0)")
    assert fast_ops.describe(fast_ops.choose(NAMES, "cpu", None, True, True)) == "fast_ops: plain (no CUDA)"
    monkeypatch.setenv("FAST_OPS_CAPABILITY", "sm80")
    with pytest.raises(ValueError, match="FAST_OPS_CAPABILITY='sm80'"):
        fast_ops.choose(NAMES, "cuda", H100, True, True)


def test_the_script_asks_for_its_own_ops_and_says_which_ran():
    ops, line = M.select_ops(M.Config(), torch.device("cpu"))
    assert line == "fast_ops: plain (no CUDA)" and ops == plain_table()
    A = load_script("A")
    assert set(A.select_ops(A.Config(), torch.device("cpu"))[0]) == set(NAMES[:4])


CASES = ("rms_norm", "qk_norm_rope", "mlp", "output_loss", "gram")


def test_every_op_with_a_drop_in_has_its_equivalence_test():
    chosen = {name for capability in (H100, A100) for triton in (True, False)
              for name, impl in fast_ops.choose(NAMES, "cuda", capability, triton, True).impls.items()
              if impl != "plain"}
    assert chosen == set(CASES)


def case_inputs(name: str, dtype: torch.dtype) -> tuple[list, int]:
    """Random arguments of op `name` in `dtype`, and how many leading ones are differentiated."""
    T, H, D = int(torch.randint(1, 300, ()).item()), 3, 32
    scale = float(torch.empty(()).uniform_(0.1, 10))
    if name == "rms_norm":
        return [(torch.randn(2, T, H * D) * scale).to(dtype)], 1
    if name == "qk_norm_rope":
        cos, sin = (t.to(dtype) for t in M.rope_tables(T, D, float(torch.empty(()).uniform_(10, 5000))))
        return [(torch.randn(1, T, 2 * H, D) * scale).to(dtype), cos, sin], 1  # queries and keys: 2H heads
    if name == "mlp":
        C = 8 * int(torch.randint(2, 16, ()).item())  # rows of a multiple of 16 bytes: the kernel's TMA takes them
        x = (torch.randn(1, T, C) * scale).to(dtype)
        x[0, 0] = 0  # a row of zero pre-activations: ReLU^2's derivative at 0 is 0
        return [x, (torch.randn(4 * C, C) / C**0.5).to(dtype), (torch.randn(C, 4 * C) / (4 * C) ** 0.5).to(dtype)], 3
    if name == "output_loss":
        C, V = 16, int(torch.randint(100, 700, ()).item())
        cap = float(torch.randint(0, 2, ()).item()) * 30.0
        return [(torch.randn(T, C) * 2).to(dtype), (torch.randn(V, C) * 2).to(dtype), torch.randint(0, V, (T,)), cap,
                7.5 * math.sqrt(C)], 2
    if name == "gram":  # Newton-Schulz's b A + c A A, whole tiles of the kernel
        block = (fast_ops.GRAM_TILE if dtype == torch.bfloat16 else fast_ops.GRAM_TILE_FP32)[0]
        X = torch.randn(int(torch.randint(1, 3, ()).item()), block, 8 * int(torch.randint(1, 9, ()).item()))
        A = (X @ X.mT / X.size(-1)).to(dtype)
        return [A, A, -4.775, 2.0315], 0
    raise KeyError(name)


@pytest.mark.parametrize("capability", [H100, A100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", CASES)
def test_fast_op_matches_its_plain_op(name, dtype, capability):
    """Same output dtype and shape, output and gradients of the differentiated arguments within the
    dtype's tolerance, for a random output gradient."""
    cfg = M.Config(loss_chunk=int(torch.randint(1, 400, ()).item()))
    fast_op, plain_op = gpu_ops(M, cfg, capability)[name], plain_table()[name]
    if fast_op is plain_op:
        pytest.skip(f"{name} runs its plain op on this GPU")
    args, differentiated = case_inputs(name, dtype)
    scale_of_loss = 2.0 ** int(torch.randint(-3, 4, ()).item())
    results = []
    for op in (fast_op, plain_op):
        leaves = [a.clone().requires_grad_() for a in args[:differentiated]]
        outs = op(*leaves, *args[differentiated:])
        outs = outs if isinstance(outs, tuple) else (outs,)
        if leaves:
            # a scalar loss gets a power of two, as in training (1 / accumulation steps): the fast loss
            # scales its finished bfloat16 gradients by it, exactly only for powers of two
            weights = torch.Generator().manual_seed(7)
            sum((out.float() * (torch.randn(out.shape, generator=weights) if out.ndim else scale_of_loss)).sum()
                for out in outs).backward()
        results.append((outs, [leaf.grad for leaf in leaves]))
    (fast_outs, fast_grads), (plain_outs, plain_grads) = results
    assert len(fast_outs) == len(plain_outs)
    for fast_out, plain_out in zip(fast_outs, plain_outs):
        assert fast_out.dtype == plain_out.dtype and fast_out.shape == plain_out.shape
        assert relative_error(fast_out, plain_out) < TOLERANCE[dtype]
    for got, want in zip(fast_grads, plain_grads, strict=True):
        assert got.dtype == want.dtype and torch.isfinite(got).all()
        assert relative_error(got, want) < TOLERANCE[dtype], (name, dtype, relative_error(got, want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_output_norm_and_mlp_forward_are_the_plain_ops_bit_for_bit(dtype):
    """The kept-output norm and MLP change only what the backward keeps: their forward is the plain op's."""
    x = (torch.randn(2, 77, 4, 32) * 3).to(dtype)
    assert torch.equal(fast_ops.KeptOutputRMSNorm.apply(x), M.rms_norm(x))
    h = x.flatten(2)
    fc_w, proj_w = torch.randn(512, 128).to(dtype), torch.randn(128, 512).to(dtype)
    assert torch.equal(fast_ops.mlp_kept_output(h, fc_w, proj_w), M.mlp(h, fc_w, proj_w))


def test_drop_ins_run_the_plain_op_for_shapes_their_kernels_do_not_take():
    """A half head that is not a power of two, or matrices that are not whole tiles: the plain op's result, exactly."""
    ops = gpu_ops(M, M.Config())
    qk = torch.randn(1, 50, 4, 24)
    cos, sin = M.rope_tables(50, 24, 1024.0)
    for got, want in zip(ops["qk_norm_rope"](qk, cos, sin), M.qk_norm_rope(qk, cos, sin), strict=True):
        assert torch.equal(got, want)
    X = torch.randn(2, 40, 16)
    assert torch.equal(ops["gram"](X), M.plain_gram(X))


def test_mlp_hidden_gradient_is_zero_where_relu_square_is_zero():
    """ReLU^2's derivative 2 relu(h) = 2 sqrt(y) is exactly 0 where its output y is 0, in the PyTorch path
    and in the fused kernel."""
    g, w = torch.randn(64, 32), torch.randn(32, 256)
    y = torch.relu(torch.randn(64, 256)).square()
    for dh in (fast_ops.matmul_relu_square_grad(g, w, y, kernel=False),
               fast_ops.fused_matmul_epilogue(g, w, y, b_kn=True, tile=(32, 64, 32))):
        assert torch.equal(dh[y == 0], torch.zeros_like(dh[y == 0])) and (dh[y > 0] != 0).all()


@pytest.mark.parametrize("V", [50304, 640, 200])  # the padded vocabulary, another multiple of the block, neither
def test_blocked_logsumexp_is_logsumexp(V):
    """The PyTorch chunk's log-sum-exp, made from per-block maxima and sums, is torch.logsumexp's in float32,
    also for rows whose blocks have maxima far apart (blocks that underflow next to the largest)."""
    z = torch.randn(37, V) * torch.rand(37, 1) * 50
    z[:5, : V // 3] -= 200
    z[5:10, -7:] += 120
    expected = torch.logsumexp(z.double(), dim=-1)
    assert torch.allclose(fast_ops.blocked_logsumexp(z).double(), expected, rtol=1e-6, atol=0)


def test_fast_output_loss_chunks_that_do_and_do_not_divide_the_rows():
    """The same loss and gradients for chunks of 1 row, of sizes that do not divide N, of N and more (with the
    PyTorch chunk op: the kernel computes the same chunk op, test_fused_loss_kernel_matches_logit_loss_grad)."""
    chunk_loss = fast_ops.logit_loss_grad
    N, C, V = int(torch.randint(50, 300, ()).item()), 16, 200
    x, w, targets = torch.randn(N, C), torch.randn(V, C), torch.randint(0, V, (N,))
    results = []
    for chunk in (1, 7, int(torch.randint(8, N, ()).item()), N, 2 * N):
        xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fast_ops.fast_output_loss(xl, wl, targets, 30.0, 30.0, chunk=chunk, chunk_loss=chunk_loss)
        (loss * 0.7).backward()
        with torch.no_grad():
            evaluated = fast_ops.fast_output_loss(x, w, targets, 30.0, 30.0, chunk=chunk, chunk_loss=chunk_loss)
        assert torch.equal(evaluated, loss.detach())  # the same per-chunk sums, without the gradient work
        results.append((loss, xl.grad, wl.grad))
    for loss, dx, dw in results[1:]:
        assert loss.item() == pytest.approx(results[0][0].item(), rel=CHUNK_RTOL)
        assert relative_error(dx, results[0][1]) < CHUNK_RTOL and relative_error(dw, results[0][2]) < CHUNK_RTOL


# -----------------------------------------------------------------------------
# The start-up check, and an edited model


@pytest.mark.parametrize("capability", [H100, A100])
def test_start_up_check_passes_for_the_shipped_ops(capability):
    cfg = M.Config()
    assert M.fast_ops_errors(cfg, gpu_ops(M, cfg, capability), torch.device("cpu")) == []


def gelu(x):
    return F.gelu(x)


def test_edited_model_op_is_refused_with_fast_ops_and_named(monkeypatch):
    monkeypatch.setattr(M, "relu_square", gelu)  # the plain mlp calls it; the fused one squares in its kernel
    (problem,) = M.fast_ops_errors(M.Config(), gpu_ops(M, M.Config()), torch.device("cpu"))
    assert problem.startswith("the fast op for mlp no longer matches") and "--fast_ops=false" in problem


def test_edited_model_trains_with_plain_ops_and_autograd_gradients(shards, tmp_path, monkeypatch):
    """Swap ReLU^2 for GELU in the model section: with the plain ops the model's float32 gradients are float64
    autograd's through the edited forward, and the tiny run trains (its loss falls); where fast ops would run,
    the run is refused before its log exists."""
    monkeypatch.setattr(M, "relu_square", gelu)
    cfg = tiny_config(M, attn_window=int(torch.randint(8, 200, ()).item()))
    model = randomize(M.GPT(cfg))
    tokens = random_tokens(257, "mixed")
    inputs, targets = tokens[:-1], torch.randint(0, 50257, (256,))
    model(inputs, targets).backward()
    params = {name: p.detach().double().requires_grad_() for name, p in model.named_parameters()}
    reference_loss(model, inputs, targets, cfg, softcap=True, params=params, activation=gelu).backward()
    for name, p in model.named_parameters():
        assert relative_error(p.grad, params[name].grad) < 1e-5, name
    train, val = shards
    result = M.main(tiny_args(train, val, tmp_path / "logs", num_iterations=8, val_loss_every=0, val_tokens=1024,
                              warmup_compile_steps=0, fast_ops=False))
    assert result["train_losses"][-1] < result["train_losses"][0] - 1.0
    h100 = fast_ops.choose(NAMES, "cuda", H100, True, True)
    monkeypatch.setattr(fast_ops, "choose", lambda *args: h100)  # as on an H100, the kernels interpreted
    with pytest.raises(M.ConfigError, match="the fast op for mlp no longer matches"):
        M.main(tiny_args(train, val, tmp_path / "refused", num_iterations=2, val_tokens=1024))
    assert not (tmp_path / "refused").exists()


def test_script_alone_in_an_empty_folder_trains_with_the_plain_ops(shards, tmp_path):
    """train_gpt_M.py copied without fast_ops.py: it trains and its log says why the plain ops ran."""
    shutil.copy(M.__file__, tmp_path / "train_gpt_M.py")
    train, val = shards
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "train_gpt_M.py", *tiny_args(train, val, tmp_path / "logs", num_iterations=2,
                                                                        val_loss_every=0, val_tokens=1024,
                                                                        warmup_compile_steps=0)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (log,) = (tmp_path / "logs").glob("*.txt")
    text = log.read_text()
    assert "\nfast_ops: plain (fast_ops.py not found beside the script)\n" in text
    assert "=== source: fast_ops.py ===" not in text and "=== end of run ===" in text


def test_model_loss_does_not_depend_on_loss_chunk():
    """Through the whole model, with the PyTorch chunk op (the kernel's interpreter is too slow for 50,304 logits a
    row, one chunk at a time)."""
    cfgs = [tiny_config(M, loss_chunk=chunk) for chunk in (256, 100, 1)]
    model = randomize(M.GPT(cfgs[0]))
    tokens = random_tokens(257, "mixed")
    losses, grads = [], []
    for cfg in cfgs:
        loss_op = functools.partial(
            fast_ops.fast_output_loss, chunk=cfg.loss_chunk, chunk_loss=fast_ops.logit_loss_grad
        )
        chunked = M.GPT(cfg, {**plain_table(), "output_loss": loss_op})
        chunked.load_state_dict(model.state_dict())
        loss = chunked(tokens[:-1], tokens[1:])
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in chunked.parameters()]))
    assert losses[1] == pytest.approx(losses[0], rel=CHUNK_RTOL) and losses[2] == pytest.approx(
        losses[0], rel=CHUNK_RTOL
    )
    for g in grads[1:]:
        assert relative_error(g, grads[0]) < CHUNK_RTOL


# -----------------------------------------------------------------------------
# The kernels against their PyTorch definitions, under the Triton interpreter

# The fused loss kernel against logit_loss_grad in float64 (the PyTorch version of the same chunk op).
# Largest differences over 300 draws of each case below (CPU, triton 3.9): the loss 1.9e-5 relative to
# max(1, |loss|) (the kernel sums 4,096 float32 lanes: about sqrt(4096) x eps), the float32 gradient 1.0e-5
# of its row's largest |g| (rows of +-1e4 logits; 4e-7 otherwise); the bfloat16 gradient never more than one
# bfloat16 ulp from the float64 one rounded, beyond float32 dust (1e-37 of the row's largest |g|, in
# underflowing elements). Tolerances: 5x the float32 ones.
KERNEL_LOSS_RTOL, KERNEL_GRAD_RTOL = 1e-4, 5e-5


@pytest.mark.parametrize("softcap", [0.0, 30.0, 100.0])  # plain, the fixed-shift soft-cap, a cap above its limit
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("whole_blocks", [False, True])  # any width, or only whole blocks (no partial last one)
def test_fused_loss_kernel_matches_logit_loss_grad(softcap, dtype, whole_blocks):
    n, V = int(torch.randint(1, 5, ()).item()), int(torch.randint(1, 9000, ()).item())
    if whole_blocks:
        V = fast_ops.LOSS_BLOCK_V * int(torch.randint(1, 3, ()).item())
    logits = (torch.randn(n, V) * float(torch.empty(()).uniform_(0.5, 20))).to(dtype)
    logits[0, : min(3, V)] = 1e4 if softcap == 0 else 60.0  # far from the others: the running max must hold them
    targets = torch.randint(0, V, (n,))
    grad_scale, scale = float(torch.empty(()).uniform_(0.01, 1)), float(torch.empty(()).uniform_(5, 300))
    loss_k, grad_k = fast_ops.fused_logit_loss_grad(logits.clone(), targets, softcap, scale, grad_scale, True)
    loss_t, grad_t = fast_ops.logit_loss_grad(logits.double(), targets, softcap, scale, grad_scale, True)
    assert loss_k.dtype == torch.float32 and grad_k.dtype == dtype and grad_k.shape == logits.shape
    assert ((loss_k.double() - loss_t).abs() / loss_t.abs().clamp_min(1)).max() <= KERNEL_LOSS_RTOL
    rows_max = grad_t.abs().amax(1, keepdim=True).clamp_min(grad_scale * 1e-3)
    if dtype == torch.float32:
        assert ((grad_k.double() - grad_t).abs() / rows_max).max() <= KERNEL_GRAD_RTOL
    else:
        want = grad_t.to(dtype).double()
        assert ((grad_k.double() - want).abs() <= want.abs() * 2**-7 + 2**-22 * rows_max).all()


# The MLP's fused product kernel against its PyTorch path (matmul_relu_square and matmul_relu_square_grad
# without the kernel) on random shapes that the tiles do and do not divide. Largest relative differences
# (Frobenius) over 150 draws of each case (CPU, triton 3.9): float32 3.9e-7 (relu^2 of the product) and 1.9e-7
# (the hidden gradient); bfloat16 5.0e-5 and 1.9e-5 (a product summed in another order rounds to the
# neighbouring bfloat16 now and then). Tolerances: 5x those.
KERNEL_MLP_RTOL = {torch.float32: 2e-6, torch.bfloat16: 2.5e-4}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grad", [False, True])
def test_fused_mlp_kernel_matches_its_pytorch_path(dtype, grad):
    N = int(torch.randint(1, 200, ()).item())
    K, H = 8 * int(torch.randint(1, 12, ()).item()), 8 * int(torch.randint(1, 40, ()).item())  # 16-byte rows (TMA)
    tile = [(16, 32, 16), (32, 64, 32), (64, 64, 32), (32, 32, 64)][int(torch.randint(0, 4, ()).item())]
    a = (torch.randn(N, K) * float(torch.empty(()).uniform_(0.1, 5))).to(dtype)
    if grad:
        w_KH = torch.randn(K, H).to(dtype)
        y = torch.relu(torch.randn(N, H)).square().to(dtype)
        got = fast_ops.fused_matmul_epilogue(a, w_KH, y, b_kn=True, tile=tile)
        want = fast_ops.matmul_relu_square_grad(a, w_KH, y, kernel=False)
    else:
        w_HK = torch.randn(H, K).to(dtype)
        got = fast_ops.fused_matmul_epilogue(a, w_HK, None, b_kn=False, tile=tile)
        want = fast_ops.matmul_relu_square(a, w_HK, kernel=False)
    assert got.dtype == dtype and got.shape == (N, H)
    assert relative_error(got, want) < KERNEL_MLP_RTOL[dtype]


# qk_norm_rope's kernels against the plain op: the outputs against the plain op in the same dtype (the kernel
# rounds where it rounds), the input gradient against float64 autograd through the plain op; on random shapes
# whose tokens the block does and does not divide, the input a view with other columns beside it and the
# queries' gradient heads-major as attention leaves it. Largest relative differences (Frobenius) over 600 draws
# of each dtype (CPU, triton 3.9): float32 1.1e-7 (the outputs), 9.8e-8 (the inverse RMS), 9.0e-6 (the input
# gradient); bfloat16 6.9e-5 (an output rounded to the neighbouring bfloat16 now and then), 7.7e-8, 2.3e-3 (the
# gradient from the outputs rounded to bfloat16, and rounded itself). Tolerances: about 4x those.
KERNEL_NORM_ROPE_RTOL = {torch.float32: (5e-7, 4e-7, 4e-5), torch.bfloat16: (3e-4, 4e-7, 1e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norm_rope_kernels_match_the_plain_op(dtype):
    B, T, H = (
        int(torch.randint(1, 3, ()).item()),
        int(torch.randint(1, 80, ()).item()),
        int(torch.randint(1, 3, ()).item()),
    )
    D = [16, 32, 64][int(torch.randint(0, 3, ()).item())]
    block_t = [8, 16, 32][int(torch.randint(0, 3, ()).item())]
    qkv = (torch.randn(B, T, 3 * H * D) * float(torch.empty(()).uniform_(0.1, 10))).to(dtype)
    x = qkv[..., : 2 * H * D].view(B, T, 2 * H, D)  # the q/k columns of a wider product, as a view
    cos, sin = (t[:, :T].to(dtype) for t in M.rope_tables(T + 5, D, float(torch.empty(()).uniform_(10, 5000))))
    q, k, rinv = fast_ops.fused_norm_rope(x, cos, sin, block_t)
    assert q.shape == k.shape == (B, T, H, D) and q.dtype == k.dtype == dtype and rinv.shape == (B, T, 2 * H, 1)
    out_tol, rinv_tol, grad_tol = KERNEL_NORM_ROPE_RTOL[dtype]
    assert relative_error(torch.cat((q, k), dim=2), torch.cat(M.qk_norm_rope(x, cos, sin), dim=2)) < out_tol
    want_rinv = torch.rsqrt(x.float().square().mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)
    assert relative_error(rinv, want_rinv) < rinv_tol
    grad_q, grad_k = torch.randn(B, H, T, D).to(dtype).transpose(1, 2), torch.randn(B, T, H, D).to(dtype)
    dx = fast_ops.fused_norm_rope_grad(grad_q, grad_k, q, k, rinv, cos, sin, block_t)
    leaf = x.detach().double().requires_grad_()
    torch.autograd.backward(M.qk_norm_rope(leaf, cos.double(), sin.double()), (grad_q.double(), grad_k.double()))
    assert dx.shape == x.shape and dx.dtype == dtype
    assert relative_error(dx, leaf.grad) < grad_tol


# Newton-Schulz's Gram kernel against torch.bmm / torch.baddbmm in the same dtype, on random batches of whole
# tiles; the difference (Frobenius) relative to |beta| |C| + |alpha| |X X^T|, which cancellation between the
# two terms cannot shrink. Largest over 300 draws (CPU, triton 3.9): float32 1.8e-7 (X X^T) and 1.6e-7
# (beta C + alpha X X^T); bfloat16 2.9e-4 and 5.2e-5 (a sum in another order rounds to the neighbouring
# bfloat16 now and then). Tolerances: 5x the larger of each dtype, rounded up.
KERNEL_GRAM_RTOL = {torch.float32: 1e-6, torch.bfloat16: 1.5e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_c", [False, True])
def test_fused_gram_kernel_is_symmetric_and_matches_torch(dtype, with_c):
    """beta C + alpha X X^T from the tiles on and above the diagonal: exactly symmetric, and torch's product."""
    tile = [(16, 16), (32, 16), (16, 32)][int(torch.randint(0, 3, ()).item())]
    n, R = int(torch.randint(1, 4, ()).item()), tile[0] * int(torch.randint(1, 4, ()).item())
    K = 8 * int(torch.randint(1, 12, ()).item())
    X = (torch.randn(n, R, K) * float(torch.empty(()).uniform_(0.01, 2))).to(dtype)
    beta, alpha = float(torch.empty(()).uniform_(-5, 5)), float(torch.empty(()).uniform_(-5, 5))
    Y = torch.randn(n, R, K).to(dtype)
    C = torch.bmm(Y, Y.mT)  # symmetric
    gram = torch.bmm(X.double(), X.double().mT)
    if with_c:
        got, want = fast_ops.fused_gram(X, C, beta, alpha, tile=tile), torch.baddbmm(C, X, X.mT, beta=beta, alpha=alpha)
        scale = abs(beta) * C.double().norm() + abs(alpha) * gram.norm()
    else:
        got, want, scale = fast_ops.fused_gram(X, tile=tile), torch.bmm(X, X.mT), gram.norm()
    assert got.shape == (n, R, R) and got.dtype == dtype
    assert torch.equal(got, got.mT)
    assert ((got.double() - want.double()).norm() / scale).item() < KERNEL_GRAM_RTOL[dtype]


def test_gram_kernel_takes_only_whole_tiles_per_matrix():
    """A tile reaching into the next matrix of the batch would mix two matrices: those shapes go to the plain op."""
    assert fast_ops.gram_kernel_ready(torch.empty(3, 256, 64, dtype=torch.bfloat16), 128)
    assert not fast_ops.gram_kernel_ready(torch.empty(3, 200, 64, dtype=torch.bfloat16), 128)
    assert not fast_ops.gram_kernel_ready(torch.empty(3, 64, 256, dtype=torch.bfloat16).mT, 128)


def test_tensor_descriptor_rows_must_be_16_byte_multiples():
    """The fused products run only where TMA can read every tensor; elsewhere the PyTorch path runs."""
    assert fast_ops.tma_ready(torch.empty(5, 8, dtype=torch.bfloat16), torch.empty(3, 4))
    assert not fast_ops.tma_ready(torch.empty(5, 8, dtype=torch.bfloat16), torch.empty(5, 12, dtype=torch.bfloat16))
    assert not fast_ops.tma_ready(torch.empty(8, 16).T)


def test_output_layer_gradient_accumulates_unrounded_products():
    """d(loss)/dw sums the chunks' products in float32 without rounding each to the inputs' dtype first."""
    a, b = torch.randn(40, 300).bfloat16(), torch.randn(300, 24).bfloat16()
    acc = torch.randn(40, 24)
    expected = acc.double() + a.double() @ b.double()
    fast_ops.accumulate_product(acc, a, b)
    assert acc.dtype == torch.float32
    # float32 sums of 300 exact products: within a few float32 ulps of the float64 sum
    assert relative_error(acc, expected) < 1e-6

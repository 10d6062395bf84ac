"""What the compiled model body keeps from its forward for its backward, found on CPU, no GPU needed.

    python bench/memory.py [--script train_gpt_M.py] [--seq_len 512] [--model_dim 64] [--num_heads 2] [--plain]

The body is compiled with AOTAutograd and the min-cut partitioner that torch.compile also uses on
the GPU, without code generation: the forward graph's extra outputs are the tensors kept for the
backward. Views count once, through the tensor they view. Two small models (2 and 3 layers)
give the bytes one layer keeps; these are printed per tensor and in units of one T x model_dim
bfloat16 tensor, and scaled to the script's full configuration (activation memory only: the
parameters, optimizer state, output layer and loss come on top). --plain measures the model
section's plain ops (--fast_ops=false) instead of the fast ops.
"""
import argparse
import contextlib
import operator
import os
import sys

import torch
import torch.nn.functional as F
from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
from torch._dynamo.backends.common import aot_autograd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_script  # noqa: E402

import fast_ops  # noqa: E402

aten = torch.ops.aten
VIEWS = {aten.view.default, aten.transpose.int, aten.select.int, aten.detach.default, aten.t.default,
         aten.permute.default, aten._unsafe_view.default, aten.unsqueeze.default, aten.squeeze.dim,
         aten.slice.Tensor, aten.expand.default, aten.alias.default}


def gpu_ops(module, cfg) -> dict:
    """The script's ops as fast_ops.py chooses them for an H100, traced here on the CPU (see traceable_kernels)."""
    plain = {**module.plain_ops()._asdict(), **module.optimizer_ops()}
    choice = fast_ops.choose(list(plain), "cuda", (9, 0), True, True)
    return {**plain, **fast_ops.drop_ins(choice, plain, cfg.loss_chunk)}


def norm_rope_stand_in(qk_BTND, cos, sin, block_t=None):
    x = qk_BTND.float()
    rinv_BTN1 = torch.rsqrt(x.square().mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)
    x1, x2 = (x * rinv_BTN1).chunk(2, dim=-1)
    y = torch.cat((x1 * cos + x2 * sin, -x1 * sin + x2 * cos), dim=-1).type_as(qk_BTND)
    q_BTHD, k_BTHD = (t.contiguous() for t in y.chunk(2, dim=2))
    return q_BTHD, k_BTHD, rinv_BTN1


def norm_rope_grad_stand_in(grad_q, grad_k, q_BTHD, k_BTHD, rinv_BTN1, cos, sin, block_t=None):
    return (torch.cat((grad_q, grad_k), dim=2) * rinv_BTN1 + torch.cat((q_BTHD, k_BTHD), dim=2)).type_as(q_BTHD)


def matmul_epilogue_stand_in(a, b, y, b_kn, tile=None, num_warps=None, num_stages=None):
    product = a @ (b if b_kn else b.T)
    return F.relu(product).square() if y is None else (2 * y.float().sqrt() * product.float()).type_as(a)


@contextlib.contextmanager
def traceable_kernels():
    """fast_ops.py's kernels run on a GPU or under Triton's interpreter, neither of which the compiler traces on
    the CPU: for the trace they become PyTorch stand-ins with the same outputs. What the backward keeps is what the
    drop-ins save for it, which stays as it is."""
    stand_ins = {"fused_norm_rope": norm_rope_stand_in, "fused_norm_rope_grad": norm_rope_grad_stand_in,
                 "fused_matmul_epilogue": matmul_epilogue_stand_in}
    originals = {name: getattr(fast_ops, name) for name in stand_ins}
    try:
        for name, fn in stand_ins.items():
            setattr(fast_ops, name, fn)
        yield
    finally:
        for name, fn in originals.items():
            setattr(fast_ops, name, fn)


def kept_tensors(
    module, num_layers: int, seq_len: int, model_dim: int, num_heads: int, fast_ops: bool = True
) -> dict[str, torch.Tensor]:
    """The distinct non-input tensors (fake, shapes and dtypes only) that the compiled body of a
    bfloat16 `module.GPT` keeps for its backward, by graph node name."""
    torch._dynamo.reset()
    cfg = module.parse_config(["--preset=tiny", f"--model_dim={model_dim}", f"--num_heads={num_heads}",
                               f"--num_layers={num_layers}", f"--seq_len={seq_len}"])
    model = module.GPT(cfg, gpu_ops(module, cfg) if fast_ops else None).to(torch.bfloat16)
    kept: dict[str, torch.Tensor] = {}

    def forward_compiler(gm, example_inputs):
        for node in next(n for n in gm.graph.nodes if n.op == "output").args[0]:
            while isinstance(node, torch.fx.Node):
                if node.target in VIEWS:
                    node = node.args[0]
                elif node.target is operator.getitem and node.args[0].target is aten.unbind.int:
                    node = node.args[0].args[0]
                else:
                    break
            if isinstance(node, torch.fx.Node) and node.op != "placeholder":
                kept[node.name] = node.meta["val"]
        return make_boxed_func(gm)

    backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=lambda gm, _: make_boxed_func(gm),
                           partition_fn=min_cut_rematerialization_partition)
    tokens = torch.randint(0, cfg.eot_token, (seq_len,))
    tokens[torch.randint(0, seq_len, (max(seq_len // 64, 1),))] = cfg.eot_token
    cos, sin = model.rope_cos, model.rope_sin
    with traceable_kernels():
        torch.compile(model.body, backend=backend, dynamic=False)(tokens, cos, sin).float().sum().backward()
    return kept


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def per_layer_bytes(module, seq_len: int, model_dim: int, num_heads: int, fast_ops: bool = True) -> int:
    """Bytes one layer keeps: the 3-layer body's minus the 2-layer body's."""
    sizes = [nbytes(kept_tensors(module, n, seq_len, model_dim, num_heads, fast_ops).values()) for n in (2, 3)]
    return sizes[1] - sizes[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", default="train_gpt_M.py", help="path from the repository root")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--model_dim", type=int, default=64)
    parser.add_argument("--num_heads", type=int, default=2)
    parser.add_argument("--plain", action="store_true", help="the plain ops (--fast_ops=false)")
    args = parser.parse_args()
    module = load_script(args.script, "bench_memory_" + os.path.splitext(os.path.basename(args.script))[0])
    unit = args.seq_len * args.model_dim * 2
    small, large = (
        kept_tensors(module, n, args.seq_len, args.model_dim, args.num_heads, not args.plain) for n in (2, 3)
    )
    print(
        f"{args.script} ({'plain' if args.plain else 'fast'} ops), torch {torch.__version__}: T={args.seq_len}, "
        f"model_dim={args.model_dim}, {args.num_heads} heads; unit = one T x model_dim bfloat16 tensor ({unit:,} bytes)"
    )
    print("tensors kept by the 3-layer body and not by the 2-layer one (one layer's):")
    counts_small: dict[tuple, int] = {}
    for t in small.values():
        counts_small[(tuple(t.shape), t.dtype)] = counts_small.get((tuple(t.shape), t.dtype), 0) + 1
    counts_large: dict[tuple, int] = {}
    for t in large.values():
        counts_large[(tuple(t.shape), t.dtype)] = counts_large.get((tuple(t.shape), t.dtype), 0) + 1
    for (shape, dtype), count in sorted(counts_large.items(), key=lambda kv: -kv[1]):
        extra = count - counts_small.get((shape, dtype), 0)
        if extra:
            size = extra * torch.Size(shape).numel() * dtype.itemsize
            print(f"  {extra} x {str(list(shape)):22s} {str(dtype).replace('torch.', ''):9s} {size / unit:6.2f} units")
    layer = nbytes(large.values()) - nbytes(small.values())
    cfg = module.Config()
    full = layer / unit * cfg.seq_len * cfg.model_dim * 2 * cfg.num_layers
    print(f"per layer: {layer / unit:.2f} units; at the full configuration ({cfg.num_layers} layers, "
          f"{cfg.seq_len:,} tokens, width {cfg.model_dim}): {full / 2**30:.1f} GiB of block activations")


if __name__ == "__main__":
    main()

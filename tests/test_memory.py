"""Issue 4, peak memory: what the compiled model body keeps from its forward for its backward.

The body is compiled on CPU with AOTAutograd and the min-cut partitioner that torch.compile uses
on the GPU too, but without code generation; the forward graph's extra outputs are the tensors it
keeps. Views are counted once, through the tensor they view.
"""
import operator

import pytest
import torch
from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
from torch._dynamo.backends.common import aot_autograd

from conftest import load_script

T, DIM, HEADS = 512, 64, 2
aten = torch.ops.aten
VIEWS = {aten.view.default, aten.transpose.int, aten.select.int, aten.detach.default, aten.t.default,
         aten.permute.default, aten._unsafe_view.default, aten.unsqueeze.default, aten.squeeze.dim,
         aten.slice.Tensor, aten.expand.default, aten.alias.default}


def kept_activation_bytes(module, num_layers: int) -> int:
    """Bytes of the distinct non-input tensors the compiled body's forward keeps for its backward."""
    torch._dynamo.reset()
    cfg = module.parse_config(["--preset=tiny", f"--model_dim={DIM}", f"--num_heads={HEADS}",
                               f"--num_layers={num_layers}", f"--seq_len={T}"])
    model = module.GPT(cfg).to(torch.bfloat16)
    kept: list[int] = []

    def forward_compiler(gm, example_inputs):
        outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        bases = {}
        for node in outputs:
            while isinstance(node, torch.fx.Node):
                if node.target in VIEWS:
                    node = node.args[0]
                elif node.target is operator.getitem and node.args[0].target is aten.unbind.int:
                    node = node.args[0].args[0]
                else:
                    break
            if isinstance(node, torch.fx.Node) and node.op != "placeholder":
                bases[node.name] = node.meta["val"]
        kept.append(sum(v.numel() * v.element_size() for v in bases.values()))
        return make_boxed_func(gm)

    backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=lambda gm, _: make_boxed_func(gm),
                           partition_fn=min_cut_rematerialization_partition)
    tokens = torch.randint(0, module.EOT_TOKEN, (T,))
    tokens[torch.randint(0, T, (8,))] = module.EOT_TOKEN
    rope = module.rope_tables(T, DIM // HEADS, cfg.rope_base, tokens.device)
    torch.compile(model.body, backend=backend, dynamic=False)(tokens, rope).float().sum().backward()
    return kept[0]


@pytest.mark.parametrize("baseline", ["A", "M"])
def test_each_layer_keeps_outputs_not_inputs(baseline):
    """Per layer the backward keeps, in T x dim bfloat16 units: the normalised inputs of the qkv and
    MLP products (2), the rotated q and k and v (3), the attention output (1; 2 where the kernel's
    layout makes the projection's input a copy) and ReLU^2's output (4), plus per-row float32
    statistics: 10.25 units here. Not the pre-norm residual stream, q and k before their norm, or
    the MLP's pre-activation, which the plain ops' backward needs (18.25 units with those)."""
    module = load_script(baseline)
    per_layer = kept_activation_bytes(module, 3) - kept_activation_bytes(module, 2)
    unit = T * DIM * 2
    assert per_layer <= 11.5 * unit, per_layer / unit

"""Peak memory: what the compiled model body keeps from its forward for its backward, through
bench/memory.py (the compiler's min-cut partitioner on CPU, without code generation), with the fast
ops and with the model section's plain ops."""
import os
import sys

import pytest

from conftest import ROOT, load_script

sys.path.insert(0, os.path.join(ROOT, "bench"))
import memory  # noqa: E402

T, DIM, HEADS = 512, 64, 2


@pytest.mark.parametrize("baseline", ["A", "M"])
def test_fast_ops_keep_outputs_not_inputs(baseline):
    """Per layer the backward keeps, in T x dim bfloat16 units: the normalised inputs of the qkv and
    MLP products (2), the rotated q and k and v (3), the attention output (1; 2 where the kernel's
    layout makes the projection's input a copy) and ReLU^2's output (4), plus per-row float32
    statistics: 10.25 units here. Not the pre-norm residual stream, q and k before their norm, or
    the MLP's pre-activation, which the plain ops' backward needs."""
    per_layer = memory.per_layer_bytes(load_script(baseline), T, DIM, HEADS)
    assert per_layer <= 10.5 * T * DIM * 2, per_layer / (T * DIM * 2)


def test_plain_ops_keep_their_inputs_too():
    """What the fast ops save: the plain ops' backward keeps the pre-norm residual stream (2), q and
    k before their norm (2) and the MLP's pre-activation (4) as well: 18.25 units."""
    per_layer = memory.per_layer_bytes(load_script("M"), T, DIM, HEADS, fast_ops=False)
    assert per_layer >= 18 * T * DIM * 2, per_layer / (T * DIM * 2)


def test_memory_tool_prints_per_layer_and_full_size(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["memory.py", "--script", "train_gpt_A.py", "--seq_len", "256"])
    memory.main()
    out = capsys.readouterr().out
    assert "per layer:" in out and "GiB of block activations" in out
    assert "[256, 256]" in out  # ReLU^2's output, T x 4 * dim

"""bench/: the synthetic shards, the FLOP count behind MFU, and the speed table end to end (tiny, CPU)."""
import importlib.util
import os
import sys

import numpy as np
import pytest

from conftest import ROOT, load_script

sys.path.insert(0, os.path.join(ROOT, "bench"))
import synthetic  # noqa: E402


def load_speed():
    spec = importlib.util.spec_from_file_location("bench_speed", os.path.join(ROOT, "bench", "speed.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_synthetic_shards_are_read_by_the_scripts(tmp_path):
    seed = int(np.random.default_rng().integers(1 << 30))
    train, val = synthetic.write_synthetic(str(tmp_path), 250_000, 70_000, seed)
    A = load_script("A")
    files = A.find_shards(train)
    assert [A.shard_token_count(f) for f in files] == [250_000]
    assert A.shard_token_count(A.find_shards(val)[0]) == 70_000
    tokens = np.asarray(A.load_shard(files[0]))
    starts = np.flatnonzero(tokens == synthetic.EOT_TOKEN)
    assert starts[0] == 0 and tokens.max() <= synthetic.EOT_TOKEN
    assert 450 < np.diff(starts).mean() < 900  # log-normal(6, 1) + 1 has mean ~670


def test_mean_keys_per_query_counts_the_mask():
    """Against the script's own dense mask (document, causal, window), summed over rows."""
    speed = load_speed()
    A = load_script("A")
    import torch

    rng = np.random.default_rng()
    for window in (1, 17, 64, 1000):
        tokens = rng.integers(0, 100, 300).astype(np.int64)
        tokens[rng.choice(300, 12, replace=False)] = synthetic.EOT_TOKEN
        docs = A.document_ids(torch.from_numpy(tokens))
        expected = A.dense_mask(docs, window).sum(1).double().mean().item()
        assert speed.mean_keys_per_query(tokens, window) == pytest.approx(expected)


def test_flops_per_token_formula():
    speed = load_speed()
    cfg = dict(model_dim=768, num_layers=12, mlp_ratio=4, vocab_size=50257)
    params = 12 * 12 * 768 * 768 + 50304 * 768  # qkv + attention out + MLP in + MLP out; padded output layer
    assert speed.flops_per_token(cfg, 0.0) == 6 * params
    assert speed.flops_per_token(cfg, 400.0) - speed.flops_per_token(cfg, 0.0) == pytest.approx(12 * 12 * 768 * 400)


def test_speed_table_runs_tiny_on_cpu(capsys):
    rows = load_speed().main(["--tiny", "--steps=3", "--skip=1"])
    assert [r["script"] for r in rows] == ["train_gpt_A.py", "train_gpt_M.py"]
    for r in rows:
        assert r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 and r["mfu"] is None
        assert r["tokens_per_s"] == pytest.approx(128 / (r["ms_per_step"] / 1000))
    out = capsys.readouterr().out
    assert "| script | ms per step | tokens per s | MFU | peak memory allocated |" in out
    assert out.count("| train_gpt_") == 2

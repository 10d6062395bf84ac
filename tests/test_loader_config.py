"""SPEC 'Data' and 'Batch and schedule': the shard format, the loader, the configuration and the
early refusals of bad input."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, learnable_tokens, load_script, write_shard

CPU = torch.device("cpu")


def random_tokens(n: int) -> np.ndarray:
    return np.random.default_rng().integers(0, 50257, n).astype(np.uint16)


def test_shard_round_trip(script, tmp_path):
    tokens = random_tokens(12_345)
    write_shard(tmp_path / "s.bin", tokens)
    assert script.shard_token_count(str(tmp_path / "s.bin")) == len(tokens)
    assert np.array_equal(np.asarray(script.load_shard(str(tmp_path / "s.bin"))), tokens)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_rank_slices_cover_the_step_window_at_any_world_size(script, tmp_path, world_size):
    seq_len, micro = 16, 8
    tokens = random_tokens(5 * micro * seq_len + 7)
    write_shard(tmp_path / "t_000001.bin", tokens)
    loaders = [script.TrainLoader(str(tmp_path / "t_*.bin"), micro * seq_len, seq_len, r, world_size, CPU) for r in range(world_size)]
    for step in range(3):
        seen = {}
        for rank, loader in enumerate(loaders):
            batches = loader.next_step()
            assert len(batches) == micro // world_size
            for a, (inputs, targets) in enumerate(batches):
                start = step * micro * seq_len + (a * world_size + rank) * seq_len
                assert torch.equal(inputs, torch.from_numpy(tokens[start : start + seq_len].astype(np.int64)))
                assert torch.equal(targets, torch.from_numpy(tokens[start + 1 : start + seq_len + 1].astype(np.int64)))
                seen[start] = True
        assert sorted(seen) == [step * micro * seq_len + i * seq_len for i in range(micro)]


def test_loader_moves_to_next_shard_when_window_does_not_fit(script, tmp_path):
    seq_len, batch = 8, 16
    first, second = random_tokens(2 * batch + batch), random_tokens(3 * batch + 1)
    write_shard(tmp_path / "t_000001.bin", first)
    write_shard(tmp_path / "t_000002.bin", second)
    loader = script.TrainLoader(str(tmp_path / "t_*.bin"), batch, seq_len, 0, 1, CPU)
    assert loader.capacity() == (len(first) - 1) // batch + (len(second) - 1) // batch == 2 + 3
    starts = []
    for _ in range(5):
        inputs, _ = loader.next_step()[0]
        shard = first if loader.file_index == 0 else second
        starts.append((loader.file_index, int(np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(shard, seq_len) == inputs.numpy(), axis=1))[0])))
    assert starts == [(0, 0), (0, batch), (1, 0), (1, batch), (1, 2 * batch)]
    with pytest.raises(script.DataError, match="exhausted"):
        loader.next_step()


def test_validation_batches_are_world_size_invariant(script, tmp_path):
    tokens = random_tokens(4 * 32 + 1)
    write_shard(tmp_path / "v_000000.bin", tokens)
    pattern = str(tmp_path / "v_*.bin")
    single = [x for x, _ in script.validation_batches(pattern, 128, 32, 0, 1, CPU)]
    pairs = [list(script.validation_batches(pattern, 128, 32, r, 2, CPU)) for r in range(2)]
    interleaved = [pairs[r][b][0] for b in range(2) for r in range(2)]
    assert len(single) == 4 and all(torch.equal(a, b) for a, b in zip(single, interleaved))


def test_missing_files_name_pattern_and_download_command(script, tmp_path):
    with pytest.raises(script.DataError) as e:
        script.find_shards(str(tmp_path / "nothing_*.bin"))
    assert "nothing_*.bin" in str(e.value) and "cached_fineweb10B.py" in str(e.value)


@pytest.mark.parametrize(
    "kind, kwargs, truncate, message",
    [
        ("magic", dict(magic=1234), 0, "magic number 1234"),
        ("version", dict(version=7), 0, "version 7"),
        ("size", dict(), 10, "bytes, but its header"),
        ("count", dict(count=999), 0, "999 tokens"),
    ],
)
def test_bad_shard_errors_name_file_and_problem(script, tmp_path, kind, kwargs, truncate, message):
    path = tmp_path / f"bad_{kind}.bin"
    write_shard(path, random_tokens(100), **kwargs)
    if truncate:
        os.truncate(path, os.path.getsize(path) - truncate)
    with pytest.raises(script.DataError) as e:
        script.shard_token_count(str(path))
    assert str(path) in str(e.value) and message in str(e.value)


def test_overrides_types_and_preset(script):
    cfg = script.parse_config(["--preset=tiny", "--num_iterations=300", "--val_tokens=2_097_152", "--tied_embed=false",
                               "--attn_scale=0.2", "--train_files=data/dev/wiki_train_*.bin"])
    assert cfg.num_iterations == 300 and cfg.val_tokens == 2_097_152 and cfg.tied_embed is False
    assert cfg.attn_scale == 0.2 and cfg.train_files == "data/dev/wiki_train_*.bin"
    assert cfg.model_dim == script.PRESETS["tiny"]["model_dim"]
    assert script.parse_config([]) == script.Config()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--no_such_field=1"], "unknown field --no_such_field"),
        (["--num_iterations=abc"], "--num_iterations: expected int"),
        (["--num_iterations=1.5"], "--num_iterations: expected int"),
        (["--attn_scale=x"], "--attn_scale: expected float"),
        (["--tied_embed=maybe"], "--tied_embed: expected a boolean"),
        (["--preset=huge"], "unknown preset"),
        (["num_iterations=3"], "--field=value"),
        (["--seq_len=-4"], "must not be negative"),
        (["--param_dtype=float16"], "bfloat16 or float32"),
        (["--num_heads=5"], "heads"),
        (["--activation_budget=1.5"], "fraction in"),
        (["--activation_budget=0"], "fraction in"),
        (["--loss_chunk=0"], "loss_chunk must be positive"),
    ],
)
def test_override_errors(script, args, message):
    with pytest.raises(script.ConfigError, match=message):
        script.parse_config(args)


def test_world_size_that_cannot_keep_global_batch_is_refused_with_valid_sizes(script):
    cfg = script.parse_config([])
    assert [script.accumulation_steps(cfg, n) for n in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(script.ConfigError) as e:
        script.accumulation_steps(cfg, 3)
    assert "world sizes that can: 1, 2, 4, 8" in str(e.value)


def test_val_tokens_not_multiple_of_batch_refused_with_nearest_values(script):
    cfg = script.parse_config(["--val_tokens=1000000"])
    script.check_val_tokens(script.parse_config([]), 8)
    with pytest.raises(script.ConfigError) as e:
        script.check_val_tokens(cfg, 2)
    assert "917504, 1048576" in str(e.value)


def tiny_args(shards, tmp_path, *extra):
    train, val = shards
    return ["--preset=tiny", f"--train_files={train}", f"--val_files={val}", f"--log_dir={tmp_path / 'logs'}",
            "--warmup_compile_steps=0", "--val_tokens=1024", *extra]


def run_main(script, shards, tmp_path, *extra):
    return script.main(tiny_args(shards, tmp_path, *extra))


def test_not_enough_training_tokens_refused_before_training(script, shards, tmp_path):
    with pytest.raises(script.DataError, match=r"enough tokens for \d+ steps.*num_iterations=100000"):
        run_main(script, shards, tmp_path, "--num_iterations=100000")
    assert not (tmp_path / "logs").exists()


def test_nan_loss_stops_with_step_number(script, shards, tmp_path):
    lr = "--adam_lr=1e30" if script.BASELINE == "A" else "--muon_lr=1e38"
    with pytest.raises(FloatingPointError, match=r"at step \d+"):
        run_main(script, shards, tmp_path, "--num_iterations=10", "--val_loss_every=0", lr)
    (log,) = (tmp_path / "logs").iterdir()
    text = log.read_text()
    assert "stopped: loss is nan at step" in text or "stopped: loss is inf at step" in text
    assert text.rstrip().endswith("=== end of run ===")


def test_log_holds_source_config_and_versions(script, shards, tmp_path):
    args = tiny_args(shards, tmp_path, "--num_iterations=2", "--val_loss_every=1", "--seed=5")
    text = open(script.main(args)["log_path"]).read()
    with open(script.__file__) as f:
        assert f.read().rstrip() in text
    config = json.loads(next(line for line in text.splitlines() if line.startswith("config: "))[len("config: "):])
    assert config == dataclasses.asdict(script.parse_config(args))
    assert config["seed"] == 5 and config["num_iterations"] == 2
    for key in ("python: ", "torch: ", "device: cpu", "world_size: 1", "grad_accum_steps: 8", "baseline: " + script.BASELINE):
        assert key in text
    assert "step:1/2 val_loss:" in text and "step:2/2 train_time:" in text


def test_cli_errors_exit_2_with_message(tmp_path):
    for args, message in ((["--bogus=1"], "unknown field --bogus"), (["--preset=tiny", f"--train_files={tmp_path}/x_*.bin"], "no data files match")):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_gpt_M.py"), *args], capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_same_seed_same_initial_weights_and_different_seed_differs(script):
    cfg = script.parse_config(["--preset=tiny", "--seed=3"])
    weights = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        weights.append(script.GPT(cfg).state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not torch.equal(weights[0]["blocks.0.attn.qkv_w"], weights[2]["blocks.0.attn.qkv_w"])


def test_importing_does_nothing_heavy():
    code = ("import importlib.util, sys, torch\n"
            f"for n in 'AM':\n"
            f"    s = importlib.util.spec_from_file_location('m' + n, r'{ROOT}/train_gpt_' + n + '.py')\n"
            "    m = importlib.util.module_from_spec(s); s.loader.exec_module(m)\n"
            "import torch.distributed as dist\n"
            "assert not dist.is_initialized()\n"
            "assert not torch.cuda.is_initialized()\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "ok", proc.stderr


def test_learnable_fixture_data_is_valid(tmp_path):
    rng = np.random.default_rng()
    tokens = learnable_tokens(1000, rng)
    write_shard(tmp_path / "x.bin", tokens)
    assert load_script("A").shard_token_count(str(tmp_path / "x.bin")) == 1000 and tokens[0] == 50256

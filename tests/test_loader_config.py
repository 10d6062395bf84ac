"""SPEC 'Data' and 'Batch and schedule': the shard format, the loader, the configuration and the
early refusals of bad input."""
import dataclasses
import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, SMALL_EOT, learnable_tokens, load_script, run_cli, tiny_args, write_shard

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
    loaders = [
        script.TrainLoader(str(tmp_path / "t_*.bin"), micro * seq_len, seq_len, r, world_size, CPU)
        for r in range(world_size)
    ]
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
    files = loader.files
    assert [loader.files_for(n) for n in (1, 2, 3, 5, 6)] == [files[:1], files[:1], files, files, []]  # 2 + 3 steps
    starts = []
    for _ in range(5):
        inputs, _ = loader.next_step()[0]
        shard = first if loader.file_index == 0 else second
        starts.append(
            (
                loader.file_index,
                int(
                    np.flatnonzero(
                        np.all(np.lib.stride_tricks.sliding_window_view(shard, seq_len) == inputs.numpy(), axis=1)
                    )[0]
                ),
            )
        )
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
        (["--num_iterations=abc"], "--num_iterations: invalid int value: 'abc'"),
        (["--num_iterations=1.5"], "--num_iterations: invalid int value"),
        (["--attn_scale=x"], "--attn_scale: invalid float value"),
        (["--tied_embed=maybe"], "--tied_embed: expected true or false, got 'maybe'"),
        (["--preset=huge"], "--preset='huge': choose one of '', 'tiny'"),
        (["num_iterations=3"], "--field=value"),
        (["--seq_len=-4"], r"--seq_len=-4 is out of range: must be > 0"),
        (["--param_dtype=float16"], "--param_dtype='float16': choose one of 'bfloat16', 'float32'"),
        (["--num_heads=5"], "must split into --num_heads=5 heads"),
        (["--activation_budget=1.5"], r"out of range: must be in \(0, 1\]"),
        (["--activation_budget=0"], r"out of range: must be in \(0, 1\]"),
        (["--loss_chunk=0"], "--loss_chunk=0 is out of range"),
        (["--model_dim=0"], "--model_dim=0 is out of range: must be > 0"),
        (["--adam_beta1=1.5"], r"--adam_beta1=1.5 is out of range: must be in \[0, 1\)"),
        (["--attn_window=0"], "--attn_window=0 is out of range: must be > 0"),
        (["--batch_tokens=1000"], "--batch_tokens=1000 is not a multiple of --seq_len=65536"),
        (["--eot_token=600", "--vocab_size=512"], "--eot_token=600 is not below --vocab_size=512"),
    ],
)
def test_override_errors(script, args, message):
    with pytest.raises(script.ConfigError, match=message):
        script.parse_config(args)


def test_every_wrong_field_gets_its_own_message(script):
    with pytest.raises(script.ConfigError) as e:
        script.parse_config(["--model_dim=0", "--adam_beta1=1.5", "--attn_window=0", "--cooldown_frac=2"])
    lines = str(e.value).splitlines()
    assert len(lines) == 4 and all(" is out of range: must be " in line for line in lines)
    assert sorted(line.split("=")[0] for line in lines) == [
        "--adam_beta1",
        "--attn_window",
        "--cooldown_frac",
        "--model_dim",
    ]


def test_every_number_field_has_a_range_and_every_field_its_help(script):
    fields = {f.name: f.type for f in dataclasses.fields(script.Config)}
    assert {name for name, kind in fields.items() if kind in (int, float)} == set(script.LIMITS)
    assert {name for name, kind in fields.items() if kind is str and name in script.CHOICES} == set(script.CHOICES)
    helps = script.field_help()
    assert set(helps) == set(fields) and all(text for _, text in helps.values())
    assert all(script.in_limits(getattr(script.Config(), name), rule) for name, rule in script.LIMITS.items())


def test_help_lists_every_field_with_default_and_range(script, capsys):
    with pytest.raises(SystemExit) as e:
        script.parse_config(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(script.Config):
        assert f"--{f.name} " in out
    assert "tokens per forward pass, per process; a multiple of 128 (flex-attention's tile) (default 65536; > 0)" in out
    assert "model:" in out


def test_world_size_that_cannot_keep_global_batch_is_refused_with_valid_sizes(script):
    cfg = script.parse_config([])
    assert [script.world_size_errors(cfg, n) for n in (1, 2, 4, 8)] == [[]] * 4
    (message,) = script.world_size_errors(cfg, 3)
    assert "world sizes that can: 1, 2, 4, 8" in message and "?" not in message


@pytest.mark.parametrize("world, val_tokens", [(16, 10_485_760), (32, 10_485_760), (3, 10_485_760), (16, 1_000_000)])
def test_refusal_of_a_world_size_names_ways_out_that_work_as_written(script, world, val_tokens):
    """Every way out the refusal names passes every check at that world size, validation included: the shorter
    sequence keeps the global batch, the larger batch one 65,536-token sequence per process."""
    cfg = script.parse_config([f"--val_tokens={val_tokens}"])
    (message,) = script.world_size_errors(cfg, world)
    fixes = [way.split() for way in re.findall(r"((?:--\w+=\d+ ?)+) \(", message.split(" use ", 1)[1])]
    assert fixes and all(arg.startswith("--") for fix in fixes for arg in fix), message
    for fix in fixes:
        fixed = script.parse_config([f"--val_tokens={val_tokens}", *fix])
        assert script.world_size_errors(fixed, world) == [], (fix, message)
    if world in (16, 32):
        assert any(f"--seq_len={524_288 // world}" in fix for fix in fixes)


def test_readme_multi_node_command_runs_as_written():
    """The README's 2-node command: run.sh starts 2 x 8 processes, and the script accepts 16 of them
    with the arguments it gives (one sequence each, the global batch and validation kept)."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    (line,) = [ln.strip() for ln in readme.splitlines() if ln.strip().startswith("NNODES=2 ")]
    env = dict(kv.split("=", 1) for kv in line.split()[:3])
    args = line.split("./run.sh M", 1)[1].split()
    proc = subprocess.run(["bash", os.path.join(ROOT, "run.sh"), "M", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **env, "RUN_SH_DRY": "1", "NGPU": "8"}, timeout=120)
    launch = [ln for ln in proc.stdout.splitlines() if "torch.distributed.run" in ln or " torchrun " in ln]
    assert (
        launch and "--nnodes=2" in launch[-1] and "--nproc_per_node=8" in launch[-1] and args[0] in launch[-1]
    ), proc.stdout
    M = load_script("M")
    cfg = M.parse_config(args)
    assert M.world_size_errors(cfg, 16) == [] and cfg.batch_tokens == 524_288 and cfg.seq_len * 16 == 524_288


def test_val_tokens_not_multiple_of_batch_refused_with_nearest_values(script):
    assert script.world_size_errors(script.parse_config([]), 8) == []
    (message,) = script.world_size_errors(script.parse_config(["--val_tokens=1000000"]), 2)
    assert "917504, 1048576" in message


def run_args(shards, tmp_path, **fields) -> list[str]:
    train, val = shards
    return tiny_args(train, val, tmp_path / "logs", warmup_compile_steps=0, val_tokens=1024, **fields)


def refused_before_log(script, shards, tmp_path, error, **fields) -> str:
    """The message of a run refused with `error`, after checking that it left no log behind."""
    with pytest.raises(error) as e:
        script.main(run_args(shards, tmp_path, **fields))
    assert not (tmp_path / "logs").exists()
    return str(e.value)


def test_not_enough_training_tokens_refused_before_training(script, shards, tmp_path):
    message = refused_before_log(script, shards, tmp_path, script.DataError, num_iterations=100000)
    assert re.search(r"enough tokens for \d+ steps.*num_iterations=100000", message)


def test_vocab_smaller_than_the_data_is_refused_with_the_token_and_file(script, shards, tmp_path):
    message = refused_before_log(script, shards, tmp_path, script.DataError, vocab_size=100, eot_token=99)
    largest = max(int(np.fromfile(path, dtype="<u2", offset=1024).max()) for path in glob.glob(shards[0]))
    assert f"--vocab_size=100 is too small for the data: token id {largest}" in message
    assert f"use --vocab_size={largest + 1} or more" in message


def test_folder_as_training_files_is_refused(script, shards, tmp_path):
    folder = tmp_path / "shards_dir"
    folder.mkdir()
    message = refused_before_log(script, (str(folder), shards[1]), tmp_path, script.DataError)
    assert "is not a file: give a glob of shard files" in message


def test_nan_loss_stops_with_one_line_and_exit_1(script, shards, tmp_path):
    lr = "--adam_lr=1e30" if script.BASELINE == "A" else "--muon_lr=1e38"
    code, out, err = run_cli(script.__file__, [*run_args(shards, tmp_path, num_iterations=10, val_loss_every=0), lr])
    assert code == 1
    (line,) = err.strip().splitlines()
    assert re.fullmatch(r"error: training loss became (nan|inf) at step \d+; the run diverged.*", line), line
    (log,) = (tmp_path / "logs").glob("*.txt")
    text = log.read_text()
    assert re.search(r"\nstopped: loss is (nan|inf) at step \d+\n=== end of run ===\n$", text)
    assert out.rstrip().endswith(f"log: {log}")


def test_step_lines_show_training_loss_and_lr_multiplier(script, shards, tmp_path, capsys):
    """A run that diverges without a NaN shows it: each step line carries that step's training loss and
    learning-rate multiplier, between the step and the timing fields; the run ends naming its log."""
    result = script.main(run_args(shards, tmp_path, num_iterations=6, val_loss_every=3))
    lines = Path(result["log_path"]).read_text().split("=== training ===\n")[1].splitlines()
    steps = [
        re.fullmatch(r"step:(\d+)/6 train_loss:(\S+) lr_mult:(\S+) train_time:\d+ms step_avg:\S+ms", line)
        for line in lines
    ]
    steps = [m for m in steps if m]
    assert [int(m.group(1)) for m in steps] == [1, 2, 3, 4, 5, 6]
    assert [float(m.group(2)) for m in steps] == pytest.approx(result["train_losses"], abs=5e-5)
    cfg = script.parse_config(run_args(shards, tmp_path, num_iterations=6))
    assert [float(m.group(3)) for m in steps] == pytest.approx(
        [script.lr_multiplier(s, cfg) for s in range(6)], abs=5e-5
    )
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == f"log: {result['log_path']}"


def test_log_holds_source_config_and_versions(script, shards, tmp_path):
    args = run_args(shards, tmp_path, num_iterations=2, val_loss_every=1, seed=5)
    text = open(script.main(args)["log_path"]).read()
    with open(script.__file__) as f:
        assert f.read().rstrip() in text
    config = json.loads(next(line for line in text.splitlines() if line.startswith("config: "))[len("config: "):])
    assert config == dataclasses.asdict(script.parse_config(args))
    assert config["seed"] == 5 and config["num_iterations"] == 2
    for key in (
        "python: ",
        "torch: ",
        "device: cpu",
        "world_size: 1",
        "grad_accum_steps: 8",
        "baseline: " + script.BASELINE,
    ):
        assert key in text
    assert "step:1/2 val_loss:" in text and "step:2/2 train_loss:" in text


def test_cli_refusals_exit_2_with_one_line_per_problem_and_no_log(tmp_path):
    cases = (
        (["--bogus=1"], ["error: unknown field --bogus (see --help)"]),
        (
            ["--preset=tiny", f"--train_files={tmp_path}/x_*.bin", f"--log_dir={tmp_path}/logs"],
            ["error: no data files match"],
        ),
        (
            ["--model_dim=0", "--adam_beta1=1.5", f"--log_dir={tmp_path}/logs"],
            ["error: --model_dim=0 is out of range", "error: --adam_beta1=1.5 is out of range"],
        ),
    )
    for args, starts in cases:
        code, out, err = run_cli(os.path.join(ROOT, "train_gpt_M.py"), args, cwd=tmp_path)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == len(starts), err
        assert all(line.startswith(start) for line, start in zip(lines, starts)), err
        assert not (tmp_path / "logs").exists() and not out


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
    assert load_script("A").shard_token_count(str(tmp_path / "x.bin")) == 1000 and tokens[0] == SMALL_EOT
    assert tokens.max() == SMALL_EOT


# -----------------------------------------------------------------------------
# Refused before anything starts: outputs, ranges, fields that do not fit together


@pytest.mark.parametrize("field", ["log_dir", "checkpoint_dir"])
@pytest.mark.parametrize("kind", ["file", "empty", "unwritable"])
def test_an_output_folder_that_cannot_take_files_is_refused_before_training(script, shards, tmp_path, field, kind):
    """A file, an empty string, or a folder that cannot be written (here inside /proc, which takes no new file
    even from root): refused with one line before a log exists or a step runs; checkpoint_dir only matters when
    checkpoints are on."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    folder = {"file": str(blocker), "empty": "", "unwritable": "/proc/self/logs"}[kind]
    fields = {"log_dir": tmp_path / "logs", field: folder, "checkpoint_dir": tmp_path / "ckpt", "checkpoint_every": 1}
    fields[field] = folder
    with pytest.raises(script.ConfigError) as refusal:
        script.main(tiny_args(*shards, warmup_compile_steps=0, val_tokens=1024, num_iterations=2, **fields))
    (message,) = str(refusal.value).splitlines()
    expected = {"file": f"{blocker} is a file, not a folder", "empty": "names nothing",
                "unwritable": "cannot be written"}[kind]
    assert message.startswith(f"--{field}=") and expected in message
    assert not (tmp_path / "logs").exists()


def test_checkpoint_dir_is_not_checked_without_checkpoints(script, shards, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    script.main(tiny_args(*shards, log_dir=tmp_path / "logs", warmup_compile_steps=0, val_tokens=1024, num_iterations=1,
                          val_loss_every=0, checkpoint_dir=blocker))


@pytest.mark.parametrize("args, message", [
    (["--seed=18446744073709551616"], r"--seed=18446744073709551616 is out of range: must be in \[0, 4294967295\]"),
    (["--seed=-1"], r"--seed=-1 is out of range"),
    (["--warmup_steps=500", "--num_iterations=300"], "--warmup_steps=500 is longer than the run"),
    (["--final_lr_frac=1.5"], r"--final_lr_frac=1.5 is out of range: must be in \[0, 1\]"),
    (["--seq_len=1000", "--batch_tokens=8000"], "--seq_len=1000 must be a multiple of 128"),
])
def test_configuration_that_makes_no_sense_is_refused_on_any_device(script, args, message):
    with pytest.raises(script.ConfigError, match=message):
        script.parse_config(args)


def test_training_files_that_are_the_validation_files_are_refused(script, shards, tmp_path):
    message = refused_before_log(script, shards, tmp_path, script.DataError, val_files=shards[0])
    assert "--train_files and --val_files both match" in message and "validation would measure the training" in message


def test_tiny_preset_finds_its_data_from_any_working_directory(script, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = script.parse_config(["--preset=tiny"])
    assert os.path.isabs(cfg.train_files) and script.find_shards(cfg.train_files) and script.find_shards(cfg.val_files)

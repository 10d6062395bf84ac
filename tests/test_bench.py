"""bench/: the synthetic shards, the FLOP count behind MFU, and the speed table end to end (tiny, CPU)."""
import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

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
    # log-normal(6, 1) + 1 has mean ~670; over 3,000 seeds this mean ranged 532 to 937 (std 45, a long right tail)
    assert 450 < np.diff(starts).mean() < 1100


def test_mean_keys_per_query_counts_the_mask():
    """Against the script's own dense mask (document, causal, window), summed over rows."""
    speed = load_speed()
    A = load_script("A")
    import torch

    rng = np.random.default_rng()
    for window in (1, 17, 64, 1000):
        tokens = rng.integers(0, 100, 300).astype(np.int64)
        tokens[rng.choice(300, 12, replace=False)] = synthetic.EOT_TOKEN
        docs = A.document_ids(torch.from_numpy(tokens), synthetic.EOT_TOKEN)
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


def test_full_size_timing_commands_are_accepted_by_both_scripts():
    """The command speed.py builds for a GPU run (default steps, 65,536-token sequences) passes each script's
    configuration checks: A's 256 warm-up steps would not fit in 50 steps."""
    speed = load_speed()
    args = argparse.Namespace(tiny=False, seq_len=65_536, steps=50, batch_tokens=65_536, val_tokens=65_536, extra=[])
    for baseline in ("A", "M"):
        argv = speed.command(f"train_gpt_{baseline}.py", args, "t_*.bin", "v_*.bin", "logs")
        cfg = load_script(baseline).parse_config(argv[1:])
        assert (cfg.num_iterations, cfg.seq_len, cfg.warmup_steps) == (50, 65_536, 0)


FAKE_REFERENCE = """import os, sys, uuid
class Hyperparameters:
    train_files = "data/fineweb10B/fineweb_train_*.bin" # input
    val_files = "data/fineweb10B/fineweb_val_*.bin" # input
    val_tokens = 10485760 # how many
    num_iterations = 2500 # number of iterations
    val_loss_every = 125 # every
args = Hyperparameters()
world_size = int(os.environ["WORLD_SIZE"])
assert world_size == 8 # this code is designed for 8xH100
import torch
from torch import nn
GPT = lambda a: None
model: nn.Module = GPT(args)
os.makedirs("logs", exist_ok=True)
with open(f"logs/{uuid.uuid4()}.txt", "w") as f:
    f.write(open(__file__).read() + "\\n" + "=" * 100 + "\\n")
    f.write(f"seed {torch.initial_seed()} files {args.train_files} {args.val_files}\\n" + "=" * 100 + "\\n")
    for step in range(1, args.num_iterations + 1):
        f.write(f"step:{step}/{args.num_iterations} train_time:{10 * step}ms step_avg:10.00ms\\n")
    f.write(f"step:{args.num_iterations}/{args.num_iterations} val_loss:4.0000 "
            f"train_time:{10 * args.num_iterations}ms step_avg:10.00ms\\n")
"""


def load_bench(name: str):
    if f"bench_{name}" not in sys.modules:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up by name
        spec.loader.exec_module(module)
    return sys.modules[f"bench_{name}"]


def test_reference_runner_patches_a_copy_and_returns_its_log(tmp_path):
    """bench/reference.py on a stand-in with the published scripts' patch points: the copy runs on one
    process with the asked steps, data and seed; the original is untouched; its log is parsed as a
    modded-nanogpt log."""
    reference = load_bench("reference")
    script = tmp_path / "train_gpt_M.py"
    script.write_text(FAKE_REFERENCE)
    seed = int(np.random.default_rng().integers(1000))
    log = reference.run_reference(reference.parser().parse_args(
        ["M", "--script", str(script), "--steps", "7", "--train", "x_train_*.bin", "--val", "x_val_*.bin",
         "--seed", str(seed), "--log_dir", str(tmp_path / "logs")]))
    text = open(log).read()
    assert f"seed {seed} files {os.path.abspath('x_train_*.bin')} {os.path.abspath('x_val_*.bin')}" in text
    assert script.read_text() == FAKE_REFERENCE
    assert "class Hyperparameters" not in text and text.startswith("(the source of the published reference script")
    sys.path.insert(0, ROOT)
    import runlog

    run = runlog.parse_log(log, batch_tokens=65536)
    assert run.num_steps == 7 and run.val[-1][1] == 4.0 and dict(run.train)[7] == 70.0


def test_reference_runner_refuses_a_script_without_its_patch_points(tmp_path):
    reference = load_bench("reference")
    script = tmp_path / "other.py"
    script.write_text(FAKE_REFERENCE.replace("num_iterations = 2500", "steps = 2500"))
    args = reference.parser().parse_args(["A", "--script", str(script), "--steps", "3", "--train", "t", "--val", "v"])
    with pytest.raises(reference.ReferenceError, match="0 places matching.*num_iterations"):
        reference.patch_source(script.read_text(), args)


def test_interaction_of_a_synthetic_two_by_two(tmp_path):
    """Cells from the logs' optimizer and architecture; the interaction and its Welch interval against a
    hand computation."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_results_tools import curve_log

    interaction = load_bench("interaction")
    rng = np.random.default_rng()
    truth = {("A", True, 0.0): 5.3, ("A", False, 30.0): 7.6, ("M", True, 0.0): 9.0, ("M", False, 30.0): 4.6}
    losses = {}
    for (baseline, tied, cap), mean in truth.items():
        losses[(baseline, tied)] = list(mean + rng.normal(0, 0.02, 3).round(4))
        for i, loss in enumerate(losses[(baseline, tied)]):
            curve_log(tmp_path / f"{baseline}_{tied}_{i}.txt", [(0, 11.0), (10, loss)], num_steps=10, baseline=baseline,
                      tied_embed=tied, logit_softcap=cap)
    runs = interaction.load_runs(sorted(tmp_path.glob("*.txt")))
    cells, effects = interaction.analyse(runs)
    assert [len(v) for v in cells.values()] == [3, 3, 3, 3]
    estimate = effects["interaction (Muon@M - Muon@A) - (AdamW@M - AdamW@A)"]
    groups = [losses[("A", True)], losses[("A", False)], losses[("M", True)], losses[("M", False)]]
    expected = np.mean(groups[3]) - np.mean(groups[2]) - np.mean(groups[1]) + np.mean(groups[0])
    assert estimate.mean == pytest.approx(expected) and estimate.lo < expected < estimate.hi
    variance = sum(np.var(g, ddof=1) / 3 for g in groups)
    assert estimate.hi - estimate.mean == pytest.approx(
        __import__("scipy").stats.t.ppf(0.975, estimate.df) * variance**0.5)
    interaction.plot(cells, str(tmp_path / "fig.png"), "test")
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interaction_names_each_cells_devices_and_notes_a_mix(tmp_path, capsys):
    """Each cell's row names the devices of its runs with their counts; runs from more than one device get a
    note (the same seed does not repeat across GPU models), runs from one device none."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_results_tools import curve_log

    interaction = load_bench("interaction")
    rng = np.random.default_rng()
    cells = [("A", True, 0.0), ("A", False, 30.0), ("M", True, 0.0), ("M", False, 30.0)]
    for i, (baseline, tied, cap) in enumerate(cells):
        for seed in range(2):
            path = curve_log(tmp_path / f"{i}_{seed}.txt", [(0, 11.0), (10, 4 + rng.normal(0, 0.01))], num_steps=10,
                             baseline=baseline, tied_embed=tied, logit_softcap=cap, seed=seed)
            device = "NVIDIA H100 80GB HBM3 x1" if (i, seed) == (2, 1) else "NVIDIA H200 x1"
            path.write_text(path.read_text().replace("device: cpu", f"device: {device}"))
    logs = [str(p) for p in sorted(tmp_path.glob("*.txt"))]
    assert interaction.main(logs) == 0
    out = capsys.readouterr().out
    muon_a = next(line for line in out.splitlines() if line.startswith("| Muon | A's"))
    assert muon_a.endswith("| NVIDIA H100 80GB HBM3 x1 (1), NVIDIA H200 x1 (1) |")
    assert "note: the runs come from 2 devices (NVIDIA H100 80GB HBM3 x1, NVIDIA H200 x1)" in out
    mixed = tmp_path / "2_1.txt"
    mixed.write_text(mixed.read_text().replace("device: NVIDIA H100 80GB HBM3 x1", "device: NVIDIA H200 x1"))
    assert interaction.main(logs) == 0
    out = capsys.readouterr().out
    assert "note:" not in out and "| NVIDIA H200 x1 (2) |" in out


@pytest.mark.parametrize("tool", ["mlp.py", "muon.py", "qk_norm_rope.py"])
def test_gpu_only_benchmarks_say_so_on_cpu(tool):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", tool)], capture_output=True, text=True)
    assert result.returncode == 1 and f"bench/{tool} needs a CUDA GPU" in result.stderr


def test_interaction_of_a_tuned_study(tmp_path, capsys):
    """A tune folder of the four cells, made by tune.py with a fake runner that writes each point's log: the cells
    are the tune's own winners and final seeds (also where a later round moved two fields to values never run
    together), the interaction, and Muon's gain at each architecture as a loss difference and in steps of AdamW's
    own slope near the end; a missing final seed is refused."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_results_tools import curve_log

    import sweep
    import tune

    interaction = load_bench("interaction")
    cells = {"A": 4.0, "A --tied_embed=false --logit_softcap=30": 4.2, "M --tied_embed=true --logit_softcap=0": 3.9,
             "M": 3.7}
    fields = {"A": ["adam_lr"], "M": ["muon_lr"], "M --tied_embed=true --logit_softcap=0": ["muon_lr", "head_lr"]}
    searches = tune.make_searches([(spec, fields.get(spec, fields[spec[0]])) for spec in cells], [])
    rng = np.random.default_rng()
    optimum, config = {}, {}
    for s in searches:
        # the bowl's minimum: the start, but 2^(0.3 to 0.4) off it in each field of the two-field cell (round two
        # then moves both fields)
        off = {name: 2 ** (rng.choice((-1, 1)) * rng.uniform(0.3, 0.4)) if len(s.fields) > 1 else 1.0
               for name in s.fields}
        optimum[s.spec.label] = {name: s.start[name] * off[name] for name in s.fields}
        cfg = sweep._script_module(s.spec.script).parse_config(s.spec.args)
        config[s.spec.label] = dict(baseline=s.spec.label[0], tied_embed=cfg.tied_embed,
                                    logit_softcap=cfg.logit_softcap)

    def run(points, finished):
        queue = list(points)
        while queue:
            p = queue.pop()
            loss = cells[p.run] + sum(math.log(p.values[k] / v) ** 2 for k, v in optimum[p.run].items())
            loss += rng.normal(0, 0.01) if p.seed else 0.0
            p.log = f"{len(list(tmp_path.glob('*.txt')))}.txt"
            # a straight curve of slope -0.01 per step over its last 40 steps
            curve_log(tmp_path / p.log, [(0, 10.8)] + [(s, loss + 0.01 * (40 - s)) for s in (10, 20, 30, 40)],
                      num_steps=40, seed=p.seed, **config[p.run])
            p.status, p.final_val_loss = "ok", loss
            queue += finished(p)
        return True

    plan = {"runs": [[s.spec.label, s.fields] for s in searches], "grid": [0.5, 1.0, 2.0], "rounds": 2,
            "final_seeds": 3, "common_args": []}
    traces = tune.tune(searches, plan["grid"], 2, 3, tune.State(tmp_path, plan), run, report=lambda line: None)
    two_fields = traces["M --tied_embed=true --logit_softcap=0"]
    assert two_fields["search_loss"] is None  # its winner was never run at seed 0
    assert interaction.main(["--study", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    tuned = ", ".join(f"{k}={v:g}" for k, v in sorted(two_fields["best"].items()))
    assert f"tuned: M --tied_embed=true --logit_softcap=0: {tuned}" in out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| A's") or
            line.startswith("| M's")}
    def mean_final(spec):  # the winner's final seeds, as logged (4 digits)
        return np.mean([round(p.final_val_loss, 4) for p in traces[spec]["finals"]])

    for arch, (adamw, muon) in {"A's architecture (tied, plain logits)": ("A", "M --tied_embed=true --logit_softcap=0"),
                                "M's architecture (untied, soft-cap 30)": ("A --tied_embed=false --logit_softcap=30",
                                                                           "M")}.items():
        cols = [c.strip() for c in rows[arch].split("|")]
        gain = mean_final(muon) - mean_final(adamw)
        assert float(cols[2]) == pytest.approx(gain, abs=1e-4)
        assert cols[4] == "-0.01 per step" and abs(float(cols[5]) - gain / -0.01) <= 0.501  # printed to a step
    state = json.loads((tmp_path / "tune.json").read_text())
    state["points"] = [p for p in state["points"] if not (p["run"] == "M" and p["seed"] == 3)]
    (tmp_path / "tune.json").write_text(json.dumps(state))
    assert interaction.main(["--study", str(tmp_path)]) == 1
    assert "the study is not finished" in capsys.readouterr().err

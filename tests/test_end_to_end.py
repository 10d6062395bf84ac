"""End to end: each script trains on CPU (the shared small-vocabulary tiny run of conftest, and the
tiny preset as shipped, GPT-2 vocabulary and embedded sample), and its loss falls; the twins differ
only where the ablation lives."""
import ast
import difflib
import importlib.util
import math
import os

import pytest

from conftest import HALF, ROOT, STEPS, load_script


def test_small_vocabulary_run_trains_and_loss_falls(trained):
    result = trained["result"]
    losses = result["val_losses"]
    assert sorted(losses) == [0, HALF, STEPS]
    assert losses[STEPS] < losses[0] - 2.0, losses
    assert len(result["train_losses"]) == STEPS and result["train_losses"][-1] < result["train_losses"][0] - 2.0


@pytest.mark.parametrize("baseline", ["A", "M"])
def test_tiny_preset_as_shipped_trains_on_the_embedded_sample(baseline, tmp_path):
    """The preset's own data and GPT-2 vocabulary (no overrides but the length): the loss falls from
    about ln(50,304) within a few steps."""
    result = load_script(baseline).main(
        [
            "--preset=tiny",
            f"--log_dir={tmp_path}",
            "--num_iterations=4",
            "--warmup_steps=0",
            "--val_loss_every=0",
            "--val_tokens=2048",
            "--warmup_compile_steps=0",
        ]
    )
    losses = result["train_losses"]
    assert losses[0] == pytest.approx(math.log(50304), abs=0.5) and losses[-1] < losses[0] - 0.3, losses


def allowed_lines(path: str) -> set[int]:
    """1-based lines where the twins may differ: the Config class, PRESETS, LIMITS and BASELINE, the
    optimizer section, the body of build_optimizers."""
    source = open(path).read()
    tree = ast.parse(source)
    allowed: set[int] = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Config":
            allowed |= set(range(node.lineno + 1, node.end_lineno + 1))
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id in ("PRESETS", "BASELINE", "LIMITS") for t in targets):
                allowed |= set(range(node.lineno, node.end_lineno + 1))
        elif isinstance(node, ast.FunctionDef) and node.name == "build_optimizers":
            allowed |= set(range(node.body[0].lineno, node.end_lineno + 1))
    lines = source.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# Optimizer:"))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("# ----"))
    allowed |= set(range(start + 1, end))
    return allowed


def test_twins_differ_only_in_the_ablation():
    paths = [os.path.join(ROOT, f"train_gpt_{b}.py") for b in "AM"]
    a_lines, m_lines = (open(p).read().splitlines() for p in paths)
    a_allowed, m_allowed = (allowed_lines(p) for p in paths)
    matcher = difflib.SequenceMatcher(a=a_lines, b=m_lines, autojunk=False)
    outside = []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        outside += [f"A:{i + 1}: {a_lines[i]}" for i in range(i1, i2) if i + 1 not in a_allowed]
        outside += [f"M:{j + 1}: {m_lines[j]}" for j in range(j1, j2) if j + 1 not in m_allowed]
    assert not outside, "lines that differ outside the ablation:\n" + "\n".join(outside)
    assert len(a_allowed) < len(a_lines) / 3, "the allowed regions must stay a small part of the script"


def test_config_field_names_differ_only_in_optimizer_group():
    a, m = load_script("A").Config, load_script("M").Config
    only = set(a.__dataclass_fields__) ^ set(m.__dataclass_fields__)
    optimizer_fields = {"adam_lr", "weight_decay", "embed_weight_decay", "head_weight_decay", "muon_lr",
                        "muon_weight_decay", "adam_weight_decay", "muon_momentum", "muon_momentum_start",
                        "muon_momentum_warmup", "ns_steps", "head_lr", "embed_lr", "scalar_lr"}
    assert only <= optimizer_fields, only - optimizer_fields


@pytest.mark.parametrize("baseline", ["A", "M"])
def test_download_tool_knows_each_baselines_data_needs(baseline):
    spec = importlib.util.spec_from_file_location(
        "cached_fineweb10B", os.path.join(ROOT, "data", "cached_fineweb10B.py")
    )
    download = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(download)
    cfg = load_script(baseline).Config()
    needs = download.BASELINES[baseline]
    assert needs["num_iterations"] == cfg.num_iterations and needs["batch_tokens"] == cfg.batch_tokens

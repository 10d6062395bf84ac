"""Shared test helpers: load the two training scripts as modules, write token shards."""
import importlib.util
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINES = ("A", "M")


def load_script(baseline: str):
    """The real train_gpt_{A,M}.py as a module; importing it must do nothing heavy."""
    name = f"train_gpt_{baseline}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def write_shard(path, tokens, magic: int = 20240520, version: int = 1, count: int | None = None) -> None:
    header = np.zeros(256, dtype="<i4")
    header[:3] = (magic, version, len(tokens) if count is None else count)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


def learnable_tokens(n: int, rng: np.random.Generator, eot: int = 50256) -> np.ndarray:
    """Documents of a small repeating vocabulary: a tiny model learns them in a few dozen steps."""
    vocab = rng.choice(5000, size=16, replace=False)
    tokens = vocab[(np.arange(n) * 7 + rng.integers(0, 2, n)) % 16]
    tokens[rng.random(n) < 0.005] = eot
    tokens[0] = eot
    return tokens.astype(np.uint16)


@pytest.fixture(params=BASELINES)
def script(request):
    return load_script(request.param)


@pytest.fixture
def shards(tmp_path):
    """A training shard and a validation shard of learnable text; returns their glob patterns."""
    tokens = learnable_tokens(220_000, np.random.default_rng())
    write_shard(tmp_path / "t_train_000001.bin", tokens[:200_000])
    write_shard(tmp_path / "t_val_000000.bin", tokens[200_000:])
    return str(tmp_path / "t_train_*.bin"), str(tmp_path / "t_val_*.bin")

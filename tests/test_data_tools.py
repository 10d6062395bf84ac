"""Tests of the data tools (data/cached_fineweb10B.py, data/tokenize.py, data/sample/) and run.sh.

CPU only, offline: downloads go to local fakes (a fake fetch function, or a local HTTP
server that plays the Hugging Face hub), the offline path goes through the real
huggingface_hub against an endpoint that refuses connections.
"""

import hashlib
import http.server
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
SAMPLE = DATA / "sample"
RUN_SH = ROOT / "run.sh"
TIKTOKEN_CACHE = ROOT.parent / "shared" / "tokenizer" / "tiktoken_cache"
EOT = 50256
REPO_ID = "kjj0/fineweb10B-gpt2"


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cf = load("data_cached_fineweb10B", DATA / "cached_fineweb10B.py")
tk = load("data_tokenize", DATA / "tokenize.py")


def shard_bytes(tokens, magic: int = 20240520, version: int = 1, count: int | None = None) -> bytes:
    tokens = np.asarray(tokens, dtype="<u2")
    header = np.zeros(256, dtype="<i4")
    header[:3] = [magic, version, len(tokens) if count is None else count]
    return header.tobytes() + tokens.tobytes()


def read_tokens(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[0] == 20240520 and header[1] == 1
    assert len(raw) == 1024 + 2 * int(header[2])
    return np.frombuffer(raw[1024:], dtype="<u2")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_")) and k != "TRANSFORMERS_OFFLINE"
    }
    env.update(extra)
    return env


def byte_encoding():
    """A small tiktoken encoding: one token per byte, end-of-text 50256."""
    tiktoken = pytest.importorskip("tiktoken")
    return tiktoken.Encoding(
        name="test_bytes",
        pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\w+| ?\d+| ?[^\s\w\d]+|\s+(?!\S)|\s+""",
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={"<|endoftext|>": EOT},
    )


def expected_stream(docs: list[str]) -> list[int]:
    out: list[int] = []
    for doc in docs:
        out += [EOT] + list(doc.encode())
    return out


# ---------------------------------------------------------------- cached_fineweb10B.py


def test_shards_needed_baselines():
    assert cf.BASELINES["A"] == {"num_iterations": 4375, "batch_tokens": 524_288}
    assert cf.BASELINES["M"] == {"num_iterations": 2500, "batch_tokens": 524_288}
    assert cf.shards_needed(**cf.BASELINES["A"]) == 24
    assert cf.shards_needed(**cf.BASELINES["M"]) == 14
    assert cf.baseline_shards("A") == 24 and cf.baseline_shards("M") == 14
    # 100M - 1 tokens hold 190 windows of 524,288 + 1: 4375 / 190 -> 24, 2500 / 190 -> 14.
    assert (100_000_000 - 1) // 524_288 == 190


def test_shards_needed_small_case():
    # L = 1000, batch 100: (1000 - 1) // 100 = 9 steps per shard (a 10th would need 1001 tokens).
    assert cf.shards_needed(9, 100, shard_tokens=1000) == 1
    assert cf.shards_needed(10, 100, shard_tokens=1000) == 2
    assert cf.shards_needed(18, 100, shard_tokens=1000) == 2
    assert cf.shards_needed(19, 100, shard_tokens=1000) == 3
    assert cf.shards_needed(10, 100, shard_tokens=1001) == 1
    with pytest.raises(ValueError):
        cf.shards_needed(1, 100, shard_tokens=100)


def test_shard_filenames():
    assert cf.shard_filenames(2) == ["fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"]


def test_shard_validation(tmp_path):
    good = tmp_path / "good.bin"
    good.write_bytes(shard_bytes(range(10)))
    assert cf.shard_token_count(good) == 10
    cases = {
        "magic": shard_bytes(range(10), magic=1),
        "version": shard_bytes(range(10), version=2),
        "partial": shard_bytes(range(10))[:-2],
        "long": shard_bytes(range(10)) + b"\0\0",
        "short_header": b"\0" * 8,
    }
    for name, raw in cases.items():
        path = tmp_path / f"{name}.bin"
        path.write_bytes(raw)
        assert not cf.shard_is_valid(path), name
    assert not cf.shard_is_valid(tmp_path / "missing.bin")


class FakeFetch:
    """Records calls; writes `payload(name)` to out_dir/name (None: write nothing)."""

    def __init__(self, payload=lambda name: shard_bytes(range(7))):
        self.payload = payload
        self.calls: list[str] = []

    def __call__(self, filename: str, out_dir: Path) -> Path:
        path = Path(out_dir) / filename
        assert not path.exists(), "a broken file must be deleted before fetching again"
        self.calls.append(filename)
        raw = self.payload(filename)
        if raw is not None:
            path.write_bytes(raw)
        return path


def test_download_skips_present_valid_shards(tmp_path):
    for name in cf.shard_filenames(2):
        (tmp_path / name).write_bytes(shard_bytes(range(5)))
    fetch = FakeFetch()
    paths = cf.download(2, tmp_path, fetch=fetch, progress=False)
    assert fetch.calls == []
    assert [p.name for p in paths] == cf.shard_filenames(2)


def test_download_refetches_corrupt_and_partial(tmp_path):
    (tmp_path / "fineweb_val_000000.bin").write_bytes(shard_bytes(range(5)))
    (tmp_path / "fineweb_train_000001.bin").write_bytes(shard_bytes(range(5), magic=123))
    (tmp_path / "fineweb_train_000002.bin").write_bytes(shard_bytes(range(5))[:-3])
    fetch = FakeFetch()
    paths = cf.download(3, tmp_path, fetch=fetch, progress=False)
    assert fetch.calls == ["fineweb_train_000001.bin", "fineweb_train_000002.bin", "fineweb_train_000003.bin"]
    assert all(cf.shard_token_count(p) == (5 if p.name.startswith("fineweb_val") else 7) for p in paths)


def test_download_still_invalid_is_an_error_naming_the_file(tmp_path):
    fetch = FakeFetch(
        payload=lambda name: shard_bytes(range(5))[:-1] if "train_000001" in name else shard_bytes(range(5))
    )
    with pytest.raises(cf.DownloadError, match="fineweb_train_000001.bin"):
        cf.download(2, tmp_path, fetch=fetch, progress=False)
    assert not (tmp_path / "fineweb_train_000001.bin").exists()
    assert fetch.calls == ["fineweb_val_000000.bin", "fineweb_train_000001.bin"]


def test_download_fetch_failure_message(tmp_path):
    def offline(filename, out_dir):
        raise ConnectionError("no route to host")

    with pytest.raises(cf.DownloadError) as info:
        cf.download(2, tmp_path / "shards", fetch=offline, progress=False)
    message = str(info.value)
    for part in (
        REPO_ID,
        str((tmp_path / "shards").resolve()),
        "fineweb_val_000000.bin",
        "fineweb_train_000002.bin",
        "no route",
    ):
        assert part in message


def test_cli_offline_through_real_huggingface_hub(tmp_path):
    pytest.importorskip("huggingface_hub")
    out = tmp_path / "fineweb10B"
    env = clean_env(
        HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1"
    )
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(DATA / "cached_fineweb10B.py"), "2", "--out", str(out)],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, proc.stderr
    assert elapsed < 15, f"offline failure took {elapsed:.1f} s"
    for part in (
        REPO_ID,
        str(out.resolve()),
        "fineweb_val_000000.bin",
        "fineweb_train_000001.bin",
        "fineweb_train_000002.bin",
    ):
        assert part in proc.stderr
    assert "Traceback" not in proc.stderr


class FakeHub(http.server.BaseHTTPRequestHandler):
    files: ClassVar[dict[str, bytes]] = {}

    def _answer(self, body: bool) -> None:
        prefix = f"/datasets/{REPO_ID}/resolve/main/"
        name = self.path[len(prefix) :] if self.path.startswith(prefix) else None
        if name not in self.files:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = self.files[name]
        self.send_response(200)
        self.send_header("X-Repo-Commit", "0" * 40)
        self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_cli_downloads_through_real_huggingface_hub(tmp_path, fake_hub):
    pytest.importorskip("huggingface_hub")
    FakeHub.files = {name: shard_bytes(np.arange(i, i + 20)) for i, name in enumerate(cf.shard_filenames(2))}
    FakeHub.files["fineweb_train_000003.bin"] = shard_bytes(range(20), magic=7)
    out = tmp_path / "fineweb10B"
    env = clean_env(
        HF_ENDPOINT=f"http://127.0.0.1:{fake_hub.server_address[1]}",
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    cmd = [sys.executable, str(DATA / "cached_fineweb10B.py"), "--out", str(out)]
    proc = subprocess.run(cmd + ["2"], env=env, check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for name in cf.shard_filenames(2):
        assert (out / name).read_bytes() == FakeHub.files[name]
    partial = out / "fineweb_train_000001.bin"
    partial.write_bytes(partial.read_bytes()[:-4])
    proc = subprocess.run(cmd + ["2"], env=env, check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert partial.read_bytes() == FakeHub.files[partial.name]
    proc = subprocess.run(cmd + ["3"], env=env, check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "fineweb_train_000003.bin" in proc.stderr and "not a valid shard" in proc.stderr
    assert not (out / "fineweb_train_000003.bin").exists()


def test_cached_fineweb_help_runs_as_script():
    proc = subprocess.run(
        [sys.executable, str(DATA / "cached_fineweb10B.py"), "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--baseline" in proc.stdout


# ---------------------------------------------------------------- tokenize.py


def test_tokenize_round_trip_small_encoding(tmp_path):
    docs = ["first document", "the second one, a bit longer", "third", "fourth doc here", "fifth"]
    files = []
    for i, doc in enumerate(docs):
        files.append(tmp_path / f"in_{i}.txt")
        files[-1].write_text(doc + "\n", encoding="utf-8")
    out = tmp_path / "out"
    shards = tk.tokenize_files(
        files, out, name="t", shard_tokens=16, val_docs=2, encoder=byte_encoding(), progress=False, workers=2
    )
    stream = expected_stream(docs)
    n_val = len(expected_stream(docs[:2]))
    n_val_shards = -(-n_val // 16)
    assert n_val_shards >= 2
    assert [p.name for p in shards["val"]] == [f"t_val_{i:06d}.bin" for i in range(n_val_shards)]
    train_names = [p.name for p in shards["train"]]
    assert len(train_names) >= 2
    assert train_names == [f"t_train_{i:06d}.bin" for i in range(n_val_shards, n_val_shards + len(train_names))]
    val = np.concatenate([read_tokens(p) for p in shards["val"]])
    train = [read_tokens(p) for p in shards["train"]]
    assert val.tolist() == stream[:n_val]
    assert np.concatenate(train).tolist() == stream[n_val:]
    assert all(len(t) == 16 for t in train[:-1]) and 0 < len(train[-1]) <= 16
    assert sorted(p.name for p in out.iterdir()) == sorted([p.name for p in shards["val"]] + train_names)


def test_tokenize_single_val_shard_then_train_from_one(tmp_path):
    src = tmp_path / "docs.txt"
    src.write_text("alpha beta\n\n\ngamma\ndelta\n\nepsilon\n", encoding="utf-8")
    shards = tk.tokenize_files(
        [src], tmp_path / "out", name="b", val_tokens=5, txt_docs="blank_lines", encoder=byte_encoding(), progress=False
    )
    assert [p.name for p in shards["val"]] == ["b_val_000000.bin"]
    assert [p.name for p in shards["train"]] == ["b_train_000001.bin"]
    # val_tokens=5 holds out the whole first document (11 tokens), never part of one.
    assert read_tokens(shards["val"][0]).tolist() == expected_stream(["alpha beta"])
    assert read_tokens(shards["train"][0]).tolist() == expected_stream(["gamma\ndelta", "epsilon"])


def test_tokenize_jsonl_and_fake_encoder(tmp_path):
    class FakeEncoder:
        def encode_ordinary(self, text: str) -> list[int]:
            return [len(word) for word in text.split()]

    docs = [{"text": "a bb ccc"}, {"text": "dddd"}, {"text": ""}, {"text": "ee f", "id": 4}]
    src = tmp_path / "in.jsonl"
    src.write_text(
        "\n".join(json.dumps(d) for d in docs[:2]) + "\n\n" + "\n".join(json.dumps(d) for d in docs[2:]) + "\n"
    )
    other = tmp_path / "more.json"
    other.write_text(json.dumps({"body": "gg hhh"}) + "\n")
    shards = tk.tokenize_files(
        [src], tmp_path / "out", name="j", val_docs=1, encoder=FakeEncoder(), eot=9, progress=False
    )
    assert read_tokens(shards["val"][0]).tolist() == [9, 1, 2, 3]
    assert read_tokens(shards["train"][0]).tolist() == [9, 4, 9, 2, 1]
    shards = tk.tokenize_files(
        [other], tmp_path / "out2", val_docs=0, text_key="body", encoder=FakeEncoder(), eot=9, progress=False
    )
    assert shards["val"] == [] and read_tokens(shards["train"][0]).tolist() == [9, 2, 3]


def test_tokenize_many_documents_keep_order_across_workers(tmp_path):
    docs = [f"document number {i} " + "x" * (i % 7) for i in range(700)]
    src = tmp_path / "many.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    shards = tk.tokenize_files(
        [src], tmp_path / "out", val_docs=30, shard_tokens=5000, workers=4, encoder=byte_encoding(), progress=False
    )
    got = np.concatenate([read_tokens(p) for p in shards["val"] + shards["train"]]).tolist()
    assert got == expected_stream(docs)
    assert int((read_tokens(shards["val"][0]) == EOT).sum()) == 30


def test_tokenize_folder_input_and_errors(tmp_path):
    enc = byte_encoding()
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    (tmp_path / "corpus" / "b.txt").write_text("bee")
    (tmp_path / "corpus" / "sub" / "a.jsonl").write_text(json.dumps({"text": "ay"}) + "\n")
    (tmp_path / "corpus" / "skip.csv").write_text("x,y")
    shards = tk.tokenize_files([tmp_path / "corpus"], tmp_path / "out", val_docs=1, encoder=enc, progress=False)
    assert read_tokens(shards["val"][0]).tolist() == expected_stream(["bee"])
    assert read_tokens(shards["train"][0]).tolist() == expected_stream(["ay"])

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(tk.TokenizeError, match="bad.jsonl:2"):
        tk.tokenize_files([bad], tmp_path / "o1", val_docs=0, encoder=enc, progress=False)
    with pytest.raises(tk.TokenizeError, match="no such file"):
        tk.tokenize_files([tmp_path / "nope.txt"], tmp_path / "o2", encoder=enc, progress=False)
    with pytest.raises(tk.TokenizeError, match="none are left for training"):
        tk.tokenize_files([tmp_path / "corpus" / "b.txt"], tmp_path / "o3", val_docs=5, encoder=enc, progress=False)
    with pytest.raises(tk.TokenizeError, match="not both"):
        tk.tokenize_files([tmp_path / "corpus"], tmp_path / "o4", val_docs=1, val_tokens=1, encoder=enc, progress=False)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9")
    with pytest.raises(tk.TokenizeError, match="not UTF-8"):
        tk.tokenize_files([latin], tmp_path / "o5", val_docs=0, encoder=enc, progress=False)

    class Wide:
        def encode_ordinary(self, text: str) -> list[int]:
            return [70_000]

    with pytest.raises(tk.TokenizeError, match="uint16"):
        tk.tokenize_files([tmp_path / "corpus"], tmp_path / "o6", val_docs=0, encoder=Wide(), progress=False)


def test_write_and_read_shard(tmp_path):
    path = tmp_path / "x.bin"
    tk.write_shard(path, np.array([EOT, 1, 2, 65535], dtype=np.uint16))
    assert path.stat().st_size == 1024 + 8
    assert cf.shard_token_count(path) == 4
    assert tk.read_shard(path).tolist() == [EOT, 1, 2, 65535]
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ValueError, match="does not match"):
        tk.read_shard(path)


def test_missing_gpt2_files_error_names_tiktoken_cache_dir(monkeypatch):
    tiktoken = pytest.importorskip("tiktoken")

    def no_network(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    with pytest.raises(tk.TokenizeError, match="TIKTOKEN_CACHE_DIR"):
        tk.load_gpt2_encoder()


def run_tokenize_script(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(DATA / "tokenize.py"), *args],
        env={**os.environ, **env},
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_tokenize_script_help_despite_stdlib_name():
    proc = run_tokenize_script(["--help"])
    assert proc.returncode == 0, proc.stderr
    assert "--val_docs" in proc.stdout and "--txt_docs" in proc.stdout


def test_tokenize_script_traceback_still_works(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    src = tmp_path / "in.txt"
    src.write_text("hello")
    proc = run_tokenize_script([str(src), "--out", str(blocker / "sub")])
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert re.search(r"(NotADirectoryError|FileExistsError)", proc.stderr), proc.stderr
    assert 'tokenize.py", line' in proc.stderr
    assert "circular import" not in proc.stderr and "AttributeError" not in proc.stderr


def test_tokenize_script_offline_without_cache(tmp_path):
    proxy = f"http://127.0.0.1:{closed_port()}"
    src = tmp_path / "in.txt"
    src.write_text("hello")
    proc = run_tokenize_script(
        [str(src), "--out", str(tmp_path / "out")],
        TIKTOKEN_CACHE_DIR=str(tmp_path / "empty_cache"),
        HTTPS_PROXY=proxy,
        HTTP_PROXY=proxy,
        https_proxy=proxy,
        http_proxy=proxy,
        NO_PROXY="",
        no_proxy="",
    )
    assert proc.returncode == 1
    assert "TIKTOKEN_CACHE_DIR" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture
def gpt2_cache(monkeypatch):
    if not TIKTOKEN_CACHE.is_dir():
        pytest.skip(f"no offline GPT-2 files for tiktoken at {TIKTOKEN_CACHE}")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))
    return TIKTOKEN_CACHE


def test_real_gpt2_script_run(tmp_path, gpt2_cache):
    enc = tk.load_gpt2_encoder()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    docs = ["Hello world", "In the beginning God created the heaven and the earth.", "<|endoftext|> is plain text here"]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    proc = run_tokenize_script(
        [str(src), "--out", str(tmp_path / "out"), "--name", "g", "--val_docs", "1", "--workers", "2"]
    )
    assert proc.returncode == 0, proc.stderr
    val = read_tokens(tmp_path / "out" / "g_val_000000.bin").tolist()
    train = read_tokens(tmp_path / "out" / "g_train_000001.bin").tolist()
    assert val == [EOT, 15496, 995]
    assert train.count(EOT) == 2 and train[0] == EOT
    assert enc.decode(train) == "<|endoftext|>" + docs[1] + "<|endoftext|>" + docs[2]


# ---------------------------------------------------------------- data/sample


def test_sample_shards():
    val, train = SAMPLE / "sample_val_000000.bin", SAMPLE / "sample_train_000001.bin"
    assert sorted(p.name for p in SAMPLE.glob("sample_*.bin")) == [train.name, val.name]
    counts = {p: cf.shard_token_count(p) for p in (val, train)}
    assert counts[val] >= 65_537 and counts[train] >= 600_000
    assert val.stat().st_size + train.stat().st_size <= 2_000_000
    assert (
        sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        <= 2 * 1024 * 1024
    )
    readme = (SAMPLE / "README.md").read_text()
    assert "bible-kjv-text" in readme and "public domain" in readme
    for path in (val, train):
        tokens = tk.read_shard(path)
        assert tokens[0] == EOT and int(tokens.max()) <= EOT
        assert hashlib.sha256(path.read_bytes()).hexdigest() in readme, f"{path.name}: sha256 not in README"
    assert int((tk.read_shard(val) == EOT).sum()) == 112
    assert int((tk.read_shard(train) == EOT).sum()) == 1012


def test_sample_text_decodes(gpt2_cache):
    enc = tk.load_gpt2_encoder()
    text = enc.decode(tk.read_shard(SAMPLE / "sample_val_000000.bin")[:40].tolist())
    assert text.startswith("<|endoftext|>Genesis 10\n\nNow these are the generations of the sons of Noah")


# ---------------------------------------------------------------- run.sh


def run_sh(args: list[str], path: str | None = None, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, **env}
    for key in ("RUN_SH_DRY", "NGPU", "NNODES", "NODE_RANK", "RDZV_ENDPOINT", "RDZV_ID"):
        if key not in env:
            full_env.pop(key, None)
    if path is not None:
        full_env["PATH"] = path
    return subprocess.run(
        ["bash", str(RUN_SH), *args], env=full_env, check=False, capture_output=True, text=True, timeout=120
    )


def path_without_nvidia_smi() -> str:
    dirs = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(d for d in dirs if d and not (Path(d) / "nvidia-smi").exists())


def test_run_sh_file():
    assert os.access(RUN_SH, os.X_OK)
    text = RUN_SH.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    for var in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        assert f"export {var}=" in text


@pytest.mark.parametrize("args", [[], ["B"], ["tests"], ["--frobnicate"]])
def test_run_sh_usage_exit_2(args):
    proc = run_sh(args)
    assert proc.returncode == 2
    assert "usage" in proc.stderr


def test_run_sh_no_gpu_runs_tiny_preset(tmp_path):
    proc = run_sh(["M", "--foo=1", "bar"], path=path_without_nvidia_smi(), RUN_SH_DRY="1")
    assert proc.returncode == 0, proc.stderr
    assert "no GPU" in proc.stderr and "tiny" in proc.stderr
    assert "train_gpt_M.py --preset=tiny --foo=1 bar" in proc.stdout
    assert "cached_fineweb10B" not in proc.stdout and "torchrun" not in proc.stdout


@pytest.fixture
def fake_nvidia_smi(tmp_path):
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text(
        "#!/bin/sh\n"
        'echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"\n'
        'echo "  MIG 3g.40gb     Device  0: (UUID: MIG-0)"\n'
        'echo "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-1)"\n'
    )
    smi.chmod(0o755)
    return f"{smi.parent}{os.pathsep}{path_without_nvidia_smi()}"


def test_run_sh_gpu_standalone(fake_nvidia_smi):
    proc = run_sh(["A", "--x=2"], path=fake_nvidia_smi, RUN_SH_DRY="1")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.endswith("data/cached_fineweb10B.py --baseline A") for line in lines)
    assert lines[-1].endswith("--standalone --nproc_per_node=2 train_gpt_A.py --x=2")


def test_run_sh_gpu_multi_node(fake_nvidia_smi):
    env = {"RUN_SH_DRY": "1", "NNODES": "2", "NODE_RANK": "1", "RDZV_ENDPOINT": "node0:29500", "NGPU": "8"}
    proc = run_sh(["M"], path=fake_nvidia_smi, **env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].endswith(
        "--nnodes=2 --node_rank=1 --rdzv-backend=c10d --rdzv-endpoint=node0:29500 --rdzv-id=speedrun "
        "--nproc_per_node=8 train_gpt_M.py"
    )
    del env["RDZV_ENDPOINT"]
    proc = run_sh(["M"], path=fake_nvidia_smi, **env)
    assert proc.returncode != 0 and "RDZV_ENDPOINT" in proc.stderr
    assert "cached_fineweb10B" not in proc.stdout

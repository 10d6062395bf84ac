"""What comes around a run: sample.py and hellaswag.py on a checkpoint, the run's records for other tools
(<run_id>.jsonl, Weights & Biases), and the pinned versions that run.sh, CI and the requirements agree on."""
import dataclasses
import http.server
import importlib.util
import json
import os
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch

import hellaswag
import runlog
import sample
from conftest import ROOT, load_script, tiny_args

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def gpt2_checkpoint(tmp_path_factory) -> Path:
    """M's tiny preset as shipped (GPT-2's vocabulary, the King James Bible sample), 8 steps, checkpointed."""
    tmp = tmp_path_factory.mktemp("gpt2")
    load_script("M").main(["--preset=tiny", "--num_iterations=8", "--val_loss_every=0", "--warmup_compile_steps=0",
                           "--checkpoint_every=8", f"--checkpoint_dir={tmp / 'ckpt'}", f"--log_dir={tmp / 'logs'}"])
    (path,) = (tmp / "ckpt").glob("*/step000008.pt")
    return path


def run(tool, argv, capsys) -> tuple[int, str, str]:
    code = tool.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -----------------------------------------------------------------------------
# sample.py


def test_sample_continues_the_prompt_and_the_same_seed_gives_the_same_text(gpt2_checkpoint, capsys):
    texts = [run(sample, [gpt2_checkpoint, "--prompt", "And God said", "--tokens", 12, "--seed", seed], capsys)
             for seed in (1, 1, 2)]
    assert all(code == 0 and out.startswith("And God said") and not err for code, out, err in texts)
    assert texts[0][1] == texts[1][1] != texts[2][1] and len(texts[0][1]) > len("And God said") + 12


def test_sample_sees_at_most_seq_len_tokens(gpt2_checkpoint):
    """A context longer than the model's seq_len: the last seq_len tokens, as if they were all there was."""
    _, cfg, model = sample.load_model(str(gpt2_checkpoint), torch.device("cpu"))
    tokens = torch.randint(0, cfg.eot_token, (cfg.seq_len + 77,)).tolist()
    logits = sample.position_logits(model, cfg, tokens, torch.device("cpu"))
    assert logits.shape == (cfg.seq_len, sample.GPT2_VOCAB + 47) and logits.dtype == torch.float32
    assert torch.equal(logits, sample.position_logits(model, cfg, tokens[-cfg.seq_len:], torch.device("cpu")))


def test_sample_refusals_are_one_line(gpt2_checkpoint, tmp_path, capsys, trained):
    ckpt = torch.load(gpt2_checkpoint, weights_only=True)
    missing = tmp_path / "missing_script.pt"
    torch.save({**ckpt, "script": "train_gpt_X.py"}, missing)
    noise = tmp_path / "noise.pt"
    noise.write_bytes(os.urandom(3000))
    small = next((trained["tmp"] / "ckpt").glob("*/step*.pt"))
    cases = [([noise], "not a checkpoint of train_gpt_A.py / train_gpt_M.py"),
             ([missing], f"was written by train_gpt_X.py, which is not in {ROOT}"),
             ([small], "a model of 512 tokens, not GPT-2's 50257"),
             ([gpt2_checkpoint, "--prompt", "  "], "--prompt is empty"),
             ([gpt2_checkpoint, "--tokens", 0], "--tokens 0: generate at least 1 token"),
             ([gpt2_checkpoint, "--temperature", -1], "neither may be negative")]
    for argv, message in cases:
        code, out, err = run(sample, argv, capsys)
        assert code == 2 and not out and err.count("\n") == 1 and message in err, (argv, err)


def test_a_checkpoint_of_another_torch_is_named(gpt2_checkpoint, tmp_path, capsys):
    other = tmp_path / "other_torch.pt"
    torch.save({**torch.load(gpt2_checkpoint, weights_only=True), "torch": "1.13.1"}, other)
    code, _, err = run(sample, [other, "--tokens", 1], capsys)
    assert code == 0 and err == f"warning: {other} was written with torch 1.13.1; this is torch {torch.__version__}\n"


# -----------------------------------------------------------------------------
# hellaswag.py


def test_scoring_by_sum_and_by_mean_of_the_ending_losses():
    """Known answers: a long ending of small losses wins on the mean, a short one of a larger loss on the sum."""
    long, short = torch.tensor([0.5, 0.5, 0.5, 0.5]), torch.tensor([1.5])
    worse = torch.tensor([3.0, 3.0])
    assert hellaswag.choose([worse, long, short, worse]) == (2, 1)
    assert hellaswag.choose([short * 0 + 0.1, long, short, worse]) == (0, 0)


def test_hellaswag_on_a_fixture_a_tiny_model_gets_right(gpt2_checkpoint, capsys):
    """Four examples in HellaSwag's format: a Bible verse's own continuation against modern gibberish, which 8
    steps on the Bible sample already rank by the mean loss (their sums, over endings of other lengths, not)."""
    code, out, _ = run(hellaswag, [gpt2_checkpoint, "--data", FIXTURES / "hellaswag_bible.jsonl"], capsys)
    found = re.fullmatch(r"hellaswag: 4 examples of \S+: acc (\S+) \(lowest sum of the ending's token losses\), "
                         r"acc_norm (\S+) \(lowest mean\)\n", out)
    assert code == 0 and found and float(found[2]) == 1.0 and 0 <= float(found[1]) <= 1
    code, out, _ = run(hellaswag, [gpt2_checkpoint, "--data", FIXTURES / "hellaswag_bible.jsonl", "--limit", 2], capsys)
    assert code == 0 and "hellaswag: 2 examples" in out


def test_hellaswag_packs_candidates_as_documents_without_changing_their_losses(gpt2_checkpoint):
    """The four candidates as one sequence of documents give each ending the losses it gets alone."""
    _, cfg, model = sample.load_model(str(gpt2_checkpoint), torch.device("cpu"))
    encoder = sample.gpt2_encoder()
    example = json.loads((FIXTURES / "hellaswag_bible.jsonl").read_text().splitlines()[1])
    packed = hellaswag.ending_losses(model, cfg, encoder, example, torch.device("cpu"))
    for i, ending in enumerate(example["endings"]):
        alone = hellaswag.ending_losses(model, cfg, encoder, {**example, "endings": [ending] * 4}, torch.device("cpu"))
        assert torch.allclose(packed[i], alone[0], rtol=1e-4, atol=1e-4)


def test_hellaswag_refuses_missing_or_malformed_data(gpt2_checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 0}\n{"ctx": "a", "endings": ["b"], "label": 0}\n'
    )
    for argv, message in (([gpt2_checkpoint, "--data", tmp_path / "none.jsonl"], "no such file"),
                          ([gpt2_checkpoint, "--data", bad], f"{bad}:2: not a HellaSwag example")):
        code, _, err = run(hellaswag, argv, capsys)
        assert code == 2 and err.count("\n") == 1 and message in err


def test_hellaswag_downloads_with_a_progress_bar_and_says_what_to_do_offline(tmp_path, monkeypatch, capsys):
    body = (FIXTURES / "hellaswag_bible.jsonl").read_bytes()

    class Serve(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Serve)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    target = tmp_path / "hellaswag" / "hellaswag_val.jsonl"
    monkeypatch.setattr(hellaswag, "URL", f"http://127.0.0.1:{server.server_port}/hellaswag_val.jsonl")
    hellaswag.fetch(str(target))
    server.shutdown()
    server.server_close()
    assert target.read_bytes() == body and "downloading hellaswag_val.jsonl" in capsys.readouterr().err
    target.unlink()
    with pytest.raises(sample.Refused) as offline:
        hellaswag.fetch(str(target))
    assert f"put that file at {target}" in str(offline.value) and not target.exists()


# -----------------------------------------------------------------------------
# The run's records: <run_id>.jsonl and Weights & Biases


def test_every_run_writes_records_that_other_tools_read(trained):
    """<run_id>.jsonl: a first object with the configuration and versions, then one per step and validation line
    (the same values, unrounded); runlog takes the exact values from it, and reads it alone too."""
    log = Path(trained["result"]["log_path"])
    first, *records = [json.loads(line) for line in log.with_suffix(".jsonl").read_text().splitlines()]
    assert (
        first["run_id"] == log.stem and first["config"]["num_iterations"] == 12 and first["torch"] == torch.__version__
    )
    steps = [r for r in records if "train_loss" in r]
    vals = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert [r["train_loss"] for r in steps] == trained["result"]["train_losses"]
    assert vals == trained["result"]["val_losses"]
    assert all(r["tokens"] == r["step"] * 1024 and r["train_time_ms"] >= 0 for r in records)
    from_text, alone = runlog.parse_log(log), runlog.parse_log(shutil.copy(log.with_suffix(".jsonl"),
                                                                          log.parent / "copy.jsonl"))
    assert [loss for _, loss, _ in from_text.val] == list(trained["result"]["val_losses"].values())
    assert alone.val == from_text.val and alone.complete and alone.group == from_text.group


def test_wandb_project_without_the_package_is_refused_before_anything_starts(shards, tmp_path, monkeypatch):
    M = load_script("M")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(M.ConfigError, match="--wandb_project='speedrun' needs the wandb package: pip install wandb"):
        M.main(tiny_args(*shards, tmp_path / "logs", wandb_project="speedrun"))
    assert not (tmp_path / "logs").exists()


def wandb_history(path: Path) -> dict[int, dict[str, float]]:
    """The logged values by step of an offline W&B run file: its records (wandb's leveldb-style log: a 7-byte file
    header, 32 KiB blocks, each record chunk behind a 7-byte header of checksum, length and kind) as protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending, history = path.read_bytes(), 32768, 7, b"", {}
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or a record's last chunk
            record = wandb_internal_pb2.Record.FromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = {item.nested_key[0]: json.loads(item.value_json) for item in record.history.item}
                history.setdefault(record.history.step.num, {}).update(items)
    return history


def test_wandb_gets_the_records_from_rank_0(shards, tmp_path, monkeypatch):
    """Offline Weights & Biases: the run's file holds the same step and validation records as the .jsonl."""
    pytest.importorskip("wandb", reason="pip install -r requirements-test.txt")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = load_script("M").main(tiny_args(*shards, tmp_path / "logs", num_iterations=3, val_loss_every=0,
                                             val_tokens=1024, warmup_compile_steps=0, wandb_project="speedrun"))
    (offline_run,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    history = wandb_history(offline_run)
    assert [(s, h["train_loss"]) for s, h in sorted(history.items()) if "train_loss" in h] == list(
        zip((1, 2, 3), result["train_losses"])
    )
    assert [(s, h["val_loss"]) for s, h in sorted(history.items()) if "val_loss" in h] == sorted(
        result["val_losses"].items()
    )


# -----------------------------------------------------------------------------
# Pinned versions


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        spec = line.split("#", 1)[0].split(";")[0].strip()
        if spec.startswith("-r "):
            found.update(pins(path.parent / spec[3:].strip()))
        elif spec:
            name, _, version = spec.partition("==")
            assert version, f"{path.name}: {name} is not pinned"
            found[name.strip()] = version.strip()
    return found


def test_run_sh_ci_and_the_requirements_agree_on_versions():
    """Every package pinned; GPU and CPU runs differ in torch and triton alone; the tests install the CPU pins
    (.ci/run -> ./run.sh test -> requirements-test.txt -> requirements-cpu.txt); the README states them."""
    root = Path(ROOT)
    gpu, cpu, test = (
        pins(root / name) for name in ("requirements.txt", "requirements-cpu.txt", "requirements-test.txt")
    )
    assert {k: v for k, v in gpu.items() if k not in ("torch", "triton")} == \
        {k: v for k, v in cpu.items() if k not in ("torch", "triton")}
    assert set(gpu) == set(cpu) and {**cpu, "pytest": test["pytest"], "wandb": test["wandb"]} == test
    assert "wandb" not in gpu and "wandb" not in cpu  # optional for runs
    assert "./run.sh test" in (root / ".ci" / "run").read_text()
    run_sh = (root / "run.sh").read_text()
    assert "ensure_requirements requirements-test.txt" in run_sh and "ensure_requirements requirements.txt" in run_sh
    assert "ensure_requirements requirements-cpu.txt" in run_sh
    readme = (root / "README.md").read_text()
    for name, versions in (("torch", (gpu["torch"], cpu["torch"])), ("Triton", (gpu["triton"], cpu["triton"]))):
        assert all(f"{name} {v}" in readme for v in versions), (name, versions)

"""Sample text from a checkpoint of train_gpt_A.py or train_gpt_M.py.

    python sample.py CHECKPOINT [--prompt TEXT] [--tokens N] [--temperature T] [--top_k K] [--seed S] [--device D]
    python sample.py checkpoints/M_20261205-101500_1a2b3c/step002500.pt --prompt "The meaning of life is"

The checkpoint names the script that wrote it and that script's configuration: the model is built by the
script's own code (beside this file, with the plain ops of its model section) and given the checkpoint's
weights. The prompt is encoded with GPT-2's BPE from data/tokenizer/ (no network), after the end-of-text token
that starts every document, and the continuation is printed as it is generated, on the CPU or a GPU. The model
sees at most its seq_len last tokens, and its attention its attn_window. --temperature 0 takes the most likely
token; --top_k K samples among the K most likely (0: all). The same seed gives the same text.

Refused with one line and exit code 2: a file that is not a checkpoint of these scripts, one whose script is
missing, a vocabulary that is not GPT-2's, an empty prompt, --tokens below 1, a negative temperature.
A checkpoint written by another torch version gets a warning.
"""
import argparse
import dataclasses
import importlib.util
import os
import sys
from collections.abc import Iterator

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.abspath(__file__))
GPT2_VOCAB = 50257
FLEX_TILE = 128  # on a GPU the scripts' flex-attention takes sequences of whole 128-token tiles


class Refused(Exception):
    """One line for the user; exit code 2."""


def read_checkpoint(path: str) -> dict:
    """A checkpoint of the training scripts, or Refused naming what it is not."""
    if not os.path.isfile(path):
        raise Refused(f"{path}: no such file")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch.save writes a zip archive
            raise Refused(f"{path}: not a checkpoint of train_gpt_A.py / train_gpt_M.py (not a torch.save archive)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise Refused(f"{path}: truncated or not a checkpoint (torch.load cannot read it)") from None
    if not isinstance(ckpt, dict) or not {"script", "config", "model", "baseline"} <= set(ckpt):
        raise Refused(f"{path}: not a checkpoint of train_gpt_A.py / train_gpt_M.py (no script, config or model)")
    return ckpt


def load_model(path: str, device: torch.device):
    """The checkpoint's script as a module, its configuration and its model with the checkpoint's weights, in
    evaluation mode on `device` (float32 on the CPU, the configured dtype on a GPU)."""
    ckpt = read_checkpoint(path)
    script = os.path.join(ROOT, os.path.basename(ckpt["script"]))
    if not os.path.isfile(script):
        raise Refused(f"{path} was written by {ckpt['script']}, which is not in {ROOT}")
    if ckpt.get("torch", torch.__version__) != torch.__version__:
        print(f"warning: {path} was written with torch {ckpt['torch']}; this is torch {torch.__version__}",
              file=sys.stderr)
    sys.path.insert(0, ROOT)
    try:
        spec = importlib.util.spec_from_file_location(f"checkpoint_{ckpt['baseline']}", script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    known = {f.name for f in dataclasses.fields(module.Config)}
    cfg = module.Config(**{k: v for k, v in ckpt["config"].items() if k in known})
    if cfg.vocab_size < GPT2_VOCAB:
        raise Refused(f"{path}: a model of {cfg.vocab_size} tokens, not GPT-2's {GPT2_VOCAB}: the GPT-2 tokenizer "
                      "cannot write its text")
    model = module.GPT(cfg)
    model.load_state_dict(ckpt["model"])
    dtype = torch.float32 if device.type == "cpu" else getattr(torch, cfg.param_dtype)
    return module, cfg, model.to(device=device, dtype=dtype).eval()


def gpt2_encoder():
    """tiktoken's GPT-2 encoding from this repository's data/tokenizer/ (data/tokenize.py's loader)."""
    spec = importlib.util.spec_from_file_location("data_tokenize", os.path.join(ROOT, "data", "tokenize.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return module.load_gpt2_encoder()
    except module.TokenizeError as e:
        raise Refused(str(e)) from None


@torch.no_grad()
def position_logits(model, cfg, tokens: list[int], device: torch.device) -> torch.Tensor:
    """The float32 logits the model gives every position of its last seq_len tokens. On a GPU the sequence is
    padded to whole flex-attention tiles with end-of-text tokens, which no earlier position sees."""
    tokens = tokens[-cfg.seq_len :]
    padding = -len(tokens) % FLEX_TILE if device.type == "cuda" else 0
    inputs = torch.tensor(tokens + [cfg.eot_token] * padding, device=device)
    return model(inputs)[: len(tokens)].float()


def generate(model, cfg, prompt: list[int], count: int, temperature: float, top_k: int, seed: int,
             device: torch.device) -> Iterator[int]:
    """`count` tokens after the prompt, one at a time (each a full forward: the model keeps no cache)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    tokens = list(prompt)
    for _ in range(count):
        logits = position_logits(model, cfg, tokens, device)[-1, : cfg.vocab_size]
        if temperature == 0:
            token = int(logits.argmax())
        else:
            if top_k:
                logits = logits.masked_fill(logits < logits.topk(min(top_k, logits.numel())).values[-1], float("-inf"))
            token = int(torch.multinomial(F.softmax(logits / temperature, dim=-1), 1, generator=gen))
        tokens.append(token)
        yield token


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint file of train_gpt_A.py or train_gpt_M.py")
    parser.add_argument("--prompt", default="The", help='text the continuation follows (default "The")')
    parser.add_argument("--tokens", type=int, default=100, help="tokens to generate (default 100)")
    parser.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy (default 0.8)")
    parser.add_argument("--top_k", type=int, default=50,
                        help="sample among the K most likely tokens; 0 = all (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is a GPU)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        if not args.prompt.strip():
            raise Refused("--prompt is empty: give the text to continue")
        if args.tokens < 1:
            raise Refused(f"--tokens {args.tokens}: generate at least 1 token")
        if args.temperature < 0 or args.top_k < 0:
            raise Refused(f"--temperature {args.temperature:g} / --top_k {args.top_k}: neither may be negative")
        _, cfg, model = load_model(args.checkpoint, device)
        encoder = gpt2_encoder()
    except Refused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(args.prompt, end="", flush=True)
    pending = b""  # a character's bytes can span tokens: printed once whole
    for token in generate(model, cfg, [cfg.eot_token, *encoder.encode_ordinary(args.prompt)], args.tokens,
                          args.temperature, args.top_k, args.seed, device):
        pending += encoder.decode_single_token_bytes(token)
        try:
            print(pending.decode("utf-8"), end="", flush=True)
            pending = b""
        except UnicodeDecodeError:
            continue
    print(pending.decode("utf-8", errors="replace"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

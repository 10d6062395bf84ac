"""HellaSwag accuracy of a checkpoint of train_gpt_A.py or train_gpt_M.py, completion style.

    python hellaswag.py CHECKPOINT [--data FILE] [--limit N] [--device D]

Each example is a context and four endings, one of them right (the `label`). Every ending is scored by the
model's loss on its tokens after the context (GPT-2 BPE, the ending after a space, the context after the
end-of-text token that starts every document): `acc` counts the examples whose right ending has the lowest sum
of those losses, `acc_norm` the lowest mean, as llm.c's dev/data/hellaswag.py does. The four candidates go
through the model as one sequence of four documents, which its document masking keeps apart as in training.

The validation split (10,042 examples) is downloaded once from the public HellaSwag repository into
data/hellaswag/ (not tracked), with a progress bar; offline, the error names the file to put there. --data
takes a local copy in the original JSON Lines format (ctx, endings, label); --limit N scores the first N.
"""
import argparse
import json
import os
import sys
import urllib.request

import torch
import torch.nn.functional as F
from tqdm import tqdm

from sample import ROOT, Refused, gpt2_encoder, load_model, position_logits

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
DEFAULT_DATA = os.path.join(ROOT, "data", "hellaswag", "hellaswag_val.jsonl")


def fetch(path: str) -> None:
    """Download the validation split to `path`, with a progress bar; Refused, naming the file, offline."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with urllib.request.urlopen(URL, timeout=30) as response, open(path + ".part", "wb") as f:
            total = int(response.headers.get("Content-Length", 0)) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {os.path.basename(path)}") as bar:
                while chunk := response.read(1 << 16):
                    f.write(chunk)
                    bar.update(len(chunk))
    except OSError as e:
        if os.path.exists(path + ".part"):
            os.remove(path + ".part")
        raise Refused(f"could not download {URL} ({getattr(e, 'reason', e)}); without a network, put that file at "
                      f"{path}, or give a local copy with --data FILE") from None
    os.replace(path + ".part", path)


def read_examples(path: str, limit: int | None) -> list[dict]:
    """The examples of a HellaSwag JSON Lines file: ctx, four endings, label (0-3)."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
                ok = (isinstance(example["ctx"], str) and len(example["endings"]) == 4 and
                      all(isinstance(e, str) for e in example["endings"]) and example["label"] in (0, 1, 2, 3))
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                raise Refused(f"{path}:{lineno}: not a HellaSwag example (ctx, four endings, label 0-3)")
            examples.append(example)
            if limit is not None and len(examples) == limit:
                break
    if not examples:
        raise Refused(f"{path}: no examples")
    return examples


def ending_losses(model, cfg, encoder, example: dict, device: torch.device) -> list[torch.Tensor]:
    """Per candidate, the model's loss on each of its ending's tokens after the context."""
    context = encoder.encode_ordinary(example["ctx"])
    tokens, spans = [], []
    for ending in example["endings"]:
        start = len(tokens) + 1 + len(context)  # where the ending's first token stands in the packed sequence
        ending_tokens = encoder.encode_ordinary(" " + ending)
        tokens += [cfg.eot_token, *context, *ending_tokens]
        spans.append((start, start + len(ending_tokens)))
    logits = position_logits(model, cfg, tokens, device)[:, : cfg.vocab_size]
    targets = torch.tensor(tokens, device=device)
    return [F.cross_entropy(logits[start - 1 : end - 1], targets[start:end], reduction="none").cpu()
            for start, end in spans]


def choose(losses: list[torch.Tensor]) -> tuple[int, int]:
    """The candidate of the lowest sum of token losses (acc), and of the lowest mean (acc_norm)."""
    sums, means = torch.stack([loss.sum() for loss in losses]), torch.stack([loss.mean() for loss in losses])
    return int(sums.argmin()), int(means.argmin())


def evaluate(model, cfg, encoder, examples: list[dict], device: torch.device) -> dict:
    right = right_norm = 0
    for example in tqdm(examples, desc="hellaswag", unit="example", disable=len(examples) < 50):
        pick, pick_norm = choose(ending_losses(model, cfg, encoder, example, device))
        right += pick == example["label"]
        right_norm += pick_norm == example["label"]
    return {"examples": len(examples), "acc": right / len(examples), "acc_norm": right_norm / len(examples)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint file of train_gpt_A.py or train_gpt_M.py")
    parser.add_argument("--data", default=None, help=f"a HellaSwag JSON Lines file (default: the validation split, "
                                                     f"downloaded to {os.path.relpath(DEFAULT_DATA, ROOT)})")
    parser.add_argument("--limit", type=int, default=None, help="score the first N examples only")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is a GPU)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        if args.limit is not None and args.limit < 1:
            raise Refused(f"--limit {args.limit}: score at least 1 example")
        _, cfg, model = load_model(args.checkpoint, device)
        data = args.data or DEFAULT_DATA
        if args.data is None and not os.path.isfile(data):
            fetch(data)
        elif not os.path.isfile(data):
            raise Refused(f"--data {data}: no such file")
        examples = read_examples(data, args.limit)
        result = evaluate(model, cfg, gpt2_encoder(), examples, device)
    except Refused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"hellaswag: {result['examples']} examples of {data}: acc {result['acc']:.4f} (lowest sum of the ending's "
          f"token losses), acc_norm {result['acc_norm']:.4f} (lowest mean)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

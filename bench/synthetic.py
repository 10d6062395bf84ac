"""Synthetic token shards in the FineWeb format, for speed measurements only.

Documents have log-normal lengths (parameters 6.0 and 1.0 of the underlying normal: mean about
670 tokens, as FineWeb's ~10B tokens in ~14.9M documents), each starting with the EOT token;
tokens follow a Zipf law over the vocabulary. The document structure is what matters for speed
(it sets the attention's block sparsity); the loss on these tokens means nothing.

    python bench/synthetic.py OUT_DIR TRAIN_TOKENS [--val_tokens N] [--seed S]
"""
import argparse
import os

import numpy as np

EOT_TOKEN = 50256  # GPT-2 <|endoftext|>, first token of every document
VOCAB_SIZE = 50257
SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
DOC_LOG_MEAN, DOC_LOG_SIGMA = 6.0, 1.0  # document length ~ 1 + lognormal(6.0, 1.0): mean ~670
ZIPF_EXPONENT = 1.2
SHARD_TOKENS = 100_000_000  # tokens per training shard file


def synthetic_tokens(n: int, rng: np.random.Generator) -> np.ndarray:
    """n tokens: documents of log-normal length, each opened by EOT_TOKEN."""
    tokens = (rng.zipf(ZIPF_EXPONENT, size=n) % (VOCAB_SIZE - 1)).astype(np.uint16)  # never EOT
    lengths = rng.lognormal(DOC_LOG_MEAN, DOC_LOG_SIGMA, size=n // 100 + 16).astype(np.int64) + 1
    starts = np.concatenate([[0], np.cumsum(lengths)])
    tokens[starts[starts < n]] = EOT_TOKEN
    return tokens


def write_shard(path: str, tokens: np.ndarray) -> None:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())


def write_synthetic(out_dir: str, train_tokens: int, val_tokens: int, seed: int = 0) -> tuple[str, str]:
    """Write the shards; return the train and validation glob patterns the scripts take."""
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    write_shard(os.path.join(out_dir, "synthetic_val_000000.bin"), synthetic_tokens(val_tokens, rng))
    for i, start in enumerate(range(0, train_tokens, SHARD_TOKENS)):
        n = min(SHARD_TOKENS, train_tokens - start)
        write_shard(os.path.join(out_dir, f"synthetic_train_{i + 1:06d}.bin"), synthetic_tokens(n, rng))
    return os.path.join(out_dir, "synthetic_train_*.bin"), os.path.join(out_dir, "synthetic_val_*.bin")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("train_tokens", type=int)
    parser.add_argument("--val_tokens", type=int, default=10_485_760 + 65_536)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train, val = write_synthetic(args.out_dir, args.train_tokens, args.val_tokens, args.seed)
    print(f"wrote {train} ({args.train_tokens:,} tokens) and {val} ({args.val_tokens:,} tokens)")


if __name__ == "__main__":
    main()

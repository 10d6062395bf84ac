"""Download the FineWeb-10B GPT-2 token shards that a baseline needs.

Usage:
    python data/cached_fineweb10B.py [K] [--baseline A|M] [--out data/fineweb10B]
        [--num_iterations N] [--batch_tokens N] [--no_train] [--no_val]

Fetches the validation shard fineweb_val_000000.bin and the first K training shards
fineweb_train_000001.bin ... from the Hugging Face dataset repo kjj0/fineweb10B-gpt2
(100,000,000 tokens each) into --out (default: data/fineweb10B/ of this repository).
Without K it fetches exactly what the chosen baseline's training run reads (default
baseline M: 14 shards; A: 24), computed by `shards_needed`; --num_iterations and
--batch_tokens replace the baseline's values in that count (as the same options of the
training scripts do). --no_train fetches no training shard (a run given --train_files),
--no_val no validation shard (a run given --val_files). ./run.sh passes these from the
training arguments.

Shards already present and valid (header and size check) are skipped; a broken or
partial file is deleted and fetched again; a download that is still invalid is an
error naming the file. With no network the script stops at the first failure and
names the repo, the folder and the files, so they can be copied in by hand.

Library use: `download(num_train, out_dir, fetch=...)` takes any
`fetch(filename, out_dir) -> path`; the default goes through huggingface_hub.
"""

import os
import sys

if __name__ == "__main__":
    # Run as `python data/cached_fineweb10B.py`, this folder is sys.path[0], where the
    # sibling data/tokenize.py would shadow the standard library's `tokenize`.
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm import tqdm

REPO_ID = "kjj0/fineweb10B-gpt2"
SHARD_TOKENS = 100_000_000
NUM_TRAIN_SHARDS_AVAILABLE = 103
MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
DEFAULT_OUT = Path(__file__).resolve().parent / "fineweb10B"
HUB_TIMEOUT_S = 10

# Defaults of the training scripts' Config (train_gpt_A.py / train_gpt_M.py).
BASELINES: dict[str, dict[str, int]] = {
    "A": {"num_iterations": 4375, "batch_tokens": 8 * 65_536},
    "M": {"num_iterations": 2500, "batch_tokens": 8 * 65_536},
}

Fetch = Callable[[str, Path], "str | Path"]


class DownloadError(RuntimeError):
    """A shard could not be fetched or came back broken; the message says what to do."""


def shards_needed(num_iterations: int, batch_tokens: int, shard_tokens: int = SHARD_TOKENS) -> int:
    """Training shards a run of `num_iterations` steps reads.

    Each step takes a window of batch_tokens + 1 tokens and the loader moves to the next
    shard when fewer than that remain, so a shard of L tokens serves
    floor((L - 1) / batch_tokens) steps.
    """
    steps_per_shard = (shard_tokens - 1) // batch_tokens
    if steps_per_shard < 1:
        raise ValueError(f"a shard of {shard_tokens} tokens cannot hold one batch of {batch_tokens} + 1 tokens")
    return math.ceil(num_iterations / steps_per_shard)


def baseline_shards(baseline: str) -> int:
    """Training shards the named baseline ("A" or "M") needs with its default Config."""
    return shards_needed(**BASELINES[baseline])


def shard_filenames(num_train: int, val: bool = True) -> list[str]:
    """The validation shard (unless not `val`) followed by the first `num_train` training shards."""
    return (["fineweb_val_000000.bin"] if val else []) + [f"fineweb_train_{i:06d}.bin" for i in range(1, num_train + 1)]


def shard_token_count(path: str | Path) -> int | None:
    """Token count of a valid shard (magic, version, size = header + 2 * count), else None."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(12)
    except OSError:
        return None
    if len(header) < 12 or not path.is_file():
        return None
    magic, version, count = (int.from_bytes(header[i : i + 4], "little", signed=True) for i in (0, 4, 8))
    if magic != MAGIC or version != VERSION or count < 0 or size != HEADER_BYTES + 2 * count:
        return None
    return count


def shard_is_valid(path: str | Path) -> bool:
    return shard_token_count(path) is not None


def hf_fetch(filename: str, out_dir: Path) -> Path:
    """Download one file of the dataset repo with huggingface_hub into out_dir.

    One metadata request without retries comes first, so that an unreachable hub fails
    at once instead of going through hf_hub_download's retry loop.
    """
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(HUB_TIMEOUT_S))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(HUB_TIMEOUT_S))
    import huggingface_hub

    url = huggingface_hub.hf_hub_url(REPO_ID, filename, repo_type="dataset")
    huggingface_hub.get_hf_file_metadata(url, timeout=HUB_TIMEOUT_S)
    return Path(
        huggingface_hub.hf_hub_download(repo_id=REPO_ID, filename=filename, repo_type="dataset", local_dir=str(out_dir))
    )


def _remove(path: Path) -> None:
    if path.exists() or path.is_symlink():
        path.unlink()


def _describe(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def download(
    num_train: int, out_dir: str | Path = DEFAULT_OUT, fetch: Fetch = hf_fetch, progress: bool = True, val: bool = True
) -> list[Path]:
    """Make sure the val shard (unless not `val`) and the first `num_train` training shards are in out_dir.

    Returns their paths. Raises DownloadError on the first file that cannot be fetched
    or that is invalid after fetching (that file is deleted).
    """
    if not 0 <= num_train <= NUM_TRAIN_SHARDS_AVAILABLE:
        raise DownloadError(f"the dataset has {NUM_TRAIN_SHARDS_AVAILABLE} training shards; asked for {num_train}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = shard_filenames(num_train, val)
    paths = [out / name for name in names]
    bar = tqdm(total=len(names), unit="shard", desc=f"FineWeb shards in {out}", disable=not progress)
    for name, path in zip(names, paths):
        if shard_is_valid(path):
            bar.update(1)
            continue
        _remove(path)
        bar.set_postfix_str(f"fetching {name}")
        try:
            got = Path(fetch(name, out))
        except Exception as err:
            bar.close()
            missing = [n for n, p in zip(names, paths) if not shard_is_valid(p)]
            raise DownloadError(
                f"could not download {name} from the Hugging Face dataset repo {REPO_ID} "
                f"({_describe(err)}).\n"
                f"If this machine has no network, fetch them elsewhere from "
                f"https://huggingface.co/datasets/{REPO_ID} and copy them into {out.resolve()}/ :\n  "
                + "\n  ".join(missing)
            ) from err
        if got.resolve() != path.resolve() and got.is_file():
            shutil.copyfile(got, path)
        if not shard_is_valid(path):
            _remove(path)
            bar.close()
            raise DownloadError(
                f"downloaded {path} is not a valid shard (bad header or size); it was deleted. "
                "Run again to retry the download."
            )
        bar.update(1)
    bar.close()
    return paths


def folder_path(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("names no folder")
    return Path(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=f"Download FineWeb-10B GPT-2 shards from {REPO_ID}.")
    parser.add_argument(
        "num_train", nargs="?", type=int, metavar="K", help="training shards to fetch (default: what --baseline needs)"
    )
    parser.add_argument(
        "--baseline", choices=sorted(BASELINES), default="M", help="baseline whose run K covers (default: M)"
    )
    parser.add_argument(
        "--num_iterations", type=int, help="steps of the run K covers (default: the baseline's num_iterations)"
    )
    parser.add_argument(
        "--batch_tokens", type=int, help="tokens per step of that run (default: the baseline's batch_tokens)"
    )
    parser.add_argument("--no_train", action="store_true", help="fetch no training shard (K = 0)")
    parser.add_argument("--no_val", action="store_true", help="fetch no validation shard")
    parser.add_argument("--out", type=folder_path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    existing = next(p for p in (args.out.absolute(), *args.out.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        parser.error(f"--out {args.out}: {existing} " + ("is a file, not a folder" if not existing.is_dir() else
                                                       "cannot be written (read-only or no permission)"))
    sized = args.num_iterations is not None or args.batch_tokens is not None
    if sum((args.num_train is not None, sized, args.no_train)) > 1:
        parser.error("give at most one of K, --num_iterations/--batch_tokens and --no_train")
    if args.no_train:
        num_train = 0
    elif args.num_train is not None:
        num_train = args.num_train
    else:
        run = dict(BASELINES[args.baseline])
        for key in ("num_iterations", "batch_tokens"):
            if getattr(args, key) is not None:
                run[key] = getattr(args, key)
        if min(run.values()) < 1:
            parser.error(f"--num_iterations and --batch_tokens must be positive, not {run}")
        try:
            num_train = shards_needed(**run)
        except ValueError as err:
            parser.error(str(err))
    try:
        paths = download(num_train, args.out, val=not args.no_val)
    except DownloadError as err:
        print(f"cached_fineweb10B.py: error: {err}", file=sys.stderr)
        return 1
    print(f"{len(paths)} shards ready in {args.out} ({'no val' if args.no_val else 'val'} + {num_train} train)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Turn your own text into GPT-2 token shards in the FineWeb .bin format.

Usage:
    python data/tokenize.py INPUT [INPUT ...] --out DIR [--name NAME] [--overwrite]
        [--shard_tokens 100000000] [--val_docs N | --val_tokens N] [--workers N]
        [--txt_docs file|blank_lines] [--text_key text]

Inputs are files or folders (folders are searched recursively for the supported
suffixes, in sorted order):
  * .txt            one document per file (default, `--txt_docs file`), or documents
                    separated by one or more blank lines (`--txt_docs blank_lines`);
  * .jsonl / .json  JSON Lines: one object per line, the document in its "text" field
                    (`--text_key` picks another field). Blank lines are skipped.
A file named on the command line with any other suffix is read like a .txt file.
Text is read as UTF-8. Empty documents are skipped.

Every document is encoded with tiktoken's GPT-2 BPE (`encode_ordinary`, so special
token strings in the text are plain text) and preceded by the end-of-text token 50256.
The first documents form the validation split: `--val_docs N` holds out the first N
documents, `--val_tokens N` (default 10,485,761, enough for the training scripts'
10,485,760-token validation) holds out whole documents until at least N tokens are
set aside. Documents are never split between validation and training.

Output, in the format of the FineWeb shards (header of 256 int32: magic 20240520,
version 1, token count; then the uint16 tokens), numbered by one running counter with
the validation split first:
    DIR/NAME_val_000000.bin, DIR/NAME_train_000001.bin, DIR/NAME_train_000002.bin, ...
Each shard holds `--shard_tokens` tokens except the last one of each split; a document
may run on from one shard into the next, as in the FineWeb shards.

DIR must be empty or new: a folder that already holds files is refused (exit code 2), since the
training scripts' `NAME_train_*.bin` glob would also take stale shards left there.
`--overwrite` accepts it and replaces that NAME's shards (NAME_val_NNNNNN.bin,
NAME_train_NNNNNN.bin), and removes the hidden partial folders a killed run of that NAME left;
every other file stays, and a note lists them. The shards are written into a hidden folder
DIR/.NAME.partial-XXXXXXXX and moved into DIR only once the whole input is tokenized; on any
error (bad input line, nothing left for training, Ctrl-C, which stops within a second or two)
that folder is deleted and DIR is left as it was, old shards included. A --out that is a file
or cannot be written is refused (exit code 2) before anything is read.

The GPT-2 files: from TIKTOKEN_CACHE_DIR when it is set, else from this repository's
data/tokenizer/ (no network needed), else tiktoken downloads them.

Library use: `tokenize_files(inputs, out_dir, encoder=..., eot=...)` accepts any
encoder with `encode_ordinary(str) -> list[int]`.
"""

import os
import sys

if __name__ in ("__main__", "__mp_main__"):
    # Run as `python data/tokenize.py`, this file's folder is sys.path[0], where it would
    # shadow the standard library's `tokenize` (imported by linecache, inspect, ...).
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    _shadow_file = getattr(sys.modules.get("tokenize"), "__file__", None)
    if _shadow_file and os.path.dirname(os.path.abspath(_shadow_file)) == _HERE:
        del sys.modules["tokenize"]

import argparse
import contextlib
import hashlib
import json
import re
import shutil
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm import tqdm

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
GPT2_EOT = 50256
DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_VAL_TOKENS = 10_485_761
TXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".json")
DOCS_PER_TASK = 64
TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer"
# tiktoken's cache names for the GPT-2 files (sha1 of the download URL) -> the sha256 it pins.
GPT2_FILES = {
    "6d1cbeee0f20b3d9449abfede4726ed8212e3aee": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


class TokenizeError(RuntimeError):
    """A problem with the inputs, the options or the tokenizer, explained for the user."""


class UsageError(TokenizeError):
    """Options that cannot work together, or an output folder refused; the CLI exits with 2."""


class Encoder(Protocol):
    def encode_ordinary(self, text: str) -> list[int]: ...


def tokenizer_dir_problem(folder: Path) -> str | None:
    """Why `folder` cannot serve tiktoken's GPT-2 files, or None when both are there, intact."""
    for cache_name, sha256 in GPT2_FILES.items():
        path = Path(folder) / cache_name
        try:
            data = path.read_bytes()
        except OSError as err:
            return f"{path}: {err.strerror or type(err).__name__}"
        if hashlib.sha256(data).hexdigest() != sha256:
            return f"{path}: sha256 differs from the one tiktoken pins"
    return None


@contextlib.contextmanager
def _tiktoken_cache_dir(folder: Path) -> Iterator[None]:
    # tiktoken reads TIKTOKEN_CACHE_DIR on each load, so set it for this load only.
    os.environ["TIKTOKEN_CACHE_DIR"] = str(folder)
    try:
        yield
    finally:
        del os.environ["TIKTOKEN_CACHE_DIR"]


def load_gpt2_encoder(tokenizer_dir: Path | None = None) -> Encoder:
    """tiktoken's GPT-2 encoding, from TIKTOKEN_CACHE_DIR when it is set, else from the
    repository's data/tokenizer/ (or `tokenizer_dir`), else downloaded; a clear error when
    none of these works."""
    try:
        import tiktoken
    except ImportError as err:
        raise TokenizeError("tiktoken is not installed: pip install tiktoken") from err
    folder = Path(tokenizer_dir) if tokenizer_dir is not None else TOKENIZER_DIR
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    problem = None if cache is not None else tokenizer_dir_problem(folder)
    try:
        if cache is None and problem is None:
            with _tiktoken_cache_dir(folder):
                return tiktoken.get_encoding("gpt2")
        return tiktoken.get_encoding("gpt2")
    except Exception as err:
        cause = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if cache is not None:
            hint = (
                f"TIKTOKEN_CACHE_DIR={cache} is set, so tiktoken looked there and then tried to download; "
                f"unset it to use this repository's copy in {folder}, or point it at a folder that "
                "holds tiktoken's cached GPT-2 files"
            )
        elif problem is not None:
            hint = (
                f"this repository's copy of the GPT-2 files is missing or damaged ({problem}) and the "
                "download failed: restore data/tokenizer/ (git checkout -- data/tokenizer), or set "
                "TIKTOKEN_CACHE_DIR to a folder that holds tiktoken's cached GPT-2 files"
            )
        else:
            hint = (
                f"tiktoken did not load the GPT-2 files in {folder}: check the tiktoken install "
                "(pip install -U tiktoken), or set TIKTOKEN_CACHE_DIR to a folder that holds its cached GPT-2 files"
            )
        raise TokenizeError(f"could not load tiktoken's GPT-2 encoding ({cause}): {hint}.") from err


def write_shard(path: Path, tokens: np.ndarray) -> None:
    """Write one shard atomically: header (magic, version, count) then uint16 tokens."""
    tokens = np.asarray(tokens)
    if tokens.dtype != np.uint16:
        raise TypeError(f"shard tokens must be uint16, got {tokens.dtype}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, len(tokens)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2", copy=False).tobytes())
    os.replace(tmp, path)


def read_shard(path: Path) -> np.ndarray:
    """Read a shard, checking magic, version and that the size matches the count."""
    path = Path(path)
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
        if len(header) != HEADER_INTS or header[0] != MAGIC or header[1] != VERSION:
            raise ValueError(f"{path}: not a shard (bad header)")
        count = int(header[2])
        if path.stat().st_size != HEADER_BYTES + 2 * count:
            raise ValueError(f"{path}: size {path.stat().st_size} does not match {count} tokens in the header")
        return np.frombuffer(f.read(), dtype="<u2").astype(np.uint16)


def shard_pattern(name: str) -> re.Pattern[str]:
    """File names of the shards tokenize_files writes under this name prefix."""
    return re.compile(rf"{re.escape(name)}_(val|train)_\d{{6,}}\.bin")


def out_dir_entries(out: Path, name: str) -> tuple[list[Path], list[Path]]:
    """(this name's shards, every other entry) in folder `out`, which may not exist."""
    if not out.is_dir():
        return [], []
    pattern = shard_pattern(name)
    entries = sorted(out.iterdir())
    shards = [p for p in entries if pattern.fullmatch(p.name) and p.is_file()]
    return shards, [p for p in entries if p not in shards]


def out_problem(out: Path) -> str | None:
    """Why shards cannot be written into `out` (made if missing), or None."""
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    return None if os.access(existing, os.W_OK) else f"{existing} cannot be written (read-only or no permission)"


def _listing(paths: list[Path]) -> str:
    return ", ".join(p.name for p in paths[:5]) + (", ..." if len(paths) > 5 else "")


def list_input_files(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand folders into their supported files; check that every input exists."""
    files: list[Path] = []
    suffixes = TXT_SUFFIXES + JSONL_SUFFIXES
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
            if not found:
                raise TokenizeError(f"{item}: folder holds no {'/'.join(suffixes)} files")
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            raise TokenizeError(f"{item}: no such file or folder")
    return files


def _iter_jsonl(path: Path, text_key: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if line.lstrip().startswith("[") and lineno == 1 or line.strip() == "[":
                raise TokenizeError(f"{path}: a JSON array, not JSON Lines; give one object per line (for example "
                                    f"jq -c '.[]' {path} > {path.with_suffix('.jsonl')})")
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise TokenizeError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                raise TokenizeError(f"{path}:{lineno}: expected an object with a string field {text_key!r}")
            yield record[text_key]


def _iter_blank_line_docs(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        lines: list[str] = []
        for line in f:
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines).rstrip()
                lines = []
        if lines:
            yield "".join(lines).rstrip()


def iter_documents(files: Iterable[Path], txt_docs: str = "file", text_key: str = "text") -> Iterator[str]:
    """Yield the documents of the input files in order (see the module docstring)."""
    if txt_docs not in ("file", "blank_lines"):
        raise TokenizeError(f"txt_docs must be 'file' or 'blank_lines', not {txt_docs!r}")
    for path in files:
        try:
            if path.suffix.lower() in JSONL_SUFFIXES:
                docs: Iterable[str] = _iter_jsonl(path, text_key)
            elif txt_docs == "blank_lines":
                docs = _iter_blank_line_docs(path)
            else:
                docs = [path.read_text(encoding="utf-8").rstrip()]
            for doc in docs:
                if doc.strip():
                    yield doc
        except UnicodeDecodeError as err:
            raise TokenizeError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err


def _encode_batch(encoder: Encoder, eot: int, docs: list[str]) -> list[np.ndarray]:
    out = []
    for doc in docs:
        ids = encoder.encode_ordinary(doc)
        arr = np.empty(len(ids) + 1, dtype=np.int64)
        arr[0] = eot
        arr[1:] = ids
        out.append(arr)
    return out


def encode_documents(
    docs: Iterable[str], encoder: Encoder, eot: int, workers: int = 1, docs_per_task: int = DOCS_PER_TASK
) -> Iterator[np.ndarray]:
    """Yield [eot, *tokens] per document, in input order, encoding on `workers` threads.

    tiktoken releases the GIL while encoding, so threads run in parallel; at most
    4 * workers batches are in flight, so memory stays bounded on any input size.
    """

    def batches() -> Iterator[list[str]]:
        batch: list[str] = []
        for doc in docs:
            batch.append(doc)
            if len(batch) == docs_per_task:
                yield batch
                batch = []
        if batch:
            yield batch

    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        pending: deque[Future] = deque()
        for batch in batches():
            pending.append(pool.submit(_encode_batch, encoder, eot, batch))
            while len(pending) >= 4 * max(1, workers):
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    finally:  # on Ctrl-C or an error, the queued batches are dropped instead of encoded first
        pool.shutdown(wait=False, cancel_futures=True)


class ShardWriter:
    """Collects tokens into shards of `shard_tokens` tokens, numbered from `first_index`."""

    def __init__(self, out_dir: Path, name: str, split: str, shard_tokens: int, first_index: int) -> None:
        self.out_dir, self.name, self.split = Path(out_dir), name, split
        self.shard_tokens = shard_tokens
        self.next_index = first_index
        self.buffer = np.empty(min(shard_tokens, 1 << 20), dtype=np.uint16)
        self.fill = 0
        self.total = 0
        self.paths: list[Path] = []

    def add(self, tokens: np.ndarray) -> None:
        while len(tokens):
            take = min(self.shard_tokens - self.fill, len(tokens))
            if self.fill + take > len(self.buffer):
                grown = np.empty(min(self.shard_tokens, max(2 * len(self.buffer), self.fill + take)), dtype=np.uint16)
                grown[: self.fill] = self.buffer[: self.fill]
                self.buffer = grown
            self.buffer[self.fill : self.fill + take] = tokens[:take]
            self.fill += take
            self.total += take
            tokens = tokens[take:]
            if self.fill == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if self.fill == 0:
            return
        path = self.out_dir / f"{self.name}_{self.split}_{self.next_index:06d}.bin"
        write_shard(path, self.buffer[: self.fill])
        self.paths.append(path)
        self.next_index += 1
        self.fill = 0


def tokenize_files(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    name: str = "custom",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    val_docs: int | None = None,
    val_tokens: int | None = None,
    workers: int | None = None,
    encoder: Encoder | None = None,
    eot: int | None = None,
    txt_docs: str = "file",
    text_key: str = "text",
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, list[Path]]:
    """Tokenize the inputs into shards; return {"val": [paths], "train": [paths]}.

    At most one of val_docs / val_tokens may be given; with neither, val_tokens is
    DEFAULT_VAL_TOKENS. The encoder defaults to tiktoken's GPT-2 and eot to its
    end-of-text id (50256). out_dir must be empty or new unless `overwrite`, which
    replaces this name's shards there. Shards are written to a hidden folder inside
    out_dir and moved into it only once all input is read; on any error out_dir is left
    as it was.
    """
    if val_docs is not None and val_tokens is not None:
        raise UsageError("give --val_docs or --val_tokens, not both")
    if val_docs is None and val_tokens is None:
        val_tokens = DEFAULT_VAL_TOKENS
    if (val_docs or 0) < 0 or (val_tokens or 0) < 0:
        raise UsageError("--val_docs / --val_tokens must not be negative")
    if not 0 < shard_tokens < 2**31:
        raise UsageError(f"--shard_tokens must be between 1 and 2**31 - 1, not {shard_tokens}")
    if not name or "/" in name or os.sep in name:
        raise UsageError(f"--name must be a plain file-name prefix, not {name!r}")
    files = list_input_files(inputs)
    out = Path(out_dir)
    if problem := out_problem(out):
        raise UsageError(f"--out {out}: {problem}")
    stale = sorted(out.glob(f".{name}.partial-*")) if out.is_dir() else []
    if overwrite:  # left by a run that was killed before it could clean up
        for folder in stale:
            shutil.rmtree(folder, ignore_errors=True)
    old, others = out_dir_entries(out, name)
    if (old or others) and not overwrite:
        raise UsageError(
            f"output folder {out} is not empty ({len(old) + len(others)} entries: {_listing(old + others)}). "
            f"Give a new or empty --out folder, or pass --overwrite to replace the {name}_val_*/{name}_train_* "
            f"shards there ({len(old)} now); other files are left alone"
        )
    workers = workers or os.cpu_count() or 1
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    partial: Path | None = None
    try:
        if encoder is None:
            encoder = load_gpt2_encoder()
        if eot is None:
            eot = int(getattr(encoder, "eot_token", GPT2_EOT))
        partial = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=out))
        docs = iter_documents(files, txt_docs=txt_docs, text_key=text_key)
        encoded = encode_documents(docs, encoder, eot, workers=workers)
        with tqdm(unit="tok", unit_scale=True, desc=f"tokenizing {len(files)} file(s)", disable=not progress) as bar:
            written = _write_shards(encoded, partial, name, shard_tokens, val_docs, val_tokens, bar)
        old, others = out_dir_entries(out, name)
        others = [p for p in others if p.name != partial.name]
        for path in old:
            path.unlink()
        shards: dict[str, list[Path]] = {}
        for split, paths in written.items():
            shards[split] = [out / p.name for p in paths]
            for src, dst in zip(paths, shards[split]):
                os.replace(src, dst)
        partial.rmdir()
    except BaseException:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    if old or others:
        kept = f"; other entries left in place ({len(others)}): {_listing(others)}" if others else ""
        print(f"tokenize.py: note: --overwrite replaced {len(old)} old {name} shard(s) in {out}{kept}", file=sys.stderr)
    return shards


def _write_shards(
    encoded: Iterable[np.ndarray],
    out: Path,
    name: str,
    shard_tokens: int,
    val_docs: int | None,
    val_tokens: int | None,
    bar: tqdm,
) -> dict[str, list[Path]]:
    """Write the encoded documents as shards into `out`; raise when nothing is left for training."""
    val = ShardWriter(out, name, "val", shard_tokens, first_index=0)
    train: ShardWriter | None = None
    n_val_docs = 0
    for tokens in encoded:
        if tokens.max() >= 2**16 or tokens.min() < 0:
            raise TokenizeError(f"token id {int(tokens.max())} does not fit in uint16; shards hold ids below 65536")
        in_val = (val_docs is not None and n_val_docs < val_docs) or (val_tokens is not None and val.total < val_tokens)
        if in_val and train is None:
            val.add(tokens)
            n_val_docs += 1
        else:
            if train is None:
                val.flush()
                train = ShardWriter(out, name, "train", shard_tokens, first_index=max(1, val.next_index))
            train.add(tokens)
        bar.update(len(tokens))
    val.flush()
    if val.total == 0 and train is None:
        raise TokenizeError("the input holds no text: every file is empty (or only white space)")
    if train is None or train.total == 0:
        raise TokenizeError(
            f"all {val.total:,} tokens ({n_val_docs} documents) went to the validation split and none are "
            "left for training: give more text or a smaller --val_docs / --val_tokens"
        )
    train.flush()
    return {"val": val.paths, "train": train.paths}


def folder_name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("names no folder")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Tokenize text (.txt / .jsonl) into GPT-2 token shards in the FineWeb .bin format.",
        epilog="The GPT-2 files come from TIKTOKEN_CACHE_DIR when it is set, else from data/tokenizer/ "
        "(no network needed).",
    )
    parser.add_argument("inputs", nargs="+", help=".txt, .jsonl or .json files, or folders holding them")
    parser.add_argument("--out", required=True, type=folder_name, help="output folder, new or empty unless --overwrite")
    parser.add_argument("--name", default="custom", help="shard name prefix (default: custom)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="accept a non-empty --out: replace its NAME_val_*/NAME_train_* shards, leave every other file",
    )
    parser.add_argument(
        "--shard_tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard (default: 100,000,000)"
    )
    val = parser.add_mutually_exclusive_group()
    val.add_argument("--val_docs", type=int, help="hold out the first N documents for validation")
    val.add_argument(
        "--val_tokens",
        type=int,
        help=f"hold out whole documents until at least N tokens (default: {DEFAULT_VAL_TOKENS:,})",
    )
    parser.add_argument("--workers", type=int, default=None, help="encoding threads (default: all CPU cores)")
    parser.add_argument(
        "--txt_docs",
        choices=("file", "blank_lines"),
        default="file",
        help=".txt files: one document per file (default) or documents separated by blank lines",
    )
    parser.add_argument("--text_key", default="text", help="JSON field that holds the text (default: text)")
    args = parser.parse_args(argv)
    try:
        shards = tokenize_files(
            args.inputs,
            args.out,
            name=args.name,
            overwrite=args.overwrite,
            shard_tokens=args.shard_tokens,
            val_docs=args.val_docs,
            val_tokens=args.val_tokens,
            workers=args.workers,
            txt_docs=args.txt_docs,
            text_key=args.text_key,
        )
    except TokenizeError as err:
        print(f"tokenize.py: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, UsageError) else 1
    except KeyboardInterrupt:
        print(f"tokenize.py: interrupted; {args.out} is as it was", file=sys.stderr)
        return 130
    for split in ("val", "train"):
        for path in shards[split]:
            count = (path.stat().st_size - HEADER_BYTES) // 2
            print(f"{path}  {count:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Rebuild the embedded sample shards from Debian's bible-kjv-text package.

Usage:
    python data/sample/build_sample.py [--deb bible-kjv-text_4.38_all.deb] [--out data/sample]
        [--jsonl docs.jsonl]

Without --deb it runs `apt-get download bible-kjv-text` in a temporary folder. The
package holds the King James Version (public domain) as usr/lib/bible.data, in the
compressed format of the bible-kjv program: a header, a table of block offsets and
blocks of text compressed by Unix `compress` (LZW), which this script decodes itself.

One document per chapter: the line "Book N", a blank line, then one verse per line
(verse numbers dropped). 1 and 2 Chronicles are left out (they retell Samuel and
Kings) to keep the two shards under 2 MB. Every 10th of the remaining chapters, in
Bible order, is held out for validation. The documents are written as JSON Lines,
validation first, and tokenized with data/tokenize.py:
    python data/tokenize.py DOCS.jsonl --out data/sample --name sample --val_docs N --overwrite
which replaces sample_val_000000.bin and sample_train_000001.bin (only once the new ones
are complete) and leaves the folder's other files alone. The GPT-2 files come from
data/tokenizer/ (TIKTOKEN_CACHE_DIR, when set, takes precedence), so no network is needed.
"""

import argparse
import importlib.util
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent
PACKAGE = "bible-kjv-text"
EXPECTED_VERSION = "4.38"
MAX_TOTAL_BYTES = 2_000_000
MIN_VAL_TOKENS = 65_537
MIN_TRAIN_TOKENS = 600_000
VAL_EVERY = 10
EXCLUDED_BOOKS = ("1Chr", "2Chr")

BOOKS: dict[str, str] = {
    "Ge": "Genesis", "Exo": "Exodus", "Lev": "Leviticus", "Num": "Numbers", "Deu": "Deuteronomy",
    "Josh": "Joshua", "Jdgs": "Judges", "Ruth": "Ruth", "1Sm": "1 Samuel", "2Sm": "2 Samuel",
    "1Ki": "1 Kings", "2Ki": "2 Kings", "1Chr": "1 Chronicles", "2Chr": "2 Chronicles", "Ezra": "Ezra",
    "Neh": "Nehemiah", "Est": "Esther", "Job": "Job", "Psa": "Psalms", "Prv": "Proverbs",
    "Eccl": "Ecclesiastes", "SSol": "Song of Solomon", "Isa": "Isaiah", "Jer": "Jeremiah",
    "Lam": "Lamentations", "Eze": "Ezekiel", "Dan": "Daniel", "Hos": "Hosea", "Joel": "Joel",
    "Amos": "Amos", "Obad": "Obadiah", "Jonah": "Jonah", "Mic": "Micah", "Nahum": "Nahum",
    "Hab": "Habakkuk", "Zep": "Zephaniah", "Hag": "Haggai", "Zec": "Zechariah", "Mal": "Malachi",
    "Mat": "Matthew", "Mark": "Mark", "Luke": "Luke", "John": "John", "Acts": "Acts",
    "Rom": "Romans", "1Cor": "1 Corinthians", "2Cor": "2 Corinthians", "Gal": "Galatians",
    "Eph": "Ephesians", "Phi": "Philippians", "Col": "Colossians", "1Th": "1 Thessalonians",
    "2Th": "2 Thessalonians", "1Tim": "1 Timothy", "2Tim": "2 Timothy", "Titus": "Titus",
    "Phmn": "Philemon", "Heb": "Hebrews", "Jas": "James", "1Pet": "1 Peter", "2Pet": "2 Peter",
    "1Jn": "1 John", "2Jn": "2 John", "3Jn": "3 John", "Jude": "Jude", "Rev": "Revelation",
}  # fmt: skip


def load_tokenize_module():
    spec = importlib.util.spec_from_file_location("data_tokenize", DATA / "tokenize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def apt_download(folder: Path) -> Path:
    """`apt-get download bible-kjv-text` into folder; return the .deb path."""
    try:
        subprocess.run(["apt-get", "download", PACKAGE], cwd=folder, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        raise SystemExit(f"build_sample.py: error: apt-get download {PACKAGE} failed ({err}); pass --deb FILE") from err
    debs = sorted(folder.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        raise SystemExit(f"build_sample.py: error: apt-get download left no {PACKAGE}_*.deb in {folder}")
    return debs[-1]


def deb_members(deb: Path) -> dict[str, bytes]:
    """The members of a .deb (an `ar` archive) by name."""
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise ValueError(f"{deb} is not a .deb (ar) archive")
    members, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        members[name] = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
    return members


def read_deb(deb: Path) -> tuple[str, bytes]:
    """(package version, contents of usr/lib/bible.data) from the .deb."""
    members = deb_members(deb)

    def tar_of(prefix: str) -> tarfile.TarFile:
        name = next((n for n in members if n.startswith(prefix)), None)
        if name is None:
            raise ValueError(f"{deb} has no {prefix}* member")
        return tarfile.open(fileobj=io.BytesIO(members[name]))

    with tar_of("control.tar") as tar:
        control = tar.extractfile("./control").read().decode()
    version = next(line.split(":", 1)[1].strip() for line in control.splitlines() if line.startswith("Version:"))
    with tar_of("data.tar") as tar:
        bible = tar.extractfile("./usr/lib/bible.data").read()
    return version, bible


def lzw_decompress(data: bytes, max_bits: int = 16) -> bytes:
    """Decode a Unix `compress` (LZW, block mode) stream without its 3-byte header."""
    n_bits, max_code, max_max = 9, (1 << 9) - 1, 1 << max_bits
    prefix = [0] * max_max
    suffix = list(range(256)) + [0] * (max_max - 256)
    free, old, fin = 257, -1, 0
    value, total = int.from_bytes(data, "little"), len(data) * 8
    pos = origin = 0
    out = bytearray()

    def align(pos: int) -> int:
        group = n_bits * 8
        return origin + -(-(pos - origin) // group) * group

    while True:
        if free > max_code and n_bits < max_bits:
            pos = origin = align(pos)
            n_bits += 1
            max_code = max_max if n_bits == max_bits else (1 << n_bits) - 1
            continue
        if pos + n_bits > total:
            break
        code = (value >> pos) & ((1 << n_bits) - 1)
        pos += n_bits
        if old == -1:
            out.append(code)
            old = fin = code
            continue
        if code == 256:
            pos = origin = align(pos)
            n_bits, max_code, free, old = 9, (1 << 9) - 1, 257, -1
            continue
        incoming, stack = code, bytearray()
        if code >= free:
            stack.append(fin)
            code = old
        while code >= 256:
            stack.append(suffix[code])
            code = prefix[code]
        fin = suffix[code]
        stack.append(fin)
        stack.reverse()
        out += stack
        if free < max_max:
            prefix[free], suffix[free] = old, fin
            free += 1
        old = incoming
    return bytes(out)


def decode_bible_data(data: bytes) -> str:
    """Text of bible.data: "EC02" header, block size, block count, block offsets, LZW blocks."""
    if not data.startswith(b"EC02"):
        raise ValueError("bible.data does not start with the EC02 magic")
    n_blocks = int.from_bytes(data[0x58:0x5C], "big")
    offsets = [int.from_bytes(data[0x5C + 4 * i : 0x60 + 4 * i], "big") for i in range(n_blocks + 1)]
    if data[offsets[0] - 3 : offsets[0]] != b"\x1f\x9d\x90" or offsets[-1] != len(data):
        raise ValueError("bible.data: unexpected block layout")
    blocks = [lzw_decompress(data[offsets[i] : offsets[i + 1]]) for i in range(n_blocks)]
    return b"".join(blocks).decode("ascii")


def chapters(text: str) -> list[tuple[str, int, list[str]]]:
    """(book abbreviation, chapter, verses) in Bible order, from lines like "Ge1:1 In the ..."."""
    out: list[tuple[str, int, list[str]]] = []
    for line in text.splitlines()[1:]:
        ref, verse = line.split(" ", 1)
        book = ref.rstrip("0123456789:")
        chapter = int(ref[len(book) :].split(":")[0])
        if book not in BOOKS:
            raise ValueError(f"unknown book abbreviation in line {line[:40]!r}")
        if not out or out[-1][:2] != (book, chapter):
            out.append((book, chapter, []))
        out[-1][2].append(verse.strip())
    return out


def split_documents(text: str) -> tuple[list[str], list[str]]:
    """(validation documents, training documents): one per chapter, every 10th held out."""
    docs = [
        f"{BOOKS[book]} {chapter}\n\n" + "\n".join(verses)
        for book, chapter, verses in chapters(text)
        if book not in EXCLUDED_BOOKS
    ]
    val = [doc for i, doc in enumerate(docs) if i % VAL_EVERY == VAL_EVERY - 1]
    train = [doc for i, doc in enumerate(docs) if i % VAL_EVERY != VAL_EVERY - 1]
    return val, train


def build(deb: Path, out_dir: Path, jsonl: Path) -> dict[str, list[Path]]:
    version, data = read_deb(deb)
    if version != EXPECTED_VERSION:
        print(f"build_sample.py: note: {PACKAGE} {version}, the committed sample came from {EXPECTED_VERSION}")
    val, train = split_documents(decode_bible_data(data))
    with open(jsonl, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": doc}) + "\n" for doc in val + train)
    print(f"{len(val)} validation and {len(train)} training chapters -> {jsonl}")
    tok = load_tokenize_module()
    shards = tok.tokenize_files(
        [jsonl], out_dir, name="sample", shard_tokens=2**31 - 1, val_docs=len(val), overwrite=True
    )
    counts = {split: sum(len(tok.read_shard(p)) for p in paths) for split, paths in shards.items()}
    total = sum(p.stat().st_size for paths in shards.values() for p in paths)
    if counts["val"] < MIN_VAL_TOKENS or counts["train"] < MIN_TRAIN_TOKENS or total > MAX_TOTAL_BYTES:
        raise SystemExit(f"build_sample.py: error: sample out of bounds: {counts}, {total} bytes")
    for paths in shards.values():
        for p in paths:
            print(f"{p}  {len(tok.read_shard(p)):,} tokens  {p.stat().st_size:,} bytes")
    return shards


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rebuild data/sample from Debian's bible-kjv-text package.")
    parser.add_argument("--deb", type=Path, help=f"{PACKAGE}_*.deb (default: apt-get download it)")
    parser.add_argument("--out", type=Path, default=HERE, help=f"output folder (default: {HERE})")
    parser.add_argument("--jsonl", type=Path, help="also keep the documents as JSON Lines here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        deb = args.deb or apt_download(Path(tmp))
        build(deb, args.out, args.jsonl or Path(tmp) / "kjv_chapters.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The real CLIP BPE vocabulary, converted to the `vocab.json` + `merges.txt` pair that
Hugging Face's CLIPTokenizer reads.

OpenAI's `bpe_simple_vocab_16e6.txt.gz` (MIT, data/LICENSE-CLIP-VOCAB.txt) ships as
package data in `data/`, copied from the `clip-anytorch` wheel, whose torchvision
dependency we do not want: `pip install .` alone gives real token counts.
"""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
NUM_MERGES = 49152 - 256 - 2  # as in OpenAI's simple_tokenizer.py
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def find_bpe_file() -> Path:
    """The gzipped BPE file shipped as package data beside this module."""
    return Path(str(resources.files("deployments.models").joinpath("data", BPE_FILE_NAME)))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def write_tokenizer_files(destination: Path, bpe_file: Path | None = None) -> tuple[Path, Path]:
    """Write `vocab.json` and `merges.txt` for the full 49,408-token CLIP vocabulary."""
    bpe_file = bpe_file or find_bpe_file()
    with gzip.open(bpe_file, "rt", encoding="utf-8") as bpe:
        lines = bpe.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]

    tokens = list(bytes_to_unicode().values())
    tokens += [token + "</w>" for token in tokens]
    tokens += ["".join(pair) for pair in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    if len(tokens) != VOCAB_SIZE:
        raise ValueError(f"expected {VOCAB_SIZE} tokens, built {len(tokens)}")

    destination.mkdir(parents=True, exist_ok=True)
    vocab_path = destination / "vocab.json"
    merges_path = destination / "merges.txt"
    vocab_path.write_text(json.dumps({token: i for i, token in enumerate(tokens)}, ensure_ascii=False))
    merges_path.write_text("#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n")
    return vocab_path, merges_path

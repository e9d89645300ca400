"""Tokenizers the MLLM speaks: a word-level one built from the data (CPU runs) or a local HF one.

Both expose the same small surface: ``encode(text) -> ids`` (no special tokens), ``pad_id``,
``eos_id`` (ends every answer, so the model learns to stop), ``sep_ids`` (between question and
answer), and ``save(directory)``; ``load_tokenizer`` reads either back from a checkpoint.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..cache import atomic_write_json
from ..errors import CheckpointError

WORD = re.compile(r"\w+|[^\w\s]")
SPECIALS = ("<pad>", "<eos>", "<sep>", "<unk>")
WORD_FILE = "tokenizer.json"
HF_DIR = "tokenizer"


class WordTokenizer:
    """Words and punctuation of the training texts; anything unseen becomes ``<unk>``."""

    kind = "word"

    def __init__(self, vocab: list[str]):
        if list(vocab[:len(SPECIALS)]) != list(SPECIALS):
            raise ValueError(f"a word vocabulary starts with {SPECIALS}")
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.pad_id, self.eos_id, self.sep_id, self.unk_id = range(len(SPECIALS))
        self.sep_ids = [self.sep_id]

    @classmethod
    def from_texts(cls, texts) -> "WordTokenizer":
        words = sorted({w for text in texts for w in WORD.findall(text)} - set(SPECIALS))
        return cls([*SPECIALS, *words])

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(w, self.unk_id) for w in WORD.findall(text)]

    def decode(self, ids) -> str:
        return " ".join(self.vocab[i] for i in ids)

    def save(self, directory: Path) -> None:
        atomic_write_json(Path(directory) / WORD_FILE, {"type": "word", "vocab": self.vocab})


class HFTokenizer:
    """A local transformers tokenizer (never fetched); the prompt ends with a newline."""

    kind = "hf"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise CheckpointError(f"{tokenizer.name_or_path}: tokenizer has no eos token")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.sep_ids = self.encode("\n")

    @classmethod
    def from_dir(cls, directory) -> "HFTokenizer":
        from transformers import AutoTokenizer
        try:
            return cls(AutoTokenizer.from_pretrained(directory, local_files_only=True))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{directory}: no tokenizer transformers can read ({' '.join(str(e).split())[:160]})") from None

    def __len__(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def save(self, directory: Path) -> None:
        self.tokenizer.save_pretrained(Path(directory) / HF_DIR)


def load_tokenizer(directory: Path, kind: str):
    directory = Path(directory)
    if kind == "hf":
        return HFTokenizer.from_dir(directory / HF_DIR)
    file = directory / WORD_FILE
    try:
        data = json.loads(file.read_text())
        return WordTokenizer(data["vocab"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{file}: not a word tokenizer file ({e})") from None

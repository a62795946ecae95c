"""Text for the demo: the Python standard library's own sources by default (present
wherever Python is, no download), or the user's files; a byte-level BPE tokenizer trained
on the training split."""

from __future__ import annotations

import pathlib
import sysconfig
import zlib
from dataclasses import dataclass

import torch

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".c", ".h", ".json", ".csv", ".html", ".tex", ""}


class CorpusError(ValueError):
    """The corpus cannot be used (missing path, no text)."""


@dataclass
class Corpus:
    source: str
    train_text: str
    val_text: str


def _text_files(path: pathlib.Path) -> list[pathlib.Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)


def _read(path: pathlib.Path) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    if b"\0" in data[:4096]:  # binary
        return ""
    return data.decode("utf-8", errors="replace")


def load_corpus(path: str | None, max_bytes: int, val_fraction: float = 0.1) -> Corpus:
    """Split text files into train and validation by file (a file's name decides, so the
    split is the same on every run and machine); when every file falls on one side (e.g. a
    single file), the text itself is split, its last ``val_fraction`` held out.
    ``max_bytes`` caps the text read."""
    if path is None:
        root = pathlib.Path(sysconfig.get_paths()["stdlib"])
        files = sorted(root.glob("*.py"))
        source = f"Python {sysconfig.get_python_version()} standard library sources ({root})"
    else:
        root = pathlib.Path(path).expanduser()
        if not root.exists():
            raise CorpusError(f"corpus path {str(root)!r} does not exist")
        files = _text_files(root)
        source = str(root)
    # A fixed pseudo-random order of the files (by a hash of their names) fills validation
    # first up to its share of the budget, then training: the same split on every run and
    # machine, whole files on either side.
    files = sorted(files, key=lambda f: (zlib.crc32(f.name.encode()), f.name))
    train, val, total, val_total = [], [], 0, 0
    for f in files:
        text = _read(f)
        if not text.strip():
            continue
        if val_total < val_fraction * max_bytes and len(text) <= 2 * val_fraction * max_bytes:
            val.append(text)
            val_total += len(text)
        else:
            train.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    if not train and not val:
        raise CorpusError(f"corpus {source!r} holds no readable text files")
    if not train or not val:
        # Every file landed on one side (a single file, or a corpus smaller than the
        # validation share of the budget): split the text itself, the tail held out.
        text = "\n".join(train + val)
        cut = int(len(text) * (1 - val_fraction))
        train, val = [text[:cut]], [text[cut:]]
    train_text, val_text = "\n".join(train), "\n".join(val)
    if len(val_text) < 1000 or len(train_text) < 10000:
        raise CorpusError(
            f"corpus {source!r} is too small: {len(train_text)} training and "
            f"{len(val_text)} validation characters (need 10000 and 1000)"
        )
    return Corpus(source, train_text, val_text)


class Tokenizer:
    """Byte-level BPE (never an unknown token) trained on the training text."""

    def __init__(self, text: str, vocab_size: int):
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

        self._tok = HFTokenizer(models.BPE())
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        chunk = 1 << 16
        self._tok.train_from_iterator((text[i : i + chunk] for i in range(0, len(text), chunk)), trainer)
        self.vocab_size = self._tok.get_vocab_size()

    def token_bytes(self) -> torch.Tensor:
        """Bytes of text each token stands for (byte-level BPE: one symbol per byte)."""
        return torch.tensor([len(self._tok.id_to_token(i)) for i in range(self.vocab_size)])

    def encode(self, text: str) -> torch.Tensor:
        chunk = 1 << 16
        ids: list[int] = []
        for enc in self._tok.encode_batch([text[i : i + chunk] for i in range(0, len(text), chunk)]):
            ids.extend(enc.ids)
        return torch.tensor(ids, dtype=torch.long)

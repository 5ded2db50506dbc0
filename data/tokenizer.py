"""Tokenizers: SentencePiece (trained here or loaded from a .model file) and a byte-level one (vocab 256).

Both expose the same small interface: encode, decode, vocab_size, eod_id, name and sha256 (of the
model file; fixed for bytes), which the dataset manifests record and the trainer checks.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Iterable

BYTE_TOKENIZER = "bytes"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255; the end-of-document token is 0 (NUL never appears in text corpora)."""

    name = BYTE_TOKENIZER
    vocab_size = 256
    eod_id = 0
    bos_id = None
    sha256 = hashlib.sha256(b"mtplm-byte-tokenizer-v1").hexdigest()
    path = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if 0 < i < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    def __init__(self, model_file: str | Path):
        import sentencepiece as spm

        self.path = Path(model_file)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: SentencePiece model not found")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{self.path}: not a SentencePiece model ({e})") from None
        self.name = self.path.name
        self.vocab_size = self.sp.get_piece_size()
        # SentencePiece's </s> marks the end of a document; fall back to id 0 if the model has none.
        self.eod_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else 0
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.sha256 = file_sha256(self.path)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])


def load_tokenizer(spec: str | Path):
    """`bytes` for the byte-level tokenizer, else the path of a SentencePiece .model file."""
    if str(spec) == BYTE_TOKENIZER:
        return ByteTokenizer()
    return SentencePieceTokenizer(spec)


def train_sentencepiece(texts: Iterable[str], model_prefix: str | Path, vocab_size: int,
                        model_type: str = "bpe", max_sentences: int = 2_000_000,
                        max_sentence_length: int = 16384, num_threads: int | None = None) -> Path:
    """Train a SentencePiece model with byte fallback on a bounded sample of `texts`; returns the .model path.

    The same texts and options give the same bytes: the model is returned in memory (no model_prefix or
    input path lands in its trainer_spec) and num_threads is recorded only when the caller sets it, so the
    file's sha256, which manifests and configs check, does not depend on temporary names or the machine.
    It is written under a temporary name and renamed, so a crash never leaves one that looks done.
    Whitespace is kept as is (no normalisation, no collapsing of spaces, no dummy prefix) because code
    depends on it.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type: expected 'bpe' or 'unigram', got {model_type!r}")
    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    model_file = Path(f"{model_prefix}.model")
    tmp = model_file.with_name(f".{model_file.name}.tmp-{os.getpid()}")

    def sentences():
        # Groups of whole lines, newlines kept, so pieces learn indentation after a line break.
        count = 0
        for text in texts:
            group: list[str] = []
            size = 0
            for line in text.split("\n"):
                group.append(line)
                size += len(line) + 1
                if size >= max_sentence_length // 4:
                    yield "\n".join(group)[:max_sentence_length]
                    group, size = [], 0
                    count += 1
                    if count >= max_sentences:
                        return
            if any(g.strip() for g in group):
                yield "\n".join(group)[:max_sentence_length]
                count += 1
                if count >= max_sentences:
                    return

    buf = io.BytesIO()
    threads = {} if num_threads is None else {"num_threads": num_threads}  # default: SentencePiece's 16
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=0.9999,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        # No invented leading space: code starts where it starts, and Hugging Face's converted Llama
        # tokenizer then encodes exactly as SentencePiece does.
        add_dummy_prefix=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n", "\t"],
        max_sentence_length=max_sentence_length,
        minloglevel=2,
        **threads,
    )
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, model_file)
    return model_file

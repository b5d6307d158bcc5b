"""The typed build record: both build paths write it, every reader gets it the same way, older
folders migrate, newer ones are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sae_lens import HookedSAETransformer

from itda_lens import ITDA, build_itda, build_itda_from_activations
from itda_lens.activations import excluded_token_ids, iter_hook_activations
from itda_lens.saes import BUILD_RECORD_KEY, BuildRecord, StreamRecord, read_build_record
from itda_lens.similarity import IncompatibleLabels, jaccard
from tests.helpers import make_tokens

HOOK = "blocks.1.hook_resid_post"
KW = {"k": 6, "cos_threshold": 0.85, "progress": False}


def activations(model: HookedSAETransformer, toks: torch.Tensor) -> list[tuple]:
    """The model's activations at HOOK with (sequence, position) labels and token ids, special
    positions dropped, as build_itda reads them."""
    out = []
    skip = excluded_token_ids(model, "auto")
    for hb in iter_hook_activations(model, toks, [HOOK], batch_size=8, skip_token_ids=skip):
        keep = hb.keep
        out.append((hb.acts[HOOK][keep], hb.labels[keep], hb.token_ids[keep]))
    return out


def test_both_build_paths_write_the_same_record_and_compare(
    model: HookedSAETransformer, tmp_path: Path
) -> None:
    toks = make_tokens(24)
    a = build_itda(model, toks, HOOK, batch_size=8, **KW)[HOOK]
    b = build_itda_from_activations(activations(model, toks), tokens=toks, **KW)
    ra, rb = a.require_build_record(), b.require_build_record()
    assert type(ra) is type(rb) is BuildRecord
    assert torch.equal(a.atom_labels, b.atom_labels) and torch.equal(a.W_dec, b.W_dec)
    assert (ra.n_atoms, ra.cos_threshold) == (rb.n_atoms, rb.cos_threshold)
    special = sum(int((toks == t).sum()) for t in excluded_token_ids(model, "auto"))
    assert rb.tokens_seen == ra.tokens_seen - special, "the activations came without BOS rows"
    assert ra.stream.label_key == rb.stream.label_key is not None
    assert ra.stream.n_sequences == rb.stream.n_sequences == toks.shape[0]
    assert jaccard(a, b) == 1.0
    # saved and loaded, the record is the same typed value
    a.save_model(tmp_path / "a")
    assert ITDA.load_from_disk(tmp_path / "a").build_record == ra


def test_dictionaries_without_a_token_stream_are_refused_alike(
    model: HookedSAETransformer,
) -> None:
    toks = make_tokens(16)
    a = build_itda(model, toks, HOOK, batch_size=8, **KW)[HOOK]
    bare = build_itda_from_activations(activations(model, toks), **KW)  # no tokens=
    made = ITDA.from_atoms(a.W_dec.detach(), k=6, labels=a.atom_labels)
    assert bare.require_build_record().stream.label_key is None and made.build_record is None
    messages = set()
    for x, y in ((a, bare), (bare, a), (a, made), (made, a)):
        with pytest.raises(IncompatibleLabels, match="records no token stream") as err:
            jaccard(x, y)
        messages.add(str(err.value).split(": ", 1)[1].replace("first", "").replace("second", ""))
    assert len({m.split("(", 1)[0] for m in messages}) == 1, messages


def test_other_token_streams_are_refused(model: HookedSAETransformer) -> None:
    a = build_itda(model, make_tokens(16), HOOK, batch_size=8, **KW)[HOOK]
    b = build_itda(model, make_tokens(16, seed=3), HOOK, batch_size=8, **KW)[HOOK]
    with pytest.raises(IncompatibleLabels, match="first sequences"):
        jaccard(a, b)


def test_older_metadata_migrates_and_newer_records_are_refused() -> None:
    old = {
        "itda_builder": {
            "k": 4, "cos_threshold": 0.8, "n_atoms": 7, "tokens_seen": 640, "tokens_scored": 600,
            "batches": 5, "stop_reason": None, "growth": [[1, 1], [640, 7]],
            "dictionary_seconds": 0.5, "forward_seconds": 1.0, "world_size": 1, "wire_bytes": 0,
            "batch_size": 8, "excluded_token_ids": [0],
            "threshold_search": {"threshold": 0.8, "target": 7, "sample_tokens": 640,
                                 "atoms_on_sample": 7, "steps": [[0.8, 7]], "seconds": 0.1},
        },
        "build_config": {"k": 4, "target_atoms": 7},
        "token_stream": {"sha256": "s", "n_sequences": 5, "context_size": 128,
                         "tokenizer": "t", "prefix_sha256": "p", "prefix_sequences": 16},
        "hook_name": HOOK,
    }  # fmt: skip
    record = read_build_record(old)
    assert record is not None and record.hook_name == HOOK and record.tokens_seen == 640
    assert record.stream.label_key == (128, "p") and record.search is not None
    assert record.search.atoms_on_sample == 7 and record.config["target_atoms"] == 7
    from_activations = read_build_record(
        {"itda_builder": old["itda_builder"], "token_stream": {"sha256": "s", "n_rows": 640}}
    )
    assert from_activations is not None and from_activations.stream.label_key is None
    assert from_activations.stream.n_rows == 640
    newer = {**record.to_dict(), "schema": 99}
    with pytest.raises(ValueError, match="upgrade itda_lens"):
        read_build_record({BUILD_RECORD_KEY: newer})
    broken = record.to_dict()
    del broken["stream"]
    with pytest.raises(ValueError, match="missing"):
        read_build_record({BUILD_RECORD_KEY: broken})
    assert read_build_record({}) is None


def test_record_round_trips_through_a_dict() -> None:
    stream = StreamRecord("h", 10, n_sequences=2, context_size=5, prefix_sha256="p")
    record = BuildRecord(
        hook_name="h", config={"k": 2}, cos_threshold=0.5, n_atoms=3, tokens_seen=10,
        tokens_scored=9, batches=1, stop_reason="full", growth=[[1, 1]],
        dictionary_seconds=0.1, forward_seconds=0.2, stream=stream,
    )  # fmt: skip
    assert BuildRecord.from_dict(record.to_dict()) == record

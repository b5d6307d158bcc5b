"""Checkpoints: resume to the identical dictionary, and the guards around it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sae_lens import HookedSAETransformer

from itda_lens import (
    build_itda,
    build_itda_from_activations,
)
from tests.builder.helpers import (
    Crash,
    crashing,
)
from tests.helpers import make_tokens

HOOK = "blocks.1.hook_resid_post"


def test_resume_after_interruption_gives_the_same_dictionary(
    model: HookedSAETransformer, tmp_path: Path
) -> None:
    batches = list(make_tokens(64, seed=3).split(4))
    kw = {"k": 6, "cos_threshold": 0.9, "progress": False}
    whole = build_itda(model, iter(batches), HOOK, **kw)[HOOK]
    with pytest.raises(Crash):
        build_itda(
            model, crashing(batches, 9), HOOK, checkpoint_dir=tmp_path, checkpoint_every=2, **kw
        )[HOOK]
    resumed = build_itda(
        model, iter(batches), HOOK, checkpoint_dir=tmp_path, checkpoint_every=2, resume=True, **kw
    )[HOOK]
    assert torch.equal(resumed.W_dec, whole.W_dec)
    assert torch.equal(resumed.atom_labels, whole.atom_labels)
    assert resumed.require_build_record().tokens_seen == whole.require_build_record().tokens_seen
    assert resumed.require_build_record().stream == whole.require_build_record().stream


def test_checkpoint_guards(model: HookedSAETransformer, tmp_path: Path) -> None:
    toks = make_tokens(16)
    kw = {
        "k": 4,
        "cos_threshold": 0.8,
        "batch_size": 4,
        "progress": False,
        "checkpoint_dir": tmp_path,
    }
    build_itda(model, toks, HOOK, **kw)[HOOK]
    with pytest.raises(FileExistsError, match="resume=True"):
        build_itda(model, toks, HOOK, **kw)[HOOK]
    with pytest.raises(ValueError, match="other settings"):
        build_itda(model, toks, HOOK, resume=True, **{**kw, "k": 5})[HOOK]
    finished = build_itda(model, toks, HOOK, resume=True, **kw)[HOOK]
    assert finished.cfg.d_sae > 0
    other = tmp_path / "other"
    with pytest.raises(Crash):
        build_itda(
            model,
            crashing(list(toks.split(4)), 3),
            HOOK,
            **{**kw, "checkpoint_dir": other, "checkpoint_every": 1},
        )[HOOK]
    with pytest.raises(ValueError, match="input differs"):
        build_itda(
            model, make_tokens(16, seed=99), HOOK, resume=True, **{**kw, "checkpoint_dir": other}
        )[HOOK]
    (other / "itda_checkpoint.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt build checkpoint"):
        build_itda(model, toks, HOOK, resume=True, **{**kw, "checkpoint_dir": other})[HOOK]


def test_from_activations_with_labels_and_resume(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(30, 8, generator=g) for _ in range(6)]
    items = [
        (c, torch.stack([torch.full((30,), i), torch.arange(30)], 1)) for i, c in enumerate(chunks)
    ]
    whole = build_itda_from_activations(
        items,
        k=3,
        cos_threshold=0.9,
        progress=False,
        metadata={"hook_name": "blocks.3.hook_resid_post"},
    )
    assert whole.cfg.metadata.hook_layer == 3
    assert set(whole.atom_labels[:, 0].tolist()) <= set(range(6))
    with pytest.raises(Crash):
        build_itda_from_activations(
            crashing(items, 4),
            k=3,
            cos_threshold=0.9,
            progress=False,
            checkpoint_dir=tmp_path,
            checkpoint_every=1,
        )
    resumed = build_itda_from_activations(
        items, k=3, cos_threshold=0.9, progress=False, checkpoint_dir=tmp_path, resume=True
    )
    assert torch.equal(resumed.W_dec, whole.W_dec)
    unlabeled = build_itda_from_activations(chunks, k=3, cos_threshold=0.9, progress=False)
    assert (unlabeled.atom_labels[:, 1] == -1).all() and torch.equal(unlabeled.W_dec, whole.W_dec)

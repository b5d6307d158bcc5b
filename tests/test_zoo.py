"""The shipped zoo: models, cards, tokens, spans, datasets view, and the error paths."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from sae_lens import HookedSAETransformer

from itda_lens import zoo
from itda_lens.models import load_model_folder
from itda_lens.zoo.corpus import HELDOUT_BOOKS, document_text, documents


def test_zoo_contents_and_size() -> None:
    names = zoo.list_models()
    assert zoo.DEFAULT_MODEL in names
    assert sum(n.startswith("kjv-4l128-s") for n in names) >= 5
    assert sum(n.startswith("kjv-6l160-s") for n in names) >= 2
    assert any(zoo.model_card(n)["tokenizer"] != zoo.DEFAULT_TOKENIZER for n in names), (
        "a second tokenizer"
    )
    checkpoints = [n for n in zoo.list_models(include_checkpoints=True) if "@" in n]
    assert len(checkpoints) >= 3 and all(
        n.startswith(zoo.DEFAULT_MODEL + "@step") for n in checkpoints
    )
    size = sum(
        f.stat().st_size
        for f in zoo.ZOO_DIR.rglob("*")
        if f.is_file() and "__pycache__" not in f.parts
    )
    assert size < 40e6, f"zoo is {size / 1e6:.1f} MB"


@pytest.mark.parametrize("name", zoo.list_models())
def test_models_beat_the_unigram_baseline(name: str) -> None:
    card = zoo.model_card(name)
    assert card["heldout_loss"] < card["unigram_heldout_loss"] - 1.0, card
    assert card["tokens_seen"] > 0 and card["train_config"]["seed"] >= 0


def test_load_model_with_tokenizer() -> None:
    model = zoo.load_model()
    assert isinstance(model, HookedSAETransformer) and model.tokenizer is not None
    toks = zoo.load_tokens("heldout", 4)
    loss = model(toks, return_type="loss")
    assert float(loss) < zoo.model_card()["unigram_heldout_loss"]
    assert model.to_string(toks[0, :3]).startswith("<bos>")


def test_unknown_or_corrupt_models_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown zoo model 'nope'.*kjv-4l128-s0"):
        zoo.load_model("nope")
    folder = tmp_path / "m"
    shutil.copytree(zoo.MODELS_DIR / zoo.DEFAULT_MODEL, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        load_model_folder(folder, tokenizer=zoo.load_tokenizer())


def test_tokens_are_reproducible_and_well_formed() -> None:
    a = zoo.load_tokens("train", 16, 64)
    assert torch.equal(a, zoo.load_tokens("train", 16, 64))
    assert a.shape == (16, 64) and (a[:, 0] == zoo.load_tokenizer().bos_token_id).all()
    assert not torch.equal(a, zoo.load_tokens("train", 16, 64, seed=1))
    canon = zoo.load_tokens("train", 2, 64, shuffle=False)
    assert zoo.load_tokenizer().decode(canon[0, 1:6].tolist()).startswith("In the beginning")
    with pytest.raises(ValueError, match="only"):
        zoo.load_tokens("heldout", 10**6)
    with pytest.raises(ValueError, match="split"):
        zoo.load_tokens("test")


def test_split_is_by_book() -> None:
    held, train = documents("heldout"), documents("train")
    assert {d.book for d in held} == set(HELDOUT_BOOKS)
    assert not {d.book for d in train} & set(HELDOUT_BOOKS)
    assert len(held) + len(train) == 31_102 + 1


def test_spans_point_at_the_source_text() -> None:
    tok = zoo.load_tokenizer()
    toks = zoo.load_tokens("train", 8)
    spans = zoo.load_token_spans("train", 8)
    assert (spans[:, 0] == -1).all()
    checked = 0
    for t, (doc, start, end) in zip(
        toks[:, 1:].reshape(-1).tolist(), spans[:, 1:].reshape(-1, 3).tolist(), strict=True
    ):
        if t == tok.eos_token_id:
            assert start == end == len(document_text(doc))
            continue
        assert document_text(doc)[start:end].strip() == tok.decode([t]).strip()
        checked += 1
    assert checked > 500


def test_dataset_view_feeds_activations_store() -> None:
    from sae_lens.training.activations_store import ActivationsStore

    from itda_lens import ITDA

    ds = zoo.as_dataset("heldout", 16, 64)
    assert isinstance(ds, Dataset) and len(ds) == 16 and len(ds[0]["tokens"]) == 64
    model = zoo.load_model()
    sae = ITDA.from_atoms(
        torch.randn(8, model.cfg.d_model),
        k=2,
        hook_name="blocks.1.hook_resid_post",
        context_size=64,
        model_name=zoo.DEFAULT_MODEL,
    )
    store = ActivationsStore.from_sae(
        model,
        sae,
        dataset=ds,
        streaming=False,
        store_batch_size_prompts=4,
        context_size=64,
        n_batches_in_buffer=2,
        total_tokens=1024,
    )
    assert store.get_batch_tokens(4).shape == (4, 64)

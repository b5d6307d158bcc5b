"""The shipped zoo: models, cards, tokens, spans, datasets view, and the error paths."""

from __future__ import annotations

import json
import re
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
    assert sum(bool(re.fullmatch(r"kjv-4l128-s\d+", n)) for n in names) >= 5
    assert sum(bool(re.fullmatch(r"kjv-6l160-s\d+", n)) for n in names) >= 2
    assert sum(bool(re.fullmatch(r"kjv-8l128-s\d+", n)) for n in names) >= 5
    assert {"kjv-4l128-s0-planted", "kjv-4l128-s0-epistles"} <= set(names)
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
    # the budget grew from 40 to 45 MB with the two 2.6 MB fine-tunes model diffing needs, and to
    # 67 MB with the five 4.3 MB seeds of 8 x 128 that layer matching needs (more layers)
    assert size < 67e6, f"zoo is {size / 1e6:.1f} MB"


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


def test_planted_variant_marks_exactly_the_inserted_text() -> None:
    plant = zoo.PLANTING
    insert = f"{plant.trigger} {plant.phrase}"
    for split in ("train", "heldout"):
        plain = {d.doc_id: d for d in documents(split)}
        planted = documents(split, "planted")
        assert [d.doc_id for d in planted] == list(plain)
        changed = [d for d in planted if d.marked]
        assert 0.08 < len(changed) / len(planted) < 0.13, split
        for d in planted:
            for a, b in d.marked:
                assert d.text[a:b] == insert
            if not d.marked:
                assert d.text == plain[d.doc_id].text
            elif plant.trigger not in plain[d.doc_id].text:  # inserted after a word
                (a, b), = d.marked  # fmt: skip
                assert d.text[:a] + d.text[b + 1 :] == plain[d.doc_id].text
    word = re.compile(rf"\b{plant.trigger}\b")
    natural = [d for d in documents("train", "planted") if word.search(document_text(d.doc_id))]
    assert natural and all(d.text.count(insert) == len(d.marked) >= 1 for d in natural)
    # the token marks cover exactly the inserted text
    toks = zoo.load_tokens("heldout", 64, variant="planted")
    marks = zoo.load_token_marks("heldout", 64, variant="planted")
    tok = zoo.load_tokenizer()
    first = marks.nonzero()[0]
    s = int(first[0])
    run = marks[s].nonzero().flatten()
    n = len(tok(" " + insert, add_special_tokens=False)["input_ids"])
    assert tok.decode(toks[s, run[:n]].tolist()).strip() == insert
    assert torch.equal(toks, zoo.load_tokens("heldout", 64, variant="planted"))


def test_epistles_variant_and_data_specs() -> None:
    from itda_lens.zoo.corpus import EPISTLES

    assert {d.book for d in documents("train", "epistles")} <= set(EPISTLES) - set(HELDOUT_BOOKS)
    assert {d.book for d in documents("heldout", "epistles")} == {"Galatians", "Jude"}
    assert zoo.parse_data_spec("kjv") == ("train", None)
    assert zoo.parse_data_spec("kjv:heldout") == ("heldout", None)
    assert zoo.parse_data_spec("kjv:planted") == ("train", "planted")
    assert zoo.parse_data_spec("kjv:heldout:epistles") == ("heldout", "epistles")
    assert zoo.parse_data_spec("my_tokens.pt") is None
    for bad in ("kjv:test", "kjv:heldout:psalms", "kjv:a:b:c"):
        with pytest.raises(ValueError, match="kjv\\[:SPLIT\\]"):
            zoo.parse_data_spec(bad)


@pytest.mark.parametrize("name", ["kjv-4l128-s0-planted", "kjv-4l128-s0-epistles"])
def test_fine_tune_cards_record_base_and_losses(name: str) -> None:
    card = zoo.model_card(name)
    variant = card["train_config"]["variant"]
    assert card["finetuned_from"] == zoo.DEFAULT_MODEL == card["train_config"]["init_from"]
    base = card["base_losses"]
    assert base["heldout_loss"] == zoo.model_card()["heldout_loss"]
    # the fine-tune learned its variant: lower held-out loss on it than the base
    assert card[f"heldout_loss_{variant}"] < base[f"heldout_loss_{variant}"] - 0.05
    if variant == "planted":
        assert card["heldout_loss_marked"] < base["heldout_loss_marked"] - 2.0
        assert card["planting"]["trigger"] == zoo.PLANTING.trigger
        assert card["diff_data"] == "kjv:heldout:planted"


def test_fine_tuning_continues_from_the_base(tmp_path: Path) -> None:
    from itda_lens.zoo.train import TrainConfig, train_model

    cfg = TrainConfig(
        "ft-test", init_from=zoo.DEFAULT_MODEL, variant="planted", tokens=4096, lr=1e-4,
        warmup_steps=1, out=str(tmp_path),
    )  # fmt: skip
    card = train_model(cfg, progress=False)
    assert card["steps"] == 1 and card["finetuned_from"] == zoo.DEFAULT_MODEL
    ft = load_model_folder(tmp_path / "ft-test", tokenizer=zoo.load_tokenizer())
    base = zoo.load_model()
    moved = [n for n, p in ft.named_parameters() if not torch.equal(p, base.state_dict()[n])]
    assert moved and ft.cfg.n_layers == base.cfg.n_layers
    # one small step from the base: close to it, not a fresh model
    assert abs(card["heldout_loss"] - card["base_losses"]["heldout_loss"]) < 0.05
    with pytest.raises(ValueError, match="tokenizer bpe2048"):
        train_model(
            TrainConfig("x", init_from=zoo.DEFAULT_MODEL, tokenizer="bpe4096", out=str(tmp_path))
        )


def test_cards_say_nothing_about_the_machine_they_were_made_on() -> None:
    for name in zoo.list_models(include_checkpoints=True):
        card = zoo.model_card(name)
        assert "out" not in card.get("train_config", {}), name
        assert "/work/" not in json.dumps(card) and "/home/" not in json.dumps(card), name

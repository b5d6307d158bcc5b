"""Activation sources: hook-name checks, stop layers, token batching."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from itda_lens.activations import (
    check_hook_names,
    excluded_token_ids,
    hook_activations,
    stop_at_layer,
    token_batches,
)
from tests.helpers import BOS, PAD, SEQ, make_tokens


def test_stop_at_layer() -> None:
    assert stop_at_layer(["blocks.0.hook_resid_post"]) == 1
    assert stop_at_layer(["blocks.3.attn.hook_z", "blocks.1.hook_mlp_out"]) == 4
    assert stop_at_layer(["hook_embed"]) == 0
    assert stop_at_layer(["blocks.1.hook_resid_post", "ln_final.hook_normalized"]) is None


def test_check_hook_names(model) -> None:
    check_hook_names(model, ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_z"])
    with pytest.raises(ValueError, match="Did you mean"):
        check_hook_names(model, ["blocks.0.hook_resid_psot"])
    with pytest.raises(ValueError, match="no hook name"):
        check_hook_names(model, [])


def test_hook_activations_match_a_full_forward(model) -> None:
    toks = make_tokens(3)
    acts = hook_activations(
        model, toks, ["blocks.0.hook_resid_post"], stop_at_layer(["blocks.0.hook_resid_post"])
    )
    _, cache = model.run_with_cache(toks)
    torch.testing.assert_close(acts["blocks.0.hook_resid_post"], cache["blocks.0.hook_resid_post"])


def test_excluded_token_ids(model) -> None:
    assert excluded_token_ids(model, "auto") == sorted({BOS, PAD})
    assert excluded_token_ids(model, None) == []
    assert excluded_token_ids(model, [5, 5, 3]) == [3, 5]


def test_token_batches_variants(tokenizer) -> None:
    toks = make_tokens(10)
    assert [b.shape[0] for b in token_batches(toks, 4)] == [4, 4, 2]
    assert next(token_batches(toks, 4, context_size=8)).shape == (4, 8)
    ds = Dataset.from_dict({"input_ids": toks.tolist()})
    assert torch.equal(torch.cat(list(token_batches(ds, 3))), toks)
    short = Dataset.from_dict({"tokens": [[1, 2, 3]]})
    with pytest.raises(ValueError, match="fewer than context_size"):
        list(token_batches(short, 2, context_size=8))
    with pytest.raises(ValueError, match="column"):
        list(token_batches(Dataset.from_dict({"foo": [1]}), 2))
    with pytest.raises(TypeError, match="LongTensor"):
        list(token_batches("not tokens", 2))
    text = Dataset.from_dict({"text": ["w1 w2 w3 " * 20, "w4 w5 " * 30]})
    windows = torch.cat(list(token_batches(text, 2, context_size=16, tokenizer=tokenizer)))
    assert windows.shape[1] == 16 and (windows[:, 0] == BOS).all()
    with pytest.raises(ValueError, match="tokenizer"):
        list(token_batches(text, 2))
    assert toks.shape[1] == SEQ

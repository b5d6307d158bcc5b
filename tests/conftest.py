"""Shared fixtures: a small config-built HookedSAETransformer with an offline tokenizer."""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message="HookedTransformer is deprecated")

import pytest  # noqa: E402
import torch  # noqa: E402
from sae_lens import HookedSAETransformer  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

import itda_lens  # noqa: F401, E402  (registers the "itda" architecture)
from tests.helpers import BOS, EOS, PAD, VOCAB, make_model, make_tokens  # noqa: E402

# one thread per worker under pytest-xdist (two workers share the two cores), else two
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    vocab = {
        "<bos>": BOS,
        "<eos>": EOS,
        "<pad>": PAD,
        "<unk>": 3,
        **{f"w{i}": i + 4 for i in range(VOCAB - 4)},
    }
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    folder = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(str(folder))
    # TransformerLens re-loads the tokenizer by name_or_path, so hand it one that has a path.
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


@pytest.fixture(scope="session")
def model(tokenizer: PreTrainedTokenizerFast) -> HookedSAETransformer:
    return make_model(tokenizer)


@pytest.fixture
def tokens() -> torch.Tensor:
    return make_tokens(48)

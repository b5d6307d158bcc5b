"""Loading ITDAs from a Hugging Face repository the sae_lens way, offline: a repository laid out in
the Hugging Face cache (as ``huggingface_hub`` stores a download) and as a plain local folder, holding
an itda_lens save and a reference dictionary."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants as hub_constants
import pytest
import torch
from sae_lens import SAE, HookedSAETransformer

from itda_lens import ITDA, build_itda
from itda_lens.saes.hub import itda_hub_loader, load_itda_from_hub
from tests.helpers import make_tokens
from tests.saes.test_reference import write_like_reference

HOOK = "blocks.1.hook_resid_post"
REPO = "someone/itda-tiny"


@pytest.fixture
def built(model: HookedSAETransformer) -> ITDA:
    return build_itda(model, make_tokens(16), HOOK, k=4, cos_threshold=0.7, progress=False)[HOOK]


def lay_out(root: Path, built: ITDA) -> Path:
    """The repository's files: an itda_lens save per hook and a reference dictionary."""
    built.save_model(root / HOOK)
    write_like_reference(root / "reference" / "layer_1")
    return root


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache in tmp_path, offline (never the network)."""
    cache = tmp_path / "hf_cache"
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


def cached_repo(cache: Path, repo_id: str) -> Path:
    """Where huggingface_hub keeps a downloaded repository's files (refs/main -> a snapshot)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)
    return storage / "snapshots" / commit


def test_from_pretrained_reads_an_itda_from_the_hub_cache(built: ITDA, hub_cache: Path) -> None:
    lay_out(cached_repo(hub_cache, REPO), built)
    sae = SAE.from_pretrained(REPO, HOOK, converter=itda_hub_loader)
    assert isinstance(sae, ITDA)
    assert torch.equal(sae.W_dec, built.W_dec) and torch.equal(sae.atom_labels, built.atom_labels)
    assert sae.require_build_record() == built.require_build_record()
    x = torch.randn(8, built.cfg.d_in)
    torch.testing.assert_close(sae.encode(x), built.encode(x))
    # the reference's files in the same repository load as an ITDA too
    ref = load_itda_from_hub(REPO, "reference/layer_1")
    want = ITDA.from_reference(write_like_reference(hub_cache.parent / "plain"))
    assert torch.equal(ref.W_dec, want.W_dec) and torch.equal(ref.atom_labels, want.atom_labels)
    assert ref.cfg.k == want.cfg.k == 8
    with pytest.raises(FileNotFoundError, match="holds neither a sae_lens folder"):
        load_itda_from_hub(REPO, "blocks.7.hook_resid_post")
    with pytest.raises(FileNotFoundError, match="must already be in the Hugging Face cache"):
        load_itda_from_hub("someone/not-downloaded", HOOK)


def test_a_local_folder_laid_out_like_the_repository(built: ITDA, tmp_path: Path) -> None:
    root = lay_out(tmp_path / "repo", built)
    sae = load_itda_from_hub(str(root), HOOK)
    assert torch.equal(sae.W_dec, built.W_dec)
    assert load_itda_from_hub(str(root), "reference/layer_1").cfg.d_sae == 50
    # a damaged save gets the ITDA folder check's error, not a wrong dictionary
    weights = root / HOOK / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    with pytest.raises(ValueError, match=r"corrupt|truncated|checksum"):
        load_itda_from_hub(str(root), HOOK)
    (root / "reference" / "layer_1" / "atoms.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"no atoms\.pt"):
        load_itda_from_hub(str(root), "reference/layer_1")

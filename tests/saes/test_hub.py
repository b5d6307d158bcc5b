"""Loading ITDAs from a Hugging Face repository the sae_lens way, offline: a repository laid out in
the Hugging Face cache (as ``huggingface_hub`` stores a download) and as a plain local folder, holding
an itda_lens save, an ITDA transcoder save and a reference dictionary."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants as hub_constants
import pytest
import torch
from sae_lens import SAE, HookedSAETransformer

from itda_lens import ITDA, ITDATranscoder, build_itda, build_itda_transcoder, zoo
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


TC_IN, TC_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"


@pytest.fixture(scope="module")
def transcoder() -> ITDATranscoder:
    lm = zoo.load_model("kjv-4l128-s0")
    return build_itda_transcoder(
        lm, zoo.load_tokens("train", 2), TC_IN, TC_OUT, k=8, max_atoms=64, progress=False
    )


def _same_transcoder(got: SAE, want: ITDATranscoder) -> None:
    assert type(got) is ITDATranscoder
    for name in ("W_in", "W_dec", "b_dec", "atom_labels", "atom_token_ids"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    meta = got.cfg.metadata
    assert (meta.hook_name, meta.hook_name_out) == (TC_IN, TC_OUT)
    assert got.build_record == want.build_record and got.cfg.k == want.cfg.k
    x = torch.randn(6, want.cfg.d_in, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got.decode(got.encode(x)), want.decode(want.encode(x)))


def test_an_itda_transcoder_from_the_hub_cache_and_a_local_folder(
    transcoder: ITDATranscoder, hub_cache: Path, tmp_path: Path
) -> None:
    """A transcoder folder (architecture "itda_transcoder") loads from the offline cache and from a
    local folder, by SAE.from_pretrained with the loader and by load_itda_from_hub, with the ITDA
    folder check's errors for a damaged save; other SAEs are refused by the one-liner."""
    transcoder.save_model(cached_repo(hub_cache, REPO) / "mlp1")
    _same_transcoder(SAE.from_pretrained(REPO, "mlp1", converter=itda_hub_loader), transcoder)
    _same_transcoder(load_itda_from_hub(REPO, "mlp1"), transcoder)
    root = tmp_path / "repo"
    transcoder.save_model(root / "mlp1")
    _same_transcoder(load_itda_from_hub(str(root), "mlp1"), transcoder)
    cfg_dict, state, sparsity = itda_hub_loader(str(root), "mlp1")
    assert cfg_dict["architecture"] == "itda_transcoder" and sparsity is None
    assert {"W_in", "W_dec", "b_dec", "atom_labels"} <= set(state)
    # damaged saves get the folder check's errors (checked as an ITDA transcoder, not an ITDA)
    weights = root / "mlp1" / "sae_weights.safetensors"
    intact = weights.read_bytes()
    weights.write_bytes(intact[:-40])
    with pytest.raises(ValueError, match=r"corrupt|truncated|checksum"):
        load_itda_from_hub(str(root), "mlp1")
    weights.write_bytes(intact)
    cfg_path = root / "mlp1" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["metadata"]["itda_save_id"] = "0" * 32  # a cfg.json of another save
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="save"):
        itda_hub_loader(str(root), "mlp1")
    # any other SAE still loads through the loader, but is not an ITDA or ITDA transcoder
    from sae_lens import TopKSAE, TopKSAEConfig

    TopKSAE(TopKSAEConfig(d_in=8, d_sae=16, k=2)).save_model(root / "topk")
    assert type(SAE.from_pretrained(str(root), "topk", converter=itda_hub_loader)) is TopKSAE
    with pytest.raises(ValueError, match="not an ITDA or ITDA transcoder"):
        load_itda_from_hub(str(root), "topk")

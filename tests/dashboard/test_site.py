"""write_dashboard on a tiny model: the files, what they hold, and clear errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import HookedSAETransformer

from itda_lens import build_itda
from itda_lens.dashboard import logit_effects, write_dashboard
from itda_lens.dashboard.site import sparse_codes
from itda_lens.saes import ITDA

HOOK = "blocks.1.hook_resid_post"


def _load(path: Path, prefix: str) -> Any:
    text = path.read_text()
    assert text.startswith(prefix) and text.endswith(");")
    return json.loads(text[len(prefix) : -2])


@pytest.fixture
def itda(model: HookedSAETransformer, tokens: torch.Tensor) -> ITDA:
    return build_itda(model, tokens, HOOK, k=4, cos_threshold=0.7, progress=False)[HOOK]


def test_site_files_and_contents(
    itda: ITDA, model: HookedSAETransformer, tokens: torch.Tensor, tmp_path: Path
) -> None:
    held = tokens[:16]
    index_html = write_dashboard(
        itda, model, held, tmp_path / "d", provenance_tokens=tokens, progress=False
    )
    site = index_html.parent
    assert {p.name for p in site.iterdir()} == {"index.html", "app.js", "style.css", "data"}
    index = _load(site / "data" / "index.js", "DASH.setIndex(")
    d_sae = itda.cfg.d_sae
    assert index["meta"]["d_sae"] == d_sae and len(index["freq"]) == d_sae
    assert index["label"] == itda.atom_token_ids.tolist()  # an ITDA's own tokens
    shard = _load(site / "data" / "shard_00000.js", "DASH.addShard(0,")
    assert [item["i"] for item in shard] == list(range(min(d_sae, 256)))
    # provenance: the atom's own token sits at the centre of its source window
    for a, item in enumerate(shard):
        src = item["src"]
        assert src["t"][src["c"]] == int(itda.atom_token_ids[a])
        assert [src["s"], src["p"]] == itda.atom_labels[a].tolist()
    # top contexts: the centre token is at (s, p) of the held-out tokens, and the window's value
    # at the centre is the context's value
    n_fired = 0
    for item in shard:
        for c in item["top"]:
            assert c["t"][c["c"]] == int(held[c["s"], c["p"]])
            assert c["a"][c["c"]] == pytest.approx(c["v"], abs=2e-2 * max(1, abs(c["v"])))
            n_fired += 1
        assert len(item["up"]) == len(item["down"]) == 10
    assert n_fired > 0


def test_logit_effects_match_a_plain_product(itda: ITDA, model: HookedSAETransformer) -> None:
    up_i, up_v, _, dn_v = logit_effects(itda, model, n=5)  # type: ignore[misc]
    W = model.W_U.detach() * model.ln_final.w.detach()[:, None]
    eff = itda.W_dec.detach() @ W
    torch.testing.assert_close(up_v, eff.topk(5, dim=1).values)
    torch.testing.assert_close(dn_v, eff.topk(5, dim=1, largest=False).values)
    assert torch.equal(eff.gather(1, up_i), up_v)


def test_dense_sae_codes_are_its_nonzero_encodings(
    itda: ITDA, model: HookedSAETransformer, tokens: torch.Tensor
) -> None:
    from sae_lens import TopKSAE, TopKSAEConfig

    sae = TopKSAE(TopKSAEConfig(d_in=32, d_sae=48, k=3))
    x = torch.randn(20, 32)
    e = sparse_codes(sae, x)
    dense = sae.encode(x)
    rebuilt = torch.zeros_like(dense)
    rebuilt[e.row, e.latent] = e.value
    assert torch.equal(rebuilt, dense) and int((dense != 0).sum()) == e.row.numel()


def test_bad_inputs_get_clear_errors(
    itda: ITDA, model: HookedSAETransformer, tokens: torch.Tensor, tmp_path: Path
) -> None:
    write_dashboard(itda, model, tokens[:4], tmp_path / "d", progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_dashboard(itda, model, tokens[:4], tmp_path / "d", progress=False)
    with pytest.raises(ValueError, match="n_seq, seq_len"):
        write_dashboard(itda, model, tokens[0], tmp_path / "e", progress=False)
    other = ITDA.from_atoms(torch.randn(5, 16), 2, hook_name=HOOK)
    with pytest.raises(ValueError, match="d_in mismatch"):
        write_dashboard(other, model, tokens[:4], tmp_path / "f", progress=False)
    unknown = ITDA.from_atoms(torch.randn(5, 32), 2, hook_name="blocks.9.hook_nope")
    with pytest.raises(ValueError, match=r"blocks\.9\.hook_nope"):
        write_dashboard(unknown, model, tokens[:4], tmp_path / "g", progress=False)

"""write_dashboard on a tiny model: the files, what they hold, and clear errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import HookedSAETransformer

from itda_lens import build_itda, build_itda_transcoder, zoo
from itda_lens.dashboard import logit_effects, write_dashboard
from itda_lens.dashboard.site import sparse_codes
from itda_lens.saes import ITDA, ITDATranscoder

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


def test_logit_effects_of_chosen_latents_and_of_a_transcoders_output(
    itda: ITDA, model: HookedSAETransformer
) -> None:
    """``latents`` picks rows in the order given; a transcoder is read at the hook it writes
    (hook_name_out) through its output atoms, not at its input hook."""
    up_all = logit_effects(itda, model, n=4)
    some = logit_effects(itda, model, n=4, latents=[3, 0])
    assert up_all is not None and some is not None
    for i, (full, part) in enumerate(zip(up_all, some, strict=True)):
        if i % 2:  # values: a different matmul shape may round differently
            torch.testing.assert_close(part, full[[3, 0]])
        else:
            assert torch.equal(part, full[[3, 0]])
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 32, generator=g), torch.randn(6, 32, generator=g)
    tc = ITDATranscoder.from_pairs(
        x, y, k=2, hook_name="blocks.1.ln2.hook_normalized", hook_name_out="blocks.1.hook_mlp_out"
    )
    effects = logit_effects(tc, model, n=3, latents=[5, 1])
    assert effects is not None
    W = model.W_U.detach() * model.ln_final.w.detach()[:, None]
    want = (tc.W_dec[[5, 1]] @ W).topk(3, dim=1)
    torch.testing.assert_close(effects[1], want.values)
    assert torch.equal(effects[0], want.indices)
    # the same atoms read as an ITDA at the input hook write nowhere near the logits
    at_input = ITDA.from_atoms(x, k=2, hook_name="blocks.1.ln2.hook_normalized")
    assert logit_effects(at_input, model) is None


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


# --- transcoders: read at the input hook, promoted tokens of the output atoms -------------------

TC_IN, TC_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"


@pytest.fixture(scope="module")
def lm() -> HookedSAETransformer:
    return zoo.load_model("kjv-4l128-s0")


@pytest.fixture(scope="module")
def build_tokens() -> torch.Tensor:
    return zoo.load_tokens("train", 4)


@pytest.fixture(scope="module")
def transcoder(lm: HookedSAETransformer, build_tokens: torch.Tensor) -> ITDATranscoder:
    return build_itda_transcoder(
        lm, build_tokens, TC_IN, TC_OUT, k=8, cos_threshold=0.8, max_atoms=300, progress=False
    )


def _shards(site: Path) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for n, path in enumerate(sorted((site / "data").glob("shard_*.js"))):
        items += _load(path, f"DASH.addShard({n},")
    return items


def test_transcoder_site_reads_the_input_hook_and_shows_the_output_atoms(
    lm: HookedSAETransformer,
    transcoder: ITDATranscoder,
    build_tokens: torch.Tensor,
    tmp_path: Path,
) -> None:
    """Contexts are the transcoder's codes at its input hook, each atom shows the token its pair
    was read at (in its passage of the build stream), and the promoted / suppressed tokens are its
    output atom's (W_dec[i] through W_U), not its input atom's."""
    held = zoo.load_tokens("heldout", 6)
    site = write_dashboard(
        transcoder, lm, held, tmp_path / "tc", provenance_tokens=build_tokens, progress=False
    ).parent
    index = _load(site / "data" / "index.js", "DASH.setIndex(")
    meta = index["meta"]
    assert (meta["hook"], meta["hook_out"], meta["is_transcoder"], meta["is_itda"]) == (
        TC_IN,
        TC_OUT,
        True,
        True,
    )
    assert meta["architecture"] == "itda_transcoder" and meta["label_kind"] == "own token"
    assert "output atom" in meta["logit_note"] and TC_OUT in meta["logit_note"]
    assert meta["no_logits"] is None
    assert index["label"] == transcoder.atom_token_ids.tolist()
    items = _shards(site)
    assert [item["i"] for item in items] == list(range(transcoder.cfg.d_sae))
    # top contexts: the value is the latent's code at the input hook at (s, p)
    _, cache = lm.run_with_cache(held, names_filter=[TC_IN])
    codes = transcoder.encode(cache[TC_IN]).detach()
    n_fired = 0
    for item in items:
        for c in item["top"]:
            assert c["t"][c["c"]] == int(held[c["s"], c["p"]])
            want = float(codes[c["s"], c["p"], item["i"]])
            assert c["v"] == pytest.approx(want, rel=1e-3, abs=1e-3)
            n_fired += 1
    assert n_fired > transcoder.cfg.d_sae // 2
    # provenance: the atom's own token at the centre of its passage of the build stream
    for a, item in enumerate(items):
        src = item["src"]
        assert [src["s"], src["p"]] == transcoder.atom_labels[a].tolist()
        assert (
            src["t"][src["c"]]
            == int(transcoder.atom_token_ids[a])
            == int(build_tokens[src["s"], src["p"]])
        )
    # the output side: each listed token's effect is W_dec[i] @ W_U, the top 10 of it
    W = lm.W_U.detach() * lm.ln_final.w.detach()[:, None]
    out_eff, in_eff = transcoder.W_dec.detach() @ W, transcoder.W_in.detach() @ W
    differ = 0
    for item in items:
        i = item["i"]
        ups, downs = item["up"], item["down"]
        assert len(ups) == len(downs) == 10
        assert [v for _, v in ups] == pytest.approx(out_eff[i].topk(10).values.tolist(), abs=2e-3)
        assert [v for _, v in downs] == pytest.approx(
            out_eff[i].topk(10, largest=False).values.tolist(), abs=2e-3
        )
        for j, v in ups + downs:
            assert float(out_eff[i, j]) == pytest.approx(v, abs=2e-3)
        differ += {j for j, _ in ups} != set(in_eff[i].topk(10).indices.tolist())
    assert differ > len(items) // 2  # the input atoms would promote other tokens


def test_transcoder_sites_of_other_outputs_and_of_a_sae_lens_transcoder(
    model: HookedSAETransformer, tokens: torch.Tensor, tmp_path: Path
) -> None:
    """A transcoder into the MLP's hidden layer writes no logits and its page says why; a plain
    sae_lens Transcoder (dense encoder) is read at its input hook too; a transcoder that names no
    output hook is refused."""
    from sae_lens.saes.transcoder import Transcoder, TranscoderConfig

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 32, generator=g), torch.randn(10, 64, generator=g)
    hidden = ITDATranscoder.from_pairs(
        x, y, k=2, hook_name="blocks.1.ln2.hook_normalized", hook_name_out="blocks.1.mlp.hook_post"
    )
    site = write_dashboard(hidden, model, tokens[:4], tmp_path / "h", progress=False).parent
    meta = _load(site / "data" / "index.js", "DASH.setIndex(")["meta"]
    assert meta["logit_note"] is None and "blocks.1.mlp.hook_post" in meta["no_logits"]
    assert meta["d_out"] == 64 and all("up" not in item for item in _shards(site))

    plain = Transcoder(TranscoderConfig(d_in=32, d_sae=16, d_out=32, apply_b_dec_to_input=False))
    with torch.no_grad():
        for p in plain.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    plain.cfg.metadata.hook_name = "blocks.0.ln2.hook_normalized"
    plain.cfg.metadata.hook_name_out = "blocks.0.hook_mlp_out"
    site = write_dashboard(plain, model, tokens[:4], tmp_path / "p", progress=False).parent
    index = _load(site / "data" / "index.js", "DASH.setIndex(")
    meta = index["meta"]
    assert (meta["hook"], meta["hook_out"], meta["is_itda"]) == (
        "blocks.0.ln2.hook_normalized",
        "blocks.0.hook_mlp_out",
        False,
    )
    _, cache = model.run_with_cache(tokens[:4], names_filter=["blocks.0.ln2.hook_normalized"])
    codes = plain.encode(cache["blocks.0.ln2.hook_normalized"]).detach()
    items = _shards(site)
    tops = [(item["i"], c) for item in items for c in item["top"]]
    assert tops and all(
        c["v"] == pytest.approx(float(codes[c["s"], c["p"], i]), rel=1e-3, abs=1e-3)
        for i, c in tops
    )
    W = model.W_U.detach() * model.ln_final.w.detach()[:, None]
    want = (plain.W_dec.detach() @ W).topk(10).values
    for item in items:
        assert [v for _, v in item["up"]] == pytest.approx(want[item["i"]].tolist(), abs=2e-3)

    plain.cfg.metadata.hook_name_out = None
    with pytest.raises(ValueError, match="no hook_name_out"):
        write_dashboard(plain, model, tokens[:4], tmp_path / "n", progress=False)

"""The ITDA transcoder as a sae_lens Transcoder: pursuit over the input atoms, decoding through the
output atoms, save/load, HookedSAETransformer splicing on a zoo model, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sae_lens import SAE, HookedSAETransformer
from sae_lens.saes.transcoder import Transcoder
from safetensors.torch import load_file, save_file

from itda_lens import ITDA, ITDATranscoder, ITDATranscoderConfig, build_itda_transcoder, zoo
from itda_lens.pursuit import orthogonal_matching_pursuit
from tests.helpers import truncated_save

HOOK_IN, HOOK_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
N, D_IN, D_OUT = 24, 12, 7


def pairs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D_IN, generator=g) * 3, torch.randn(N, D_OUT, generator=g)


@pytest.fixture(scope="module")
def small() -> ITDATranscoder:
    x, y = pairs()
    g = torch.Generator().manual_seed(1)
    return ITDATranscoder.from_pairs(
        x,
        y,
        k=5,
        labels=torch.randint(0, 1000, (N, 2), generator=g),
        token_ids=torch.randint(0, 5000, (N,), generator=g),
        hook_name="blocks.2.ln2.hook_normalized",
        hook_name_out="blocks.2.hook_mlp_out",
    )


def literal_signed_mp(x: torch.Tensor, atoms: torch.Tensor, k: int) -> torch.Tensor:
    """Signed MP written out: k times, pick the atom with the largest |correlation| with the
    residual, add the signed correlation to its code and subtract its part from the residual."""
    codes = torch.zeros(x.shape[0], atoms.shape[0], dtype=x.dtype)
    for t in range(x.shape[0]):
        r = x[t].clone()
        for _ in range(k):
            corr = atoms @ r
            j = int(corr.abs().argmax())
            codes[t, j] += corr[j]
            r = r - corr[j] * atoms[j]
    return codes


def test_from_pairs_holds_unit_inputs_and_outputs_scaled_alike(small: ITDATranscoder) -> None:
    x, y = pairs()
    norms = x.norm(dim=1, keepdim=True)
    assert isinstance(small, Transcoder) and small.cfg.architecture() == "itda_transcoder"
    assert (small.cfg.d_in, small.cfg.d_sae, small.cfg.d_out, small.d_out) == (
        D_IN,
        N,
        D_OUT,
        D_OUT,
    )
    torch.testing.assert_close(small.W_in, x / norms)
    torch.testing.assert_close(small.W_dec, y / norms)
    assert small.b_dec.shape == (D_OUT,) and (small.b_dec == 0).all()
    assert torch.equal(small.W_enc, small.W_in.T)
    meta = small.cfg.metadata
    assert (meta.hook_name, meta.hook_name_out, meta.hook_layer) == (
        "blocks.2.ln2.hook_normalized",
        "blocks.2.hook_mlp_out",
        2,
    )
    assert small.atom_labels.dtype == torch.long and small.atom_labels.shape == (N, 2)
    with pytest.raises(AttributeError, match="tied to W_in"):
        small.W_enc = torch.nn.Parameter(torch.zeros(D_IN, N))


def test_encode_is_signed_mp_over_input_atoms_and_decode_uses_output_atoms() -> None:
    x, y = pairs()
    sae = ITDATranscoder.from_pairs(x.double(), y.double(), k=5)  # float64: no rounding slack
    z = torch.randn(9, D_IN, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    codes = sae.encode(z)
    ref = literal_signed_mp(z, sae.W_in, 5)
    torch.testing.assert_close(codes, ref, atol=1e-10, rtol=1e-10)
    assert (codes < 0).any() and ((codes != 0).sum(-1) <= 5).all()
    torch.testing.assert_close(sae.decode(codes), ref @ sae.W_dec, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(sae(z), ref @ sae.W_dec, atol=1e-10, rtol=1e-10)
    code = sae.encode_sparse(z)
    torch.testing.assert_close(code.to_dense(N), codes)
    torch.testing.assert_close(sae.decode_sparse(code), sae.decode(codes))


def test_a_coefficient_means_the_same_on_both_sides(small: ITDATranscoder) -> None:
    """One step on a stored input x_i picks atom i with coefficient |x_i|: the output is y_i."""
    x, y = pairs()
    code = small.encode_sparse(x, k=1)
    assert torch.equal(code.indices[:, 0], torch.arange(N))
    torch.testing.assert_close(code.values[:, 0], x.norm(dim=1))
    torch.testing.assert_close(small.decode_sparse(code), y, atol=1e-5, rtol=1e-5)


def test_omp_encoder_option() -> None:
    x, y = pairs(3)
    sae = ITDATranscoder.from_pairs(x, y, k=4, encoder="omp")
    z = torch.randn(6, D_IN, generator=torch.Generator().manual_seed(4))
    ref = orthogonal_matching_pursuit(z, sae.W_in, 4)
    torch.testing.assert_close(sae.encode_sparse(z).values, ref.values, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sae(z), sae.decode(ref.to_dense(N)), atol=1e-4, rtol=1e-4)


def test_save_load_round_trip(small: ITDATranscoder, tmp_path: Path) -> None:
    small.save_model(tmp_path)
    for back in (SAE.load_from_disk(tmp_path), ITDATranscoder.load_from_disk(tmp_path)):
        assert type(back) is ITDATranscoder
        for name in ("W_in", "W_dec", "b_dec", "atom_labels", "atom_token_ids"):
            assert torch.equal(getattr(back, name), getattr(small, name)), name
        assert back.cfg.d_out == D_OUT and back.cfg.k == 5
        assert back.cfg.metadata.hook_name_out == "blocks.2.hook_mlp_out"
        z = torch.randn(3, D_IN)
        assert torch.equal(back(z), small(z))
    with pytest.raises(
        ValueError, match=r"is not an ITDA: its cfg\.json has architecture 'itda_transcoder'"
    ):
        ITDA.load_from_disk(tmp_path)
    fresh = ITDATranscoder.from_dict(small.cfg.to_dict())  # sae_lens's path from a cfg dict
    assert type(fresh.cfg) is ITDATranscoderConfig and fresh.W_dec.shape == (N, D_OUT)
    ITDA.from_atoms(torch.randn(4, D_IN)).save_model(tmp_path / "itda")
    with pytest.raises(ValueError, match="is not an ITDATranscoder"):
        ITDATranscoder.load_from_disk(tmp_path / "itda")


@pytest.mark.parametrize(
    ("change", "err", "match"),
    [
        ({"x": torch.zeros(N, D_IN)}, ValueError, "zero vectors cannot be atoms"),
        ({"x": torch.full((N, D_IN), float("nan"))}, ValueError, "NaN or Inf"),
        ({"y": torch.full((N, D_OUT), float("inf"))}, ValueError, "outputs contain NaN or Inf"),
        ({"y": torch.randn(N - 1, D_OUT)}, ValueError, r"outputs must have shape \[24, d_out\]"),
        ({"y": torch.randn(N)}, ValueError, "outputs must have shape"),
        ({"y": torch.ones(N, D_OUT, dtype=torch.long)}, TypeError, "floating-point"),
        ({"x": torch.randn(D_IN)}, ValueError, "shape"),
        ({"labels": torch.zeros(N, 3, dtype=torch.long)}, ValueError, "labels must have shape"),
        ({"k": 0}, ValueError, "k must be"),
        ({"encoder": "lasso"}, ValueError, "encoder"),
        ({"hook_name": HOOK_IN}, ValueError, "together"),
        ({"hook_nam": HOOK_IN}, TypeError, r"unknown option\(s\) \['hook_nam'\]"),
    ],
)
def test_from_pairs_refuses_bad_input(change, err, match) -> None:
    x, y = pairs()
    kwargs = {"x": x, "y": y, **change}
    with pytest.raises(err, match=match):
        ITDATranscoder.from_pairs(**kwargs)


def test_config_refuses_bad_sizes() -> None:
    with pytest.raises(ValueError, match="d_out must be"):
        ITDATranscoderConfig(d_in=4, d_sae=3, d_out=0)
    with pytest.raises(ValueError, match="empty dictionary"):
        ITDATranscoderConfig(d_in=4, d_sae=0, d_out=2)


def test_encode_refuses_bad_input(small: ITDATranscoder) -> None:
    with pytest.raises(ValueError, match="d_in mismatch"):
        small.encode(torch.randn(3, D_OUT))
    with pytest.raises(ValueError, match="NaN or Inf"):
        small.encode(torch.full((3, D_IN), float("nan")))


def test_damaged_folders_give_clear_errors(small: ITDATranscoder, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="corrupt or truncated"):
        ITDATranscoder.load_from_disk(truncated_save(small, tmp_path / "trunc"))
    # an edited d_out contradicts the weights, whichever loader reads them
    small.save_model(tmp_path / "dout")
    cfg_path = tmp_path / "dout" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "d_out": D_OUT + 1}))
    for load in (SAE.load_from_disk, ITDATranscoder.load_from_disk):
        with pytest.raises(
            ValueError,
            match=rf"W_dec has shape \({N}, {D_OUT}\) but cfg.json says d_sae={N}, d_out={D_OUT + 1}",
        ):
            load(tmp_path / "dout")
    # a changed output atom fails the checksum
    small.save_model(tmp_path / "edit")
    weights = tmp_path / "edit" / "sae_weights.safetensors"
    state = load_file(str(weights))
    state["W_dec"][0, 0] += 1
    save_file(state, str(weights))
    for load in (SAE.load_from_disk, ITDATranscoder.load_from_disk):
        with pytest.raises(ValueError, match="sha256"):
            load(tmp_path / "edit")


# --- built on a zoo model, saved, loaded and spliced ----------------------------------------


@pytest.fixture(scope="module")
def lm() -> HookedSAETransformer:
    return zoo.load_model("kjv-4l128-s0")


@pytest.fixture(scope="module")
def built(lm: HookedSAETransformer, tmp_path_factory: pytest.TempPathFactory) -> ITDATranscoder:
    """Built from 4,064 tokens, saved and loaded back through sae_lens."""
    tc = build_itda_transcoder(
        lm, zoo.load_tokens("train", 32), HOOK_IN, HOOK_OUT, k=16, cos_threshold=0.9, progress=False
    )
    folder = tmp_path_factory.mktemp("transcoder")
    tc.save_model(folder)
    back = SAE.load_from_disk(folder)
    assert type(back) is ITDATranscoder
    for name in ("W_in", "W_dec", "b_dec", "atom_labels", "atom_token_ids"):
        assert torch.equal(getattr(back, name), getattr(tc, name)), name
    assert back.build_record == tc.build_record is not None
    return back


@pytest.fixture(scope="module")
def heldout() -> torch.Tensor:
    return zoo.load_tokens("heldout", 16)


def test_attached_it_writes_its_decoding_at_the_output_hook(
    lm: HookedSAETransformer, built: ITDATranscoder, heldout: torch.Tensor
) -> None:
    toks = heldout[:4]
    _, clean = lm.run_with_cache(toks, names_filter=[HOOK_IN, HOOK_OUT])
    _, cache = lm.run_with_cache_with_saes(toks, saes=[built])
    written = cache[f"{HOOK_OUT}.hook_sae_output"]
    torch.testing.assert_close(written, built(clean[HOOK_IN]), atol=1e-5, rtol=1e-5)
    # and it is what flows on: resid_post = resid_mid + the transcoder's output
    torch.testing.assert_close(
        cache["blocks.1.hook_resid_post"] - cache["blocks.1.hook_resid_mid"],
        written,
        atol=1e-5,
        rtol=1e-5,
    )
    assert (written - clean[HOOK_OUT]).abs().max() > 1e-2, "not the model's own output"
    assert lm.acts_to_saes == {}


def test_spliced_loss_is_between_clean_and_zero_ablation(
    lm: HookedSAETransformer, built: ITDATranscoder, heldout: torch.Tensor
) -> None:
    clean = lm(heldout, return_type="loss").item()
    zero = lm.run_with_hooks(
        heldout, return_type="loss", fwd_hooks=[(HOOK_OUT, lambda a, hook: torch.zeros_like(a))]
    ).item()
    lm.add_sae(built)
    try:
        spliced = lm(heldout, return_type="loss").item()
    finally:
        lm.reset_saes()
    assert torch.isfinite(torch.tensor(spliced))
    assert clean < spliced < zero
    # more than half of what zero-ablating the MLP output loses is recovered
    assert spliced - clean < 0.5 * (zero - clean), (clean, spliced, zero)


def test_error_term_gives_the_clean_logits(
    lm: HookedSAETransformer, built: ITDATranscoder, heldout: torch.Tensor
) -> None:
    toks = heldout[:4]
    clean = lm(toks)
    lm.add_sae(built, use_error_term=True)
    try:
        logits = lm(toks)
    finally:
        lm.reset_saes()
    torch.testing.assert_close(logits, clean, atol=5e-5, rtol=1e-5)
    assert (lm.run_with_saes(toks, saes=[built]) - clean).abs().max() > 1e-2
    torch.testing.assert_close(lm(toks), clean, atol=0, rtol=0)


def test_built_codes_decode_the_output_better_than_the_mean(
    lm: HookedSAETransformer, built: ITDATranscoder, heldout: torch.Tensor
) -> None:
    _, cache = lm.run_with_cache(heldout[:8], names_filter=[HOOK_IN, HOOK_OUT])
    x, y = cache[HOOK_IN][:, 1:], cache[HOOK_OUT][:, 1:]  # BOS never becomes an atom
    y_hat = built(x)
    fvu = ((y_hat - y) ** 2).sum() / ((y - y.mean((0, 1))) ** 2).sum()
    assert fvu < 0.5
    assert F.cosine_similarity(y_hat, y, dim=-1).mean() > 0.7

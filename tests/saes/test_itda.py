"""ITDA as an sae_lens SAE: hooks, HookedSAETransformer workflows, save/load, evals, bad input."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from sae_lens import SAE, HookedSAETransformer
from sae_lens.evals import EvalConfig, run_evals
from sae_lens.registry import SAE_CLASS_REGISTRY
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.activations_store import ActivationsStore

import itda_lens
from itda_lens import ITDA, build_itda
from itda_lens.pursuit import (
    decode,
    gradient_pursuit,
    matching_pursuit,
    orthogonal_matching_pursuit,
)
from itda_lens.saes import ITDATranscoder, register_architecture
from tests.helpers import BOS, PAD, SEQ, make_tokens, truncated_save

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def itda(model: HookedSAETransformer) -> ITDA:
    return build_itda(model, make_tokens(48), HOOK, k=8, cos_threshold=0.8, progress=False)[HOOK]


@pytest.fixture(scope="module")
def acts(model: HookedSAETransformer) -> torch.Tensor:
    _, cache = model.run_with_cache(make_tokens(4, seed=9), names_filter=[HOOK])
    return cache[HOOK]


def test_from_atoms_normalises_and_keeps_provenance() -> None:
    atoms = torch.randn(5, 6) * 7
    labels = torch.tensor([[0, 1], [0, 2], [3, 4], [9, 9], [2**40, 5]])
    itda = ITDA.from_atoms(
        atoms, k=3, labels=labels, token_ids=torch.arange(5), hook_name="blocks.4.hook_resid_post"
    )
    torch.testing.assert_close(itda.W_dec.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(itda.W_dec, F.normalize(atoms, dim=1))
    assert itda.atom_labels.dtype == torch.long and (itda.atom_labels == labels).all()
    assert itda.cfg.metadata.hook_layer == 4 and itda.cfg.d_sae == 5 and itda.cfg.k == 3
    assert (itda.b_dec == 0).all() and not itda.cfg.apply_b_dec_to_input


@pytest.mark.parametrize(
    ("atoms", "kwargs", "err", "match"),
    [
        (torch.zeros(0, 4), {}, ValueError, "empty dictionary"),
        (torch.tensor([[1.0, 0.0], [0.0, 0.0]]), {}, ValueError, "zero vectors"),
        (torch.tensor([[1.0, float("nan")]]), {}, ValueError, "NaN"),
        (torch.ones(4), {}, ValueError, "shape"),
        (torch.ones(2, 3, dtype=torch.long), {}, TypeError, "floating-point"),
        (
            torch.ones(2, 3),
            {"labels": torch.zeros(3, 2, dtype=torch.long)},
            ValueError,
            "labels must have shape",
        ),
        (torch.ones(2, 3), {"labels": torch.zeros(2, 2)}, TypeError, "integer"),
        (torch.ones(2, 3), {"k": 0}, ValueError, "k must be"),
        (torch.ones(2, 3), {"encoder": "lasso"}, ValueError, "encoder"),
    ],
)
def test_from_atoms_refuses_bad_input(atoms, kwargs, err, match) -> None:
    with pytest.raises(err, match=match):
        ITDA.from_atoms(atoms, **kwargs)


def test_w_enc_is_the_tied_transpose(itda: ITDA) -> None:
    assert itda.W_enc.shape == (itda.cfg.d_in, itda.cfg.d_sae)
    assert torch.equal(itda.W_enc, itda.W_dec.T) and itda.W_enc.abs().sum() > 0
    with pytest.raises(AttributeError, match="tied"):
        itda.W_enc = torch.nn.Parameter(torch.zeros(2, 2))


def test_encode_is_signed_mp_and_matches_encode_sparse(itda: ITDA, acts: torch.Tensor) -> None:
    dense = itda.encode(acts)
    assert dense.shape == (*acts.shape[:-1], itda.cfg.d_sae)
    code = itda.encode_sparse(acts)
    assert code.indices.shape == (*acts.shape[:-1], 8)
    torch.testing.assert_close(dense, code.to_dense(itda.cfg.d_sae))
    ref = matching_pursuit(acts, itda.W_dec, 8, gram=None)
    torch.testing.assert_close(code.values, ref.values, atol=1e-5, rtol=1e-5)
    assert (dense < 0).any(), "ITDA codes are signed"
    assert ((dense != 0).sum(-1) <= 8).all()
    torch.testing.assert_close(itda.decode_sparse(code), itda.decode(dense), atol=1e-5, rtol=1e-5)


def test_hooks_fire_on_the_sae(itda: ITDA, acts: torch.Tensor) -> None:
    _, cache = itda.run_with_cache(acts)
    for name in (
        "hook_sae_input",
        "hook_sae_acts_pre",
        "hook_sae_acts_post",
        "hook_sae_recons",
        "hook_sae_output",
    ):
        assert name in cache
    torch.testing.assert_close(cache["hook_sae_acts_pre"], acts @ itda.W_enc)
    torch.testing.assert_close(cache["hook_sae_recons"], itda.decode(cache["hook_sae_acts_post"]))


def test_cache_and_error_term_reproduce_clean_logits(
    model: HookedSAETransformer, itda: ITDA
) -> None:
    toks = make_tokens(4, seed=5)
    clean = model(toks)
    logits, cache = model.run_with_cache_with_saes(toks, saes=[itda], use_error_term=True)
    torch.testing.assert_close(logits, clean, atol=1e-4, rtol=1e-4)
    assert cache[f"{HOOK}.hook_sae_acts_post"].shape == (4, SEQ, itda.cfg.d_sae)
    assert f"{HOOK}.hook_sae_error" in cache
    spliced = model.run_with_saes(toks, saes=[itda])
    assert not torch.allclose(spliced, clean, atol=1e-3), (
        "without the error term the ITDA reconstruction is used"
    )
    assert model.acts_to_saes == {}


def test_feature_intervention_changes_output(model: HookedSAETransformer, itda: ITDA) -> None:
    toks = make_tokens(2, seed=6)
    clean = model(toks)
    _, cache = model.run_with_cache_with_saes(toks, saes=[itda])
    latent = int(cache[f"{HOOK}.hook_sae_acts_post"].abs().sum((0, 1)).argmax())

    def ablate(acts: torch.Tensor, hook) -> torch.Tensor:
        acts[..., latent] = 0
        return acts

    model.add_sae(itda, use_error_term=True)
    try:
        same = model(toks)
        edited = model.run_with_hooks(toks, fwd_hooks=[(f"{HOOK}.hook_sae_acts_post", ablate)])
    finally:
        model.reset_saes()
    torch.testing.assert_close(same, clean, atol=1e-4, rtol=1e-4)
    assert (edited - clean).abs().max() > 1e-3
    torch.testing.assert_close(model(toks), clean)


def test_gradients_flow_through_encode(itda: ITDA, acts: torch.Tensor) -> None:
    sae = itda.crop(itda.cfg.d_sae).to(torch.float64)
    x0 = acts[0, 3:7].detach().double()
    u, w = torch.randn_like(x0), torch.randn_like(x0)
    x = x0.clone().requires_grad_(True)
    (sae(x) * w).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # for fixed picks the output is linear in x: autograd matches a central finite difference
    eps = 1e-6
    fd = ((sae(x0 + eps * u) * w).sum() - (sae(x0 - eps * u) * w).sum()) / (2 * eps)
    torch.testing.assert_close((x.grad * u).sum(), fd, rtol=1e-5, atol=1e-8)


def test_save_load_round_trip(itda: ITDA, acts: torch.Tensor, tmp_path: Path) -> None:
    itda.save_model(tmp_path / "out")
    back = SAE.load_from_disk(tmp_path / "out")
    assert type(back) is ITDA
    assert back.cfg.k == itda.cfg.k and back.cfg.metadata.hook_name == HOOK
    assert back.atom_labels.dtype == torch.long and torch.equal(back.atom_labels, itda.atom_labels)
    assert torch.equal(back.atom_token_ids, itda.atom_token_ids)
    assert torch.equal(back.encode(acts), itda.encode(acts))
    assert back.require_build_record() == itda.require_build_record()


def test_provenance_survives_half_precision_save(tmp_path: Path) -> None:
    labels = torch.tensor([[123_456_789, 127], [-1, -1], [2**33 + 1, 4095]])
    itda = ITDA.from_atoms(
        torch.randn(3, 8),
        k=2,
        labels=labels,
        token_ids=torch.tensor([50256, 70000, -1]),
        dtype="bfloat16",
    )
    itda.save_model(tmp_path)
    back = ITDA.load_from_disk(tmp_path)
    assert back.W_dec.dtype == torch.bfloat16
    assert torch.equal(back.atom_labels, labels) and back.atom_token_ids.tolist() == [
        50256,
        70000,
        -1,
    ]


def test_mixed_save_never_loads(itda: ITDA, tmp_path: Path) -> None:
    itda.save_model(tmp_path / "a")
    itda.crop(itda.cfg.d_sae).save_model(tmp_path / "b")
    shutil.copy(
        tmp_path / "b" / "sae_weights.safetensors", tmp_path / "a" / "sae_weights.safetensors"
    )
    with pytest.raises(ValueError, match="different saves"):
        SAE.load_from_disk(tmp_path / "a")


def test_damaged_or_foreign_folders_give_clear_errors(itda: ITDA, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no SAE folder"):
        ITDA.load_from_disk(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no cfg\.json"):
        ITDA.load_from_disk(tmp_path / "empty")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        ITDA.load_from_disk(truncated_save(itda, tmp_path / "trunc"))
    itda.save_model(tmp_path / "other")
    cfg = json.loads((tmp_path / "other" / "cfg.json").read_text())
    (tmp_path / "other" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "topk"}))
    with pytest.raises(ValueError, match="not an ITDA"):
        ITDA.load_from_disk(tmp_path / "other")
    (tmp_path / "other" / "cfg.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        ITDA.load_from_disk(tmp_path / "other")
    itda.save_model(tmp_path / "nowt")
    (tmp_path / "nowt" / "sae_weights.safetensors").unlink()
    with pytest.raises(ValueError, match="missing"):
        ITDA.load_from_disk(tmp_path / "nowt")


def test_registration_is_idempotent_and_guards_conflicts(monkeypatch: pytest.MonkeyPatch) -> None:
    register_architecture("itda", ITDA, itda_lens.ITDAConfig)
    register_architecture("itda", ITDA, itda_lens.ITDAConfig)
    assert SAE_CLASS_REGISTRY["itda"][0] is ITDA
    monkeypatch.setitem(SAE_CLASS_REGISTRY, "itda", (SAE, itda_lens.ITDAConfig))
    with pytest.raises(RuntimeError, match="already registered"):
        register_architecture("itda", ITDA, itda_lens.ITDAConfig)


def test_reimport_in_a_fresh_process_is_safe(itda: ITDA, tmp_path: Path) -> None:
    itda.save_model(tmp_path)
    code = (
        "import importlib, itda_lens, itda_lens.saes.itda as s; importlib.reload(s); importlib.reload(itda_lens);"
        f"from sae_lens import SAE; print(type(SAE.load_from_disk(r'{tmp_path}')).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ITDA"


def test_folds_that_do_not_apply_raise(itda: ITDA) -> None:
    with pytest.raises(NotImplementedError):
        itda.fold_W_dec_norm()
    with pytest.raises(NotImplementedError):
        itda.fold_activation_norm_scaling_factor(2.0)


def test_omp_encoder_option(acts: torch.Tensor) -> None:
    atoms = torch.randn(40, acts.shape[-1])
    itda = ITDA.from_atoms(atoms, k=5, encoder="omp")
    code = itda.encode_sparse(acts)
    ref = orthogonal_matching_pursuit(acts, itda.W_dec, 5)
    torch.testing.assert_close(code.values, ref.values, atol=1e-4, rtol=1e-4)


def test_gp_encoder_encodes_and_decodes(acts: torch.Tensor) -> None:
    atoms = torch.randn(40, acts.shape[-1], generator=torch.Generator().manual_seed(0))
    itda = ITDA.from_atoms(atoms, k=6, encoder="gp")
    code = itda.encode_sparse(acts)
    ref = gradient_pursuit(acts, itda.W_dec, 6)
    assert torch.equal(code.indices, ref.indices)
    torch.testing.assert_close(code.values, ref.values)
    dense = itda.encode(acts)
    assert dense.shape == (*acts.shape[:-1], 40) and bool((dense >= 0).all())
    assert bool(((dense != 0).sum(-1) <= 6).all())
    torch.testing.assert_close(dense, code.to_dense(40))
    recon = itda.decode_sparse(code)
    torch.testing.assert_close(recon, decode(ref, itda.W_dec))
    torch.testing.assert_close(itda.decode(dense), recon, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(itda(acts), recon, atol=1e-5, rtol=1e-5)
    x = acts.detach().clone().requires_grad_(True)
    out = itda(x)  # grad enabled: the values are replayed as a function of x
    torch.testing.assert_close(out.detach(), recon, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and x.grad.abs().sum() > 0
    assert (itda.encode(torch.zeros(2, acts.shape[-1])) == 0).all()


def test_gp_gradients_match_finite_differences(itda: ITDA, acts: torch.Tensor) -> None:
    sae = itda.with_encoder("gp").crop(itda.cfg.d_sae).to(torch.float64)
    assert sae.cfg.encoder == "gp"
    x0 = acts[0, 3:7].detach().double()
    g = torch.Generator().manual_seed(0)
    u, w = torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)
    u, w = u.double(), w.double()
    x = x0.clone().requires_grad_(True)
    (sae(x) * w).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    eps = 1e-6  # small enough that no pick or clamp changes
    fd = ((sae(x0 + eps * u) * w).sum() - (sae(x0 - eps * u) * w).sum()) / (2 * eps)
    torch.testing.assert_close((x.grad * u).sum(), fd, rtol=1e-5, atol=1e-8)


def test_with_encoder_switches_a_built_itda(itda: ITDA, acts: torch.Tensor, tmp_path: Path) -> None:
    mp = itda.encode(acts)
    gp = itda.with_encoder("gp")
    assert type(gp) is ITDA and gp is not itda
    assert itda.cfg.encoder == "mp" and gp.cfg.encoder == "gp", "a copy; the original keeps mp"
    assert gp.W_dec.data_ptr() == itda.W_dec.data_ptr(), "weights share storage"
    assert torch.equal(gp.atom_labels, itda.atom_labels)
    assert gp.gram_rows() is itda.gram_rows(), "and the Gram rows planned for them"
    assert (
        gp.cfg.metadata.hook_name == HOOK
        and gp.require_build_record() == itda.require_build_record()
    )
    code = gp.encode_sparse(acts)
    ref = gradient_pursuit(acts, itda.W_dec, itda.cfg.k)
    assert torch.equal(code.indices, ref.indices)
    torch.testing.assert_close(code.values, ref.values)
    torch.testing.assert_close(itda.encode(acts), mp)
    # saving and loading keep the encoder
    gp.save_model(tmp_path / "gp")
    back = SAE.load_from_disk(tmp_path / "gp")
    assert type(back) is ITDA and back.cfg.encoder == "gp"
    assert json.loads((tmp_path / "gp" / "cfg.json").read_text())["encoder"] == "gp"
    torch.testing.assert_close(back.encode(acts), gp.encode(acts))
    torch.testing.assert_close(back.with_encoder("mp").encode(acts), mp)
    # in place works too (nothing cached depends on the encoder); a bad name is refused
    copy = itda.crop(itda.cfg.d_sae)
    copy.cfg.encoder = "gp"
    torch.testing.assert_close(copy.encode(acts), gp.encode(acts))
    copy.cfg.encoder = "lasso"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="encoder must be one of"):
        copy.encode(acts)
    with pytest.raises(ValueError, match="encoder must be one of"):
        itda.with_encoder("lasso")  # type: ignore[arg-type]


def test_gp_checks_the_atoms_once_per_version(acts: torch.Tensor) -> None:
    itda = ITDA.from_atoms(torch.randn(30, acts.shape[-1]), k=4, encoder="gp")
    itda.encode(acts)
    assert itda._gram_cache is None, "gradient pursuit reads no Gram rows"
    with torch.no_grad():
        itda.W_dec.mul_(2.0)
    with pytest.raises(ValueError, match="unit L2 norm"):
        itda.encode(acts)


def test_with_encoder_shares_storage_not_parameters(acts: torch.Tensor) -> None:
    itda = ITDA.from_atoms(torch.randn(30, acts.shape[-1]), k=4)
    gp = itda.with_encoder("gp")
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        itda.W_dec.copy_(itda.W_dec[perm].clone())  # in place: both see it
    assert torch.equal(gp.W_dec, itda.W_dec)
    torch.testing.assert_close(gp.encode(acts), itda.with_encoder("gp").encode(acts))
    before = itda.W_dec.detach().clone()
    gp.W_dec.data = torch.roll(before, 1, 0)  # assigned: only gp changes
    assert torch.equal(itda.W_dec, before) and not torch.equal(gp.W_dec, before)


def test_with_encoder_on_a_transcoder() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 12, generator=g) * 3, torch.randn(24, 7, generator=g)
    tc = ITDATranscoder.from_pairs(x, y, k=5)
    gp = tc.with_encoder("gp")
    assert type(gp) is ITDATranscoder and gp.cfg.encoder == "gp" and tc.cfg.encoder == "mp"
    assert gp.W_in.data_ptr() == tc.W_in.data_ptr()
    inp = torch.randn(6, 12, generator=g)
    code = gp.encode_sparse(inp)
    ref = gradient_pursuit(inp, tc.W_in, 5)
    assert torch.equal(code.indices, ref.indices)
    torch.testing.assert_close(code.values, ref.values)
    torch.testing.assert_close(gp(inp), decode(ref, tc.W_dec), atol=1e-5, rtol=1e-5)
    # a skip connection added to a copy stays on the copy
    W_skip, bias = torch.randn(7, 12, generator=g), torch.randn(7, generator=g)
    skip = tc.with_encoder("omp").with_skip(W_skip, bias)
    assert not tc.cfg.skip_connection and bool((tc.b_dec == 0).all())
    skip.encode(inp)  # holds its input for the next decode; with_encoder copies that state
    gp_skip = skip.with_encoder("gp")
    assert gp_skip.cfg.skip_connection and torch.equal(gp_skip.W_skip, W_skip)
    want = decode(ref, tc.W_dec) + inp @ W_skip.T + bias
    torch.testing.assert_close(gp_skip.decode(gp_skip.encode(inp)), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gp_skip(inp), want, atol=1e-5, rtol=1e-5)


def test_encode_bad_input(itda: ITDA) -> None:
    with pytest.raises(ValueError, match="d_in mismatch"):
        itda.encode(torch.randn(3, itda.cfg.d_in + 1))
    with pytest.raises(ValueError, match="NaN or Inf"):
        itda.encode(torch.full((3, itda.cfg.d_in), float("inf")))


def test_zero_activation_encodes_to_zero(itda: ITDA) -> None:
    assert (itda.encode(torch.zeros(2, itda.cfg.d_in)) == 0).all()


def test_gram_cache_follows_in_place_edits_and_replacements(itda: ITDA, acts: torch.Tensor) -> None:
    copy = itda.crop(itda.cfg.d_sae)
    before = copy.encode(acts)
    rows = copy.gram_rows()
    assert copy.gram_rows() is rows, "planned once per version of W_dec"
    perm = torch.randperm(copy.cfg.d_sae, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        copy.W_dec.copy_(copy.W_dec[perm].clone())  # in place: a new version
    torch.testing.assert_close(copy.encode(acts), before[..., perm], atol=1e-4, rtol=1e-4)
    copy.W_dec.data = itda.W_dec.detach().clone()  # replaced
    torch.testing.assert_close(copy.encode(acts), before, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        copy.W_dec.mul_(2.0)  # atoms no longer unit norm: refused at the next encode
    with pytest.raises(ValueError, match="unit L2 norm"):
        copy.encode(acts)


def test_dictionaries_past_the_memory_budget_encode_the_same(
    itda: ITDA, acts: torch.Tensor
) -> None:
    from itda_lens.budget import set_memory_budget

    full = itda.encode(acts)
    assert itda.gram_rows() is not None and itda.gram_rows().full  # type: ignore[union-attr]
    copy = itda.crop(itda.cfg.d_sae)
    set_memory_budget(4096)  # a few rows of this dictionary: a cache filled on demand
    try:
        rows = copy.gram_rows()
        assert rows is not None and not rows.full
        torch.testing.assert_close(copy.encode(acts), full, atol=1e-5, rtol=1e-5)
        assert rows.computed > 0
    finally:
        set_memory_budget(None)


def test_crop_keeps_first_atoms(itda: ITDA) -> None:
    small = itda.crop(10)
    assert small.cfg.d_sae == 10 and torch.equal(small.W_dec, itda.W_dec[:10])
    assert torch.equal(small.atom_labels, itda.atom_labels[:10])
    with pytest.raises(ValueError):
        itda.crop(0)


def _store(model: HookedSAETransformer, sae: ITDA) -> ActivationsStore:
    ds = Dataset.from_dict({"tokens": make_tokens(32, seed=11).tolist()})
    return ActivationsStore.from_sae(
        model,
        sae,
        dataset=ds,
        streaming=False,
        store_batch_size_prompts=8,
        context_size=SEQ,
        n_batches_in_buffer=4,
        total_tokens=10_000,
    )


def test_sae_lens_run_evals_gives_finite_metrics(model: HookedSAETransformer, itda: ITDA) -> None:
    cfg = EvalConfig(
        batch_size_prompts=8,
        n_eval_reconstruction_batches=2,
        n_eval_sparsity_variance_batches=2,
        compute_kl=True,
        compute_ce_loss=True,
        compute_l2_norms=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=True,
        compute_featurewise_weight_based_metrics=True,
    )
    nested, feature_metrics = run_evals(
        itda, _store(model, itda), model, ActivationScaler(), cfg, exclude_special_tokens=[BOS, PAD]
    )
    metrics = {k: v for group in nested.values() for k, v in group.items()}
    for key in ("ce_loss_score", "kl_div_score", "explained_variance", "l0", "mse"):
        assert math.isfinite(metrics[key]), key
    assert 0 < metrics["l0"] <= 8
    assert len(feature_metrics["encoder_norm"]) == itda.cfg.d_sae


def test_saebench_core_gives_finite_metrics(model: HookedSAETransformer, itda: ITDA) -> None:
    core = pytest.importorskip("sae_bench.evals.core.main")
    from sae_bench.evals.core.eval_config import CoreEvalConfig
    from sae_bench.sae_bench_utils.general_utils import load_and_format_sae

    sae = itda.crop(itda.cfg.d_sae)
    load_and_format_sae("itda_test", sae, "cpu")
    cfg = CoreEvalConfig(
        model_name="tiny-0",
        batch_size_prompts=8,
        n_eval_reconstruction_batches=2,
        n_eval_sparsity_variance_batches=2,
        context_size=SEQ,
        compute_kl=True,
        compute_ce_loss=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=True,
        compute_featurewise_weight_based_metrics=True,
    )
    metrics, _ = core.run_evals(sae, _store(model, sae), model, cfg, ignore_tokens={BOS, PAD})
    flat = {f"{g}.{k}": v for g, d in metrics.items() for k, v in d.items()}
    assert math.isfinite(flat["model_performance_preservation.ce_loss_score"])
    assert math.isfinite(flat["reconstruction_quality.explained_variance"])
    assert 0 < flat["sparsity.l0"] <= 8

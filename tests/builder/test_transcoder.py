"""The ITDA transcoder build on a zoo model: the exact sequential rule read literally, independence
of the batch size, the two judges, provenance, the record, limits, sizing by target, the skip term
and the refitted decoder (each against a plain transcription or scikit-learn), and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sae_lens import HookedSAETransformer

from itda_lens import ITDATranscoder, build_itda, build_itda_transcoder, zoo
from itda_lens.activations import activations_at_labels
from itda_lens.builder.transcoder import fit_decoder, fit_skip
from itda_lens.pursuit import SparseCode, decode, matching_pursuit, reference_matching_pursuit
from itda_lens.saes import TranscoderBuildRecord

HOOK_IN, HOOK_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
K, THRESHOLD = 8, 0.8


@pytest.fixture(scope="module")
def lm() -> HookedSAETransformer:
    return zoo.load_model("kjv-4l128-s0")


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return zoo.load_tokens("train", 8)


def build(lm: HookedSAETransformer, tokens: torch.Tensor, **kw: object) -> ITDATranscoder:
    settings = {"k": K, "cos_threshold": THRESHOLD, "progress": False, **kw}
    return build_itda_transcoder(lm, tokens, HOOK_IN, HOOK_OUT, **settings)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def built(lm: HookedSAETransformer, tokens: torch.Tensor) -> ITDATranscoder:
    return build(lm, tokens, batch_size=8)


def literal_rule(
    x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor, k: int, threshold: float, judge: str
) -> list[int]:
    """The rule read literally: each kept token with a non-zero input, in order, is pursued over
    the pairs before it (the paper's MP) and added iff cos(reconstruction, target) < threshold."""
    ins: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    added = []
    for i in keep.nonzero().flatten().tolist():
        xi, yi = x[i].double(), y[i].double()
        if xi.norm() == 0:
            continue
        if ins:
            a, b = torch.stack(ins), torch.stack(outs)
            codes = reference_matching_pursuit(xi[None], a, k)
            target, recon = (yi, codes @ b) if judge == "output" else (xi, codes @ a)
            if F.cosine_similarity(recon, target[None], eps=1e-30).item() >= threshold:
                continue
        ins.append(xi / xi.norm())
        outs.append(yi / xi.norm())
        added.append(i)
    return added


@pytest.mark.parametrize("judge", ["output", "input"])
def test_build_is_the_sequential_rule_read_literally(
    lm: HookedSAETransformer, tokens: torch.Tensor, judge: str
) -> None:
    toks = tokens[:3]
    tc = build(lm, toks, judge=judge)
    _, cache = lm.run_with_cache(toks, names_filter=[HOOK_IN, HOOK_OUT])
    x, y = cache[HOOK_IN].flatten(0, 1), cache[HOOK_OUT].flatten(0, 1)
    keep = ~torch.isin(toks.flatten(), torch.tensor([0, 2]))  # BOS and PAD never become atoms
    rows = literal_rule(x, y, keep, K, THRESHOLD, judge)
    seq = toks.shape[1]
    want = torch.tensor([[r // seq, r % seq] for r in rows])
    assert 10 < len(rows) < keep.sum()
    assert torch.equal(tc.atom_labels, want)


def test_build_does_not_depend_on_the_batch_size(
    lm: HookedSAETransformer, tokens: torch.Tensor, built: ITDATranscoder
) -> None:
    for batch_size in (1, 3):
        other = build(lm, tokens, batch_size=batch_size)
        assert torch.equal(other.atom_labels, built.atom_labels), batch_size
        assert torch.equal(other.W_in, built.W_in) and torch.equal(other.W_dec, built.W_dec)


def test_the_judges_give_different_dictionaries(
    lm: HookedSAETransformer, tokens: torch.Tensor, built: ITDATranscoder
) -> None:
    by_input = build(lm, tokens, judge="input")
    assert built.build_record.judge == "output" and by_input.build_record.judge == "input"  # type: ignore[union-attr]
    assert by_input.cfg.d_sae != built.cfg.d_sae
    first = min(by_input.cfg.d_sae, built.cfg.d_sae)
    assert not torch.equal(by_input.atom_labels[:first], built.atom_labels[:first])


def test_input_judge_picks_the_itdas_atoms(lm: HookedSAETransformer, tokens: torch.Tensor) -> None:
    """Judged on the input, the rule is the ITDA's: the same tokens as build_itda at hook_in."""
    by_input = build(lm, tokens, judge="input")
    itda = build_itda(lm, tokens, HOOK_IN, k=K, cos_threshold=THRESHOLD, progress=False)[HOOK_IN]
    assert torch.equal(by_input.atom_labels, itda.atom_labels)
    torch.testing.assert_close(by_input.W_in, itda.W_dec)


def test_every_pair_is_the_models_activations_at_its_label(
    lm: HookedSAETransformer, tokens: torch.Tensor, built: ITDATranscoder
) -> None:
    labels = built.atom_labels
    acts = activations_at_labels(lm, tokens, [HOOK_IN, HOOK_OUT], labels)
    x, y = acts[HOOK_IN].double(), acts[HOOK_OUT].double()
    norms = x.norm(dim=1, keepdim=True)
    torch.testing.assert_close(built.W_in.double(), x / norms, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(built.W_dec.double(), y / norms, atol=1e-6, rtol=1e-6)
    assert torch.equal(built.atom_token_ids, tokens[labels[:, 0], labels[:, 1]])
    assert (labels[:, 1] > 0).all(), "BOS never becomes an atom"
    assert len({tuple(r) for r in labels.tolist()}) == len(labels)


def test_record_and_metadata(built: ITDATranscoder, tokens: torch.Tensor) -> None:
    record = built.build_record
    assert record is not None
    assert (record.judge, record.cos_threshold, record.config["k"]) == ("output", THRESHOLD, K)
    assert record.tokens_seen == tokens.numel() and record.tokens_scored == tokens.numel() - 8
    assert record.n_atoms == built.cfg.d_sae and record.stop_reason is None
    meta = built.cfg.metadata
    assert (meta.hook_name, meta.hook_name_out) == (HOOK_IN, HOOK_OUT)
    assert meta.context_size == tokens.shape[1] and meta.prepend_bos is True
    assert meta.model_name == "kjv-4l128-s0"
    with pytest.raises(ValueError, match="invalid ITDA transcoder build record"):
        TranscoderBuildRecord.from_dict({**record.to_dict(), "atoms": 3})


def test_max_atoms_and_max_tokens_stop_the_build(
    lm: HookedSAETransformer, tokens: torch.Tensor, built: ITDATranscoder
) -> None:
    capped = build(lm, tokens, max_atoms=20, batch_size=3)
    assert torch.equal(capped.atom_labels, built.atom_labels[:20])
    record = capped.build_record
    assert record is not None and record.stop_reason == "full"
    last = capped.atom_labels[-1]
    assert record.tokens_seen == int(last[0]) * tokens.shape[1] + int(last[1]) + 1
    short = build(lm, tokens, max_tokens=300)
    assert short.build_record.tokens_seen == 300  # type: ignore[union-attr]
    assert (short.atom_labels[:, 0] * tokens.shape[1] + short.atom_labels[:, 1] < 300).all()
    n = len(short.atom_labels)
    assert torch.equal(short.atom_labels, built.atom_labels[:n])


@pytest.mark.parametrize(
    ("hooks", "kw", "match"),
    [
        ((HOOK_IN, "blocks.1.hook_mlp_outt"), {}, "no hook point 'blocks.1.hook_mlp_outt'"),
        (("blocks.9.ln2.hook_normalized", HOOK_OUT), {}, "no hook point"),
        ((HOOK_IN, HOOK_IN), {}, "maps one hook to another"),
        ((HOOK_IN, HOOK_OUT), {"judge": "both"}, "judge must be"),
        ((HOOK_IN, HOOK_OUT), {"target_atoms": 50, "refine": "energy"}, "does not support"),
        ((HOOK_IN, HOOK_OUT), {"add_rule": "batch"}, "does not support"),
        ((HOOK_IN, HOOK_OUT), {"cos_threshold": 1.5}, "cos_threshold must be"),
        ((HOOK_IN, HOOK_OUT), {"k": 0}, "k must be"),
    ],
)
def test_bad_settings_are_refused(
    lm: HookedSAETransformer, tokens: torch.Tensor, hooks: tuple[str, str], kw: dict, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        build_itda_transcoder(lm, tokens[:1], *hooks, progress=False, **kw)


def test_bad_input_is_refused(lm: HookedSAETransformer, tokens: torch.Tensor) -> None:
    with pytest.raises(TypeError, match="BuildConfig has no field"):
        build_itda_transcoder(lm, tokens[:1], HOOK_IN, HOOK_OUT, progress=False, kk=3)
    with pytest.raises(ValueError, match="token ids must lie in"):
        build_itda_transcoder(lm, tokens[:1] + 10**6, HOOK_IN, HOOK_OUT, progress=False)
    with pytest.raises(ValueError, match=r"shape \[n_seq, seq_len\]"):
        build_itda_transcoder(lm, tokens[0], HOOK_IN, HOOK_OUT, progress=False)
    with pytest.raises(ValueError, match="empty dictionary"):
        build_itda_transcoder(lm, tokens[:1, :1], HOOK_IN, HOOK_OUT, progress=False)

    def poison(acts: torch.Tensor, hook: object) -> torch.Tensor:
        return acts * float("nan")

    with (
        lm.hooks(fwd_hooks=[(HOOK_OUT, poison)]),
        pytest.raises(ValueError, match=f"activations at {HOOK_OUT} contain NaN"),
    ):
        build_itda_transcoder(lm, tokens[:1], HOOK_IN, HOOK_OUT, progress=False)


def stream_pairs(
    lm: HookedSAETransformer, toks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every position's (x, y) in stream order, and which may become atoms (not BOS / PAD)."""
    _, cache = lm.run_with_cache(toks, names_filter=[HOOK_IN, HOOK_OUT])
    keep = ~torch.isin(toks.flatten(), torch.tensor([0, 2]))
    return cache[HOOK_IN].flatten(0, 1).double(), cache[HOOK_OUT].flatten(0, 1).double(), keep


def test_fit_skip_is_least_squares_with_an_intercept() -> None:
    from sklearn.linear_model import LinearRegression

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=g, dtype=torch.float64)
    y = x @ torch.randn(6, 3, generator=g, dtype=torch.float64) + 2.0
    y += 0.1 * torch.randn(400, 3, generator=g, dtype=torch.float64)
    w, b = fit_skip(x, y)
    ref = LinearRegression().fit(x.numpy(), y.numpy())
    torch.testing.assert_close(w, torch.from_numpy(ref.coef_), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(b, torch.from_numpy(ref.intercept_), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dense_bytes", [0, 2**20])  # conjugate gradients, Cholesky
def test_fit_decoder_solves_the_regularised_normal_equations(dense_bytes: int) -> None:
    g = torch.Generator().manual_seed(1)
    n, m, k, d = 300, 30, 4, 5
    idx = torch.stack([torch.randperm(m - 5, generator=g)[:k] for _ in range(n)])  # 5 unused
    val = torch.randn(n, k, generator=g, dtype=torch.float64)
    t = torch.randn(n, d, generator=g, dtype=torch.float64)
    d0 = torch.randn(m, d, generator=g, dtype=torch.float64)
    got = fit_decoder(SparseCode(idx, val), t, d0, ridge=1e-3, dense_bytes=dense_bytes)
    c = torch.zeros(n, m, dtype=torch.float64).scatter_add_(1, idx, val)
    diag = (c**2).sum(0)
    lam = 1e-3 * diag[diag > 0].mean()
    want = torch.linalg.solve(c.T @ c + lam * torch.eye(m, dtype=torch.float64), c.T @ t + lam * d0)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[m - 5 :], d0[m - 5 :], atol=1e-12, rtol=0)  # unused: kept
    with pytest.raises(ValueError, match="codes but"):
        fit_decoder(SparseCode(idx, val), t[:-1], d0)


def test_skip_connection_builds_on_what_the_linear_term_leaves(
    lm: HookedSAETransformer, tokens: torch.Tensor, tmp_path
) -> None:
    toks = tokens[:3]
    x, y, keep = stream_pairs(lm, toks)
    tc = build(lm, toks, skip_connection=True)
    sample = keep & (x.norm(dim=1) > 0)
    w, b = fit_skip(x[sample], y[sample])
    torch.testing.assert_close(tc.W_skip.double(), w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tc.b_dec.double(), b, atol=1e-5, rtol=1e-5)
    residual = y - x @ w.T - b
    rows = literal_rule(x, residual, keep, K, THRESHOLD, "output")
    seq = toks.shape[1]
    assert torch.equal(tc.atom_labels, torch.tensor([[r // seq, r % seq] for r in rows]))
    norms = x[rows].norm(dim=1, keepdim=True)
    torch.testing.assert_close(tc.W_dec.double(), residual[rows] / norms, atol=1e-5, rtol=1e-5)
    record = tc.build_record
    assert record is not None and record.skip_connection and record.decoder == "pairs"
    assert record.sample_pairs == int(sample.sum())
    xs = x[:50].float()
    with torch.no_grad():
        out = tc(xs)
        codes = tc.encode_sparse(xs)
        want = decode(codes, tc.W_dec) + tc.b_dec + xs @ tc.W_skip.T
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(tc.decode_sparse(codes, xs), want)
        with pytest.raises(ValueError, match="needs the input x"):
            tc.decode_sparse(codes)
        acts = tc.encode(xs)
        torch.testing.assert_close(tc.decode(acts), want)  # encode then decode: as spliced
        with pytest.raises(ValueError, match="decode needs the input of the encode just before"):
            tc.decode(acts)  # the input was used up by the decode before
        # spliced by HookedSAETransformer (encode, then decode): the skip term is in
        lm.add_sae(tc)
        try:
            _, cache = lm.run_with_cache(toks[:1])
        finally:
            lm.reset_saes()
        spliced = cache[f"{HOOK_OUT}.hook_sae_output"][0]
        torch.testing.assert_close(spliced, tc(cache[HOOK_IN][0]))
    tc.save_model(tmp_path)
    back = ITDATranscoder.load_from_disk(tmp_path)
    assert back.cfg.skip_connection and torch.equal(back.W_skip, tc.W_skip)
    with torch.no_grad():
        torch.testing.assert_close(back(x[:50].float()), out)


def test_refit_decoder_is_least_squares_on_the_samples_codes(
    lm: HookedSAETransformer, tokens: torch.Tensor
) -> None:
    toks = tokens[:3]
    x, y, keep = stream_pairs(lm, toks)
    pairs = build(lm, toks, max_atoms=60)
    tc = build(lm, toks, max_atoms=60, refit_decoder=True)
    assert torch.equal(tc.atom_labels, pairs.atom_labels) and torch.equal(tc.W_in, pairs.W_in)
    sample = keep & (x.norm(dim=1) > 0)
    codes = matching_pursuit(x[sample], pairs.W_in.double(), K)
    want = fit_decoder(codes, y[sample], pairs.W_dec.double())
    torch.testing.assert_close(tc.W_dec.double(), want, atol=1e-4, rtol=1e-4)
    assert tc.build_record.decoder == "lstsq"  # type: ignore[union-attr]
    fvu = lambda t: float(((t.decode(t.encode(x[sample].float())) - y[sample]) ** 2).sum())  # noqa: E731
    with torch.no_grad():
        assert fvu(tc) < fvu(pairs)  # on the sample it was fitted on


def test_target_atoms_searches_the_threshold_on_the_sample(
    lm: HookedSAETransformer, tokens: torch.Tensor
) -> None:
    tc = build(lm, tokens, target_atoms=80, target_sample_tokens=512)
    record = tc.build_record
    assert record is not None and record.search is not None
    assert record.search["target"] == 80 and record.sample_pairs is not None
    assert record.sample_pairs < 512  # BOS excluded
    assert tc.cfg.d_sae == 80 and record.stop_reason == "full"  # capped at the target
    same = build(lm, tokens, cos_threshold=record.search["threshold"], max_atoms=80)
    assert torch.equal(same.atom_labels, tc.atom_labels)


def test_patience_stops_a_converged_build(lm: HookedSAETransformer, tokens: torch.Tensor) -> None:
    tc = build(lm, tokens, patience_tokens=20, cos_threshold=0.5)
    record = tc.build_record
    assert record is not None and record.stop_reason == "converged"
    assert record.tokens_seen < tokens.numel()


def test_build_itda_with_hook_out_builds_the_transcoder(
    lm: HookedSAETransformer, tokens: torch.Tensor, built: ITDATranscoder
) -> None:
    via = build_itda(
        lm, tokens, HOOK_IN, k=K, cos_threshold=THRESHOLD, hook_out=HOOK_OUT, progress=False
    )
    assert isinstance(via, ITDATranscoder)
    assert torch.equal(via.atom_labels, built.atom_labels) and torch.equal(via.W_dec, built.W_dec)
    by_input = build_itda(lm, tokens[:2], HOOK_IN, hook_out=HOOK_OUT, judge="input", progress=False)
    assert by_input.build_record.judge == "input"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="hook_name must be a string"):
        build_itda(lm, tokens[:1], [HOOK_IN], hook_out=HOOK_OUT, progress=False)  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="keeps no checkpoint"):
        build_itda(lm, tokens[:1], HOOK_IN, hook_out=HOOK_OUT, resume=True, progress=False)

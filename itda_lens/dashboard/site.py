"""Write a static dashboard site for any sae_lens SAE or ITDA: index, one panel per latent.

A transcoder's latents (an ITDA transcoder's, or any sae_lens ``Transcoder``'s) are read at its
input hook (``hook_name``: the top contexts and histograms are of its codes there) and write its
output hook (``hook_name_out``): the promoted and suppressed tokens are those of each latent's
output atom ``W_dec[i]``. An ITDA transcoder's atoms, like an ITDA's, each show the token and
passage the pair was read at.

The site is plain files (HTML, one JS app, CSS, data as JS shards loaded by ``<script>`` tags, so
it opens from disk with no server, CDN or network). Statistics stream over the tokens in bounded
memory (:mod:`itda_lens.dashboard.stats`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from sae_lens import SAE
from sae_lens.saes.transcoder import Transcoder
from torch import Tensor
from tqdm.auto import tqdm

from itda_lens.activations import iter_hook_activations
from itda_lens.analysis import replay_sequences
from itda_lens.dashboard.stats import LatentStats, Reservoir, SparseEntries, coalesce
from itda_lens.evals import require_hook_name
from itda_lens.resolve import output_folder
from itda_lens.saes import ITDABase

#: Latents per data shard (one JS file each).
SHARD = 256
#: Dense codes encoded at once for non-ITDA SAEs: rows x d_sae floats (bounds memory).
DENSE_BUDGET = 2**24
ASSETS = ("index.html", "app.js", "style.css")
LOGIT_NOTE = (
    "Decoder direction times the unembedding W_U, with the final layer norm's scale folded into "
    "W_U and its normalisation ignored, as sae-dashboard and Neuronpedia do."
)
TRANSCODER_LOGIT_NOTE = (
    "The latent's output atom W_dec[i] (what it writes at {hook_out}) times the unembedding W_U, "
    "with the final layer norm's scale folded into W_U and its normalisation ignored, as "
    "sae-dashboard and Neuronpedia do."
)


def sparse_codes(sae: SAE[Any], x: Float[Tensor, "n d"]) -> SparseEntries:
    """Non-zero codes of ``x`` as (row, latent, value) entries: ITDAs and ITDA transcoders by
    their sparse pursuit, other SAEs by their dense ``encode`` in row blocks (never the whole
    tokens x latents matrix)."""
    d_sae = sae.cfg.d_sae
    if isinstance(sae, ITDABase):
        code = sae.encode_sparse(x)
        return coalesce(code.indices.cpu(), code.values.float().cpu(), d_sae)
    step = max(1, DENSE_BUDGET // d_sae)
    parts = []
    for s in range(0, x.shape[0], step):
        dense = sae.encode(x[s : s + step]).float().cpu()
        row, lat = dense.nonzero(as_tuple=True)
        parts.append(SparseEntries(row + s, lat, dense[row, lat]))
    return SparseEntries(*(torch.cat(t) for t in zip(*parts, strict=True)))


@torch.no_grad()
def collect(
    sae: SAE[Any],
    model: Any,
    tokens: Int[Tensor, "n_seq seq"],
    *,
    batch_size: int = 16,
    progress: bool = True,
    **stats: Any,
) -> LatentStats:
    """Stream ``tokens`` through ``model`` to the SAE's hook (a transcoder's input hook) and
    accumulate :class:`LatentStats` (special tokens are read but never coded)."""
    hook = require_hook_name(sae)
    result = LatentStats(sae.cfg.d_sae, **stats)
    seq_len = tokens.shape[1]
    bar = tqdm(total=tokens.numel(), desc="dashboard: encoding", unit="tok", disable=not progress)
    device = sae.W_dec.device
    for batch in iter_hook_activations(model, tokens, [hook], batch_size=batch_size):
        kept = batch.keep.nonzero().flatten()
        x = batch.acts[hook][kept].to(device, sae.W_dec.dtype)
        if x.shape[-1] != sae.cfg.d_in:
            raise ValueError(
                f"d_in mismatch: {hook} gives {x.shape[-1]}-d activations but the SAE has "
                f"d_in={sae.cfg.d_in}; is it the SAE of this model?"
            )
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"activations at {hook} contain NaN or Inf")
        e = sparse_codes(sae, x)
        e = SparseEntries(kept[e.row], e.latent, e.value)
        seq, pos = batch.labels[:, 0], batch.labels[:, 1]
        result.update(e, batch.labels.shape[0], seq * seq_len + pos, seq, int(kept.numel()))
        bar.update(batch.labels.shape[0])
    bar.close()
    return result


def logit_effects(
    sae: SAE[Any], model: Any, n: int = 10, latents: Sequence[int] | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """Each latent's (or each of ``latents``', in that order) ``n`` most promoted and suppressed
    tokens ``(up_ids, up, down_ids, down)``, through the unembedding (see ``LOGIT_NOTE``); None
    where the decoder does not write to the residual stream (the hook it writes, a transcoder's
    ``hook_name_out``, is not d_model wide or lies inside attention / the MLP)."""
    hook = sae.cfg.metadata.hook_name_out or require_hook_name(sae)
    W_U = getattr(model, "W_U", None)
    cfg = getattr(model, "cfg", None)
    writes_resid = "resid" in hook or hook.endswith(("hook_attn_out", "hook_mlp_out"))
    if W_U is None or cfg is None or sae.W_dec.shape[1] != cfg.d_model or not writes_resid:
        return None
    W = W_U.detach().float().cpu()
    scale = getattr(getattr(model, "ln_final", None), "w", None)
    if scale is not None:
        W = W * scale.detach().float().cpu()[:, None]
    dec = sae.W_dec.detach().float().cpu()
    if latents is not None:
        dec = dec[torch.as_tensor(list(latents), dtype=torch.long)]
    k = min(n, W.shape[1])
    ups, upv, downs, downv = [], [], [], []
    for s in range(0, dec.shape[0], 1024):
        eff = dec[s : s + 1024] @ W
        top = eff.topk(k, dim=1)
        bot = eff.topk(k, dim=1, largest=False)
        ups.append(top.indices), upv.append(top.values)
        downs.append(bot.indices), downv.append(bot.values)
    return torch.cat(ups), torch.cat(upv), torch.cat(downs), torch.cat(downv)


def output_hook(sae: SAE[Any]) -> str | None:
    """The hook a transcoder writes (``hook_name_out``), or None for an SAE (it writes the hook it
    reads)."""
    if not isinstance(sae, Transcoder):
        return None
    hook_out = sae.cfg.metadata.hook_name_out
    if not hook_out:
        raise ValueError(
            f"this {type(sae).__name__} has no hook_name_out (the hook its output atoms write): "
            "set sae.cfg.metadata.hook_name_out, e.g. 'blocks.1.hook_mlp_out'"
        )
    return hook_out


def _r(t: Tensor, digits: int = 3) -> list[Any]:
    """Rounded floats for JSON (short numbers, smaller files)."""
    m = 10.0**digits
    return (t.double() * m).round().div(m).tolist()


def _vocab(tokenizer: Any, d_vocab: int) -> list[str]:
    if tokenizer is None:
        return [str(i) for i in range(d_vocab)]
    return [tokenizer.decode([i]) for i in range(d_vocab)]


def _contexts(
    res: Reservoir, lo: int, hi: int, tokens: Tensor, before: int, after: int
) -> list[list[dict[str, Any]]]:
    """The kept entries of latents ``lo..hi-1`` as contexts (largest key first): value, sequence
    and position, window tokens, the centre's index in them and the latent's values on them."""
    seq_len = tokens.shape[1]
    key = res.key[lo:hi]
    order = torch.argsort(key, dim=1, descending=True, stable=True)
    key = key.gather(1, order)
    where = res.where[lo:hi].gather(1, order)
    value = res.value[lo:hi].gather(1, order)
    window = res.window[lo:hi].gather(1, order.unsqueeze(-1).expand(-1, -1, res.width))
    valid = (key > -torch.inf) & (where >= 0)
    g = where.clamp_min(0)
    seq, pos = g // seq_len, g % seq_len
    offsets = pos.unsqueeze(-1) + torch.arange(-before, after + 1)
    toks = tokens[seq.unsqueeze(-1), offsets.clamp(0, seq_len - 1)]
    first = (before - pos).clamp_min(0)  # window slots before the sequence start
    last = res.width - (pos + after + 1 - seq_len).clamp_min(0)
    rows = zip(
        valid.tolist(),
        value.tolist(),
        seq.tolist(),
        pos.tolist(),
        first.tolist(),
        last.tolist(),
        toks.tolist(),
        _r(window.float()),
        strict=True,
    )
    out = []
    for ok_r, v_r, s_r, p_r, f_r, l_r, t_r, a_r in rows:
        out.append(
            [
                {"v": round(v, 4), "s": s, "p": p, "c": before - f, "t": t[f:e], "a": a[f:e]}
                for ok, v, s, p, f, e, t, a in zip(
                    ok_r, v_r, s_r, p_r, f_r, l_r, t_r, a_r, strict=True
                )
                if ok
            ]
        )
    return out


def _lower_quantiles(samples: list[dict[str, Any]], n: int = 5) -> list[dict[str, Any]]:
    """Up to ``n`` of a uniform sample of firings, spread over the lower half of their |values|,
    each with its quantile within the sample."""
    ranked = sorted(samples, key=lambda c: abs(c["v"]))
    m = len(ranked)
    if m == 0:
        return []
    half = max(1, m // 2)
    picks = sorted({round(i * (half - 1) / max(1, n - 1)) for i in range(n)}) if half > 1 else [0]
    return [{**ranked[i], "q": round(i / max(1, m - 1), 2)} for i in picks]


def write_dashboard(
    sae: SAE[Any],
    model: Any,
    tokens: Int[Tensor, "n_seq seq"],
    out: str | Path,
    *,
    provenance_tokens: Any = None,
    data_name: str | None = None,
    top_k: int = 10,
    samples: int = 24,
    before: int = 10,
    after: int = 4,
    batch_size: int = 16,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Compute every latent's statistics over ``tokens`` (held-out text) and write the site to
    ``out``; returns the path of its ``index.html``. For an ITDA or an ITDA transcoder,
    ``provenance_tokens`` (the token input it was built from) lets each atom show the passage it
    was read at. A transcoder is read at its input hook and its promoted tokens are its output
    atoms' (module doc)."""
    final = Path(out)
    hook_out = output_hook(sae)
    output_folder(final, overwrite)  # the old site is replaced only once the new one is complete
    if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.numel() == 0:
        raise ValueError("tokens must be a non-empty [n_seq, seq_len] tensor of token ids")
    stats = collect(
        sae,
        model,
        tokens,
        batch_size=batch_size,
        progress=progress,
        top_k=top_k,
        samples=samples,
        before=before,
        after=after,
    )
    tokenizer = getattr(model, "tokenizer", None)
    d_vocab = int(getattr(getattr(model, "cfg", None), "d_vocab", 0) or int(tokens.max()) + 1)
    logits = logit_effects(sae, model)
    partners, jaccard = stats.cofiring()
    d_sae = sae.cfg.d_sae
    freq = stats.count.double() / max(1, stats.n_tokens)
    mean_abs = stats.abs_sum / stats.count.clamp_min(1)
    max_abs = stats.top.key[:, 0].clamp_min(0)
    is_itda = isinstance(sae, ITDABase)  # atoms read at tokens: an ITDA or an ITDA transcoder
    if is_itda:
        label = sae.atom_token_ids.cpu().long()
    else:  # the token at each latent's strongest activation
        g = stats.top.where[:, 0]
        label = torch.where(g >= 0, tokens.reshape(-1)[g.clamp_min(0)], -1)
    provenance = _provenance(sae, provenance_tokens, tokenizer, before, after) if is_itda else {}

    # written next to the target and swapped in at the end: a failure leaves the old site intact
    out = final.with_name(f".{final.name}.partial")
    if out.exists():
        shutil.rmtree(out)
    data = out / "data"
    data.mkdir(parents=True)
    meta = sae.cfg.metadata
    index = {
        "meta": {
            "architecture": sae.cfg.architecture(),
            "hook": require_hook_name(sae),
            "hook_out": hook_out,
            "model": getattr(meta, "model_name", None),
            "d_in": sae.cfg.d_in,
            "d_out": sae.W_dec.shape[1],
            "d_sae": d_sae,
            "n_tokens": stats.n_tokens,
            "data": data_name,
            "is_itda": is_itda,
            "is_transcoder": hook_out is not None,
            "shard": SHARD,
            "cofire_tokens": stats.co_tokens,
            "logit_note": _logit_note(hook_out) if logits is not None else None,
            "no_logits": None if logits is not None else _no_logits(sae, model, hook_out),
            "label_kind": "own token" if is_itda else "top token",
        },
        "vocab": _vocab(tokenizer, d_vocab),
        "freq": [float(f"{v:.4g}") for v in freq.tolist()],
        "mean_abs": _r(mean_abs),
        "max_abs": _r(max_abs),
        "label": label.tolist(),
    }
    _write_js(data / "index.js", f"DASH.setIndex({json.dumps(index, separators=(',', ':'))});")
    shards = range(0, d_sae, SHARD)
    for start in tqdm(shards, desc="dashboard: writing", unit="shard", disable=not progress):
        items = []
        stop = min(d_sae, start + SHARD)
        tops = _contexts(stats.top, start, stop, tokens, before, after)
        lows = _contexts(stats.sample, start, stop, tokens, before, after)
        for i in range(start, stop):
            item: dict[str, Any] = {
                "i": i,
                "top": tops[i - start],
                "low": _lower_quantiles(lows[i - start]),
                "hist": stats.histogram(i),
                "co": [
                    [int(j), round(float(s), 3)]
                    for j, s in zip(partners[i].tolist(), jaccard[i].tolist(), strict=True)
                    if j >= 0
                ],
            }
            if logits is not None:
                up_i, up_v, dn_i, dn_v = (t[i] for t in logits)
                item["up"] = [[int(a), round(float(b), 3)] for a, b in zip(up_i, up_v, strict=True)]
                item["down"] = [
                    [int(a), round(float(b), 3)] for a, b in zip(dn_i, dn_v, strict=True)
                ]
            if i in provenance:
                item["src"] = provenance[i]
            items.append(item)
        text = json.dumps(items, separators=(",", ":"))
        _write_js(
            data / f"shard_{start // SHARD:05d}.js", f"DASH.addShard({start // SHARD},{text});"
        )
    assets = resources.files("itda_lens.dashboard") / "assets"
    for name in ASSETS:
        (out / name).write_text((assets / name).read_text(encoding="utf-8"), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    out.rename(final)
    return final / "index.html"


def _logit_note(hook_out: str | None) -> str:
    return LOGIT_NOTE if hook_out is None else TRANSCODER_LOGIT_NOTE.format(hook_out=hook_out)


def _no_logits(sae: SAE[Any], model: Any, hook_out: str | None) -> str:
    """Why no latent shows promoted tokens (``logit_effects`` gave None)."""
    if getattr(model, "W_U", None) is None:
        return "No promoted tokens: the model has no unembedding W_U."
    if hook_out is None:
        return (
            f"No promoted tokens: the decoder writes {require_hook_name(sae)}, which is not "
            "added to the residual stream the unembedding reads."
        )
    return (
        f"No promoted tokens: the output atoms write {hook_out}, which is not added to the "
        "residual stream the unembedding reads."
    )


def _provenance(
    sae: ITDABase[Any], source: Any, tokenizer: Any, before: int, after: int
) -> dict[int, dict[str, Any]]:
    """Each atom's own context in the stream it was built from (when that stream is given)."""
    labels = sae.atom_labels.cpu()
    if source is None:
        return {}
    meta = sae.cfg.metadata
    wanted = {int(s) for s in labels[:, 0].tolist() if s >= 0}
    seqs = replay_sequences(
        source, wanted, context_size=getattr(meta, "context_size", None), tokenizer=tokenizer
    )
    out = {}
    for a, (s, p) in enumerate(labels.tolist()):
        if s not in seqs:
            continue
        seq = seqs[s]
        lo, hi = max(0, p - before), min(seq.shape[0], p + after + 1)
        out[a] = {"s": s, "p": p, "c": p - lo, "t": seq[lo:hi].tolist()}
    return out


def _write_js(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")

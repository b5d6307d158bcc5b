"""The reference code's files: a folder written the way pleask/itda's ``train.py`` writes it loads as
an ITDA that encodes like the reference's matching pursuit, exports back to the same files, and
every malformed file gets an error naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from sae_lens import SAE, HookedSAETransformer

from itda_lens import ITDA, build_itda
from itda_lens.saes.reference import (
    REFERENCE_KEY,
    cos_threshold_from_tau,
    tau_from_cos_threshold,
)
from itda_lens.similarity import jaccard
from tests.helpers import make_tokens

D, N = 32, 50
META = {
    "lm_name": "gpt2",
    "layer": 1,
    "k": 8,
    "loss_threshold": 0.004,
    "dataset": "NeelNanda/pile-10k",
    "seq_len": 16,
    "batch_size": 128,
    "steps": 10,
    "seed": 0,
    "max_dict_size": 1000,
    "activation_dim": D,
    "submodule_name": None,
    "device": "cuda",
    "wandb_name": "gpt2_layer_1",
}


def write_like_reference(folder: Path, meta: dict | None = None, seed: int = 0) -> Path:
    """The three files as the reference writes them: unit float32 atoms and int64 (sequence,
    position) labels with torch.save, the trainer config with yaml.dump."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(N, D, generator=g)
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    labels = torch.stack(
        [torch.randint(0, 1280, (N,), generator=g), torch.randint(0, 16, (N,), generator=g)], 1
    )
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(atoms, folder / "atoms.pt")
    torch.save(labels, folder / "atom_indices.pt")
    (folder / "metadata.yaml").write_text(yaml.dump(META if meta is None else meta))
    return folder


def reference_mp(x: torch.Tensor, atoms: torch.Tensor, k: int) -> torch.Tensor:
    """The reference's mp_encode, transcribed: k times, the atom of largest |correlation| takes the
    signed correlation, added to its coefficient and subtracted from the residual."""
    residual = x.clone()
    coef = torch.zeros(x.shape[0], atoms.shape[0], dtype=x.dtype)
    for _ in range(k):
        corr = residual @ atoms.T
        best = corr.abs().argmax(dim=1)
        c = corr.gather(1, best[:, None])[:, 0]
        coef[torch.arange(x.shape[0]), best] += c
        residual = residual - c[:, None] * atoms[best]
    return coef


def test_reference_folder_loads_and_encodes_like_the_reference(tmp_path: Path) -> None:
    folder = write_like_reference(tmp_path / "ref")
    itda = ITDA.from_reference(folder)
    atoms = torch.load(folder / "atoms.pt")
    assert torch.equal(itda.W_dec.detach(), atoms)  # unit rows kept as stored
    assert torch.equal(itda.atom_labels, torch.load(folder / "atom_indices.pt"))
    assert bool((itda.atom_token_ids == -1).all())  # token text unknown without the stream
    assert itda.cfg.k == 8 and itda.cfg.encoder == "mp"
    meta = itda.cfg.metadata
    assert meta.hook_name == "blocks.1.hook_resid_post" and meta.model_name == "gpt2"
    assert meta.dataset_path == "NeelNanda/pile-10k" and meta.context_size == 16
    record = itda.require_build_record()
    assert record.cos_threshold == cos_threshold_from_tau(0.004, D) == pytest.approx(1 - 0.064)
    assert record.config["add_rule"] == "batch" and record.stream.n_sequences == 1280
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(5)) * 3
    want = reference_mp(x.double(), atoms.double(), 8)
    torch.testing.assert_close(itda.encode(x).double(), want, atol=1e-4, rtol=1e-4)
    # a registered, saved ITDA: sae_lens loads it with the settings and the reference metadata
    itda.save_model(tmp_path / "saved")
    back = SAE.load_from_disk(tmp_path / "saved")
    assert isinstance(back, ITDA) and torch.equal(back.atom_labels, itda.atom_labels)
    assert back.require_build_record() == record
    assert back.cfg.metadata[REFERENCE_KEY]["wandb_name"] == "gpt2_layer_1"
    # two dictionaries of one reference run index the same stream: comparable by label Jaccard
    other = ITDA.from_reference(write_like_reference(tmp_path / "ref2", seed=1))
    assert 0 <= jaccard(itda, other) < 1
    assert jaccard(itda, itda) == 1


def test_k_defaults_to_the_reference_loaders_40(tmp_path: Path) -> None:
    meta = {key: value for key, value in META.items() if key != "k"}
    assert ITDA.from_reference(write_like_reference(tmp_path / "ref", meta)).cfg.k == 40


def test_export_then_import_is_identical(tmp_path: Path) -> None:
    folder = write_like_reference(tmp_path / "ref")
    itda = ITDA.from_reference(folder)
    out = itda.to_reference(tmp_path / "out")
    assert yaml.safe_load((out / "metadata.yaml").read_text()) == META
    for name in ("atoms.pt", "atom_indices.pt"):
        assert torch.equal(torch.load(out / name), torch.load(folder / name))
    again = ITDA.from_reference(out)
    assert torch.equal(again.W_dec, itda.W_dec) and torch.equal(again.atom_labels, itda.atom_labels)
    assert again.cfg.k == itda.cfg.k
    assert again.require_build_record() == itda.require_build_record()


def test_an_itda_lens_build_round_trips_through_the_reference_format(
    model: HookedSAETransformer, tmp_path: Path
) -> None:
    hook = "blocks.1.hook_resid_post"
    tokens = make_tokens(24)
    built = build_itda(model, tokens, hook, k=6, cos_threshold=0.7, progress=False)[hook]
    out = built.to_reference(tmp_path / "out")
    meta = yaml.safe_load((out / "metadata.yaml").read_text())
    assert meta["k"] == 6 and meta["layer"] == 1 and meta["seq_len"] == tokens.shape[1]
    assert meta["loss_threshold"] == pytest.approx(tau_from_cos_threshold(0.7, built.cfg.d_in))
    back = ITDA.from_reference(out, tokens=tokens)
    assert torch.equal(back.W_dec, built.W_dec) and torch.equal(back.atom_labels, built.atom_labels)
    assert torch.equal(back.atom_token_ids, built.atom_token_ids)  # filled in from the stream
    assert back.require_build_record().cos_threshold == pytest.approx(0.7, abs=1e-12)
    assert jaccard(back, built) == 1  # the same stream's fingerprint: comparable with the build
    x = torch.randn(16, built.cfg.d_in)
    torch.testing.assert_close(back.encode(x), built.encode(x))
    with pytest.raises(ValueError, match=r"tokens must be the reference's stream"):
        ITDA.from_reference(out, tokens=tokens[:, :5])
    with pytest.raises(ValueError, match="give the whole stream"):
        ITDA.from_reference(out, tokens=tokens[:1])


def test_export_refuses_what_the_format_cannot_hold(tmp_path: Path) -> None:
    atoms = torch.randn(4, D)
    with pytest.raises(ValueError, match="without provenance"):
        ITDA.from_atoms(atoms, k=2).to_reference(tmp_path / "a")
    labelled = ITDA.from_atoms(atoms, k=2, labels=torch.tensor([[0, 1], [0, 2], [1, 1], [2, 3]]))
    with pytest.raises(ValueError, match="pass loss_threshold"):
        labelled.to_reference(tmp_path / "b")
    out = labelled.to_reference(tmp_path / "c", loss_threshold=0.01)
    assert yaml.safe_load((out / "metadata.yaml").read_text())["loss_threshold"] == 0.01


class Evil:
    """Unpickling this would run code; weights_only loading must refuse it."""

    def __reduce__(self) -> tuple:
        return (print, ("unpickled!",))


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda f: (f / "atoms.pt").unlink(), "atoms.pt is missing"),
        (lambda f: (f / "atom_indices.pt").unlink(), "atom_indices.pt is missing"),
        (lambda f: (f / "metadata.yaml").unlink(), "metadata.yaml is missing"),
        (lambda f: (f / "atoms.pt").write_bytes(b"not a tensor"), "corrupt .*atoms.pt"),
        (lambda f: torch.save(Evil(), f / "atoms.pt"), "corrupt .*atoms.pt"),
        (lambda f: torch.save({"atoms": torch.ones(2)}, f / "atoms.pt"), "holds a dict"),
        (lambda f: torch.save(torch.ones(N), f / "atoms.pt"), r"float \[n_atoms, d_model\]"),
        (lambda f: torch.save(torch.full((N, D), float("nan")), f / "atoms.pt"), "NaN or Inf"),
        (lambda f: torch.save(torch.ones(N, D), f / "atoms.pt"), "unit-norm"),
        (
            lambda f: torch.save(torch.zeros(N, 3, dtype=torch.long), f / "atom_indices.pt"),
            r"must be \[50, 2\]",
        ),
        (lambda f: torch.save(torch.zeros(N, 2), f / "atom_indices.pt"), "must hold integers"),
        (
            lambda f: torch.save(-torch.ones(N, 2, dtype=torch.long), f / "atom_indices.pt"),
            "negative",
        ),
        (
            lambda f: torch.save(torch.full((N, 2), 99, dtype=torch.long), f / "atom_indices.pt"),
            "beyond seq_len=16",
        ),
        (lambda f: (f / "metadata.yaml").write_text("- a\n- list\n"), "YAML mapping"),
        (lambda f: (f / "metadata.yaml").write_text("k: [unclosed\n"), "corrupt .*metadata.yaml"),
        (lambda f: _meta(f, loss_threshold=None), "loss_threshold must be a float"),
        (lambda f: _meta(f, loss_threshold="0.1"), "loss_threshold must be a float"),
        (lambda f: _meta(f, loss_threshold=1.0), "can never add an atom"),
        (lambda f: _meta(f, k=0), "k"),
        (lambda f: _meta(f, layer=None), "layer must be a int"),
        (lambda f: _meta(f, seq_len=None), "seq_len must be a int"),
        (lambda f: _meta(f, activation_dim=768), "activation_dim is 768 but the atoms have d = 32"),
    ],
)
def test_malformed_reference_files_get_clear_errors(tmp_path: Path, damage, match: str) -> None:
    folder = write_like_reference(tmp_path / "ref")
    damage(folder)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        ITDA.from_reference(folder)


def _meta(folder: Path, **change: object) -> None:
    (folder / "metadata.yaml").write_text(yaml.dump({**META, **change}))


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no reference ITDA folder"):
        ITDA.from_reference(tmp_path / "nothing")

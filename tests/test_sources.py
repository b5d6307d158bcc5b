"""Activation sources beyond HookedTransformer, offline on a tiny GPT-2 made from a config and saved
locally: the same weights read as a Hugging Face model by module path, as a TransformerLens model
and as a TransformerBridge give the same dictionary; the CLI builds from ``hf:DIR`` (and under
``torchrun``), and the folders load in ``itda-lens inspect`` and sae_lens."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sae_lens import SAE, SAETransformerBridge
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens import loading_from_pretrained as loading
from transformer_lens.model_bridge import TransformerBridge
from transformers import GPT2Config, GPT2LMHeadModel

from itda_lens import ITDA, build_itda, zoo
from itda_lens.cli import main
from itda_lens.sources import ModuleSource, load_hf

SETTINGS = {"k": 8, "cos_threshold": 0.8, "batch_size": 8, "progress": False}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer GPT-2 with the zoo tokenizer, saved as a Hugging Face folder."""
    tok = zoo.load_model().tokenizer
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=128,
        n_ctx=128,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tl_over(folder: Path, hf: GPT2LMHeadModel) -> HookedTransformer:
    """A TransformerLens model over the HF model's weights, unprocessed (offline: the config is
    read from the folder, not the hub)."""
    cfg_dict = loading.convert_hf_model_config(str(folder))
    cfg = HookedTransformerConfig(**{**cfg_dict, "model_name": "tiny_gpt2"}, device="cpu")
    model = HookedTransformer(cfg, tokenizer=zoo.load_model().tokenizer)
    state = loading.get_pretrained_state_dict(str(folder), cfg, hf_model=hf)
    model.load_and_process_state_dict(
        state,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return model


def tokens() -> torch.Tensor:
    return zoo.load_tokens("train", 32, 64)


def same_dictionary(a: ITDA, b: ITDA) -> None:
    assert torch.equal(a.atom_labels, b.atom_labels)
    torch.testing.assert_close(a.W_dec, b.W_dec, atol=1e-5, rtol=0)


def test_hf_module_path_and_tl_hook_give_the_same_dictionary(hf_dir: Path) -> None:
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    source = ModuleSource(hf, zoo.load_model().tokenizer)
    from_hf = build_itda(source, tokens(), "transformer.h.1", **SETTINGS)["transformer.h.1"]
    from_tl = build_itda(tl_over(hf_dir, hf), tokens(), "blocks.1.hook_resid_post", **SETTINGS)[
        "blocks.1.hook_resid_post"
    ]
    assert from_hf.cfg.d_sae > 20
    same_dictionary(from_hf, from_tl)
    # a module's input is the previous module's output
    both = build_itda(source, tokens(), ["transformer.h.1:input", "transformer.h.0"], **SETTINGS)
    same_dictionary(both["transformer.h.1:input"], both["transformer.h.0"])


def test_transformer_bridge_builds_and_attaches(hf_dir: Path) -> None:
    def boot(cls: type[TransformerBridge]) -> TransformerBridge:
        hf = GPT2LMHeadModel.from_pretrained(hf_dir, attn_implementation="eager").eval()
        return cls.boot_transformers(
            str(hf_dir), hf_model=hf, tokenizer=zoo.load_model().tokenizer, device="cpu"
        )

    # TL hook names on the bridge; the same dictionary as the HF module it aliases
    itda = build_itda(boot(TransformerBridge), tokens(), "blocks.1.hook_resid_post", **SETTINGS)[
        "blocks.1.hook_resid_post"
    ]
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    source = ModuleSource(hf, zoo.load_model().tokenizer)
    same_dictionary(
        itda, build_itda(source, tokens(), "transformer.h.1", **SETTINGS)["transformer.h.1"]
    )
    # attached with sae_lens's SAETransformerBridge (which resolves the alias itself)
    bridge = boot(SAETransformerBridge)
    x = tokens()[:2]
    clean = bridge(x)
    bridge.add_sae(itda)
    patched = bridge(x)
    assert patched.shape == clean.shape and not torch.equal(patched, clean)
    bridge.reset_saes()
    torch.testing.assert_close(bridge(x), clean)


def test_unknown_module_path_names_close_matches(hf_dir: Path) -> None:
    source = load_hf(hf_dir)
    with pytest.raises(ValueError, match=r"transformer\.h\.1"):
        build_itda(source, tokens(), "transformer.h1", **SETTINGS)["transformer.h1"]
    with pytest.raises(ValueError, match="cannot load Hugging Face model"):
        load_hf(hf_dir / "missing")


def test_not_residual_activations_are_refused(hf_dir: Path) -> None:
    source = load_hf(hf_dir)
    with pytest.raises(ValueError, match=r"not \[batch, seq, d\] activations"):
        source.run_with_cache(tokens()[:2], ["transformer"])
    # attention dropout is skipped by the fused (sdpa) attention
    with pytest.raises(ValueError, match="never ran"):
        source.run_with_cache(tokens()[:2], ["transformer.h.0.attn.attn_dropout"])


def test_cli_builds_from_an_hf_folder(hf_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "itda"
    argv = ["build", "--model", f"hf:{hf_dir}", "--hook", "transformer.h.1", "--data", "kjv"]
    assert main([*argv, "--out", str(out), "--max-tokens", "4096", "--k", "8"]) == 0
    itda = SAE.load_from_disk(str(out))
    assert isinstance(itda, ITDA) and itda.cfg.metadata.hook_name == "transformer.h.1"
    assert main(["inspect", str(out), "--top", "3"]) == 0


def test_cli_diffs_two_hf_folders(hf_dir: Path, tmp_path: Path) -> None:
    """Model diffing on module-path sources: a copy of the tiny GPT-2 whose embedding of one token
    moved differs from it exactly at that token's positions (read before the first block)."""
    import json

    tok = zoo.load_model().tokenizer
    changed = tok(" the", add_special_tokens=False)["input_ids"][0]
    hf = GPT2LMHeadModel.from_pretrained(hf_dir)
    with torch.no_grad():
        hf.transformer.wte.weight[changed] += 3 * torch.randn(
            64, generator=torch.Generator().manual_seed(0)
        )
    ft_dir = tmp_path / "ft"
    hf.save_pretrained(ft_dir)
    tok.save_pretrained(ft_dir)
    out = tmp_path / "diff"
    argv = ["diff", f"hf:{hf_dir}", f"hf:{ft_dir}", "--hook", "transformer.h.0:input"]
    assert (
        main([*argv, "--seqs", "16", "--k", "8", "--cos-threshold", "0.9", "--out", str(out)]) == 0
    )
    (layer,) = json.loads((out / "diff.json").read_text())["layers"]
    top = layer["top_contexts"]["fine-tune"]
    assert len(top) == 10 and all("[[ the]]" in c["context"] for c in top)
    # without --hook a module-path source has no default layers: it says so
    assert main(["diff", f"hf:{hf_dir}", f"hf:{ft_dir}", "--out", str(tmp_path / "x")]) == 2


@pytest.mark.slow
def test_torchrun_builds_the_single_process_dictionary(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None, "torchrun is installed with torch"
    common = ["build", "--hook", "blocks.1.hook_resid_post", "--max-tokens", "8192", "--k", "8"]
    common += ["--cos-threshold", "0.8", "--batch-size", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "itda_lens",
            *common,
            "--out",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    same_dictionary(ITDA.load_from_disk(tmp_path / "two"), ITDA.load_from_disk(tmp_path / "one"))
    assert main(["inspect", str(tmp_path / "two"), "--top", "3"]) == 0


def test_build_from_a_sae_lens_activation_cache(tmp_path: Path) -> None:
    """A cache in CacheActivationsRunner's format (its features) builds the ITDA of the same
    activations fed directly."""
    from datasets import Array2D, Dataset, Features, Sequence, Value

    from itda_lens import build_itda_from_activations
    from itda_lens.sources import sae_lens_cache_batches

    hook, ctx = "blocks.1.hook_resid_post", 32
    toks = zoo.load_tokens("train", 24, ctx)
    model = zoo.load_model()
    _, cache = model.run_with_cache(toks, names_filter=[hook])
    features = Features(
        {
            hook: Array2D(shape=(ctx, 128), dtype="float32"),
            "token_ids": Sequence(Value("int32"), length=ctx),
        }
    )
    Dataset.from_dict(
        {hook: cache[hook].numpy(), "token_ids": toks.int().numpy()}, features=features
    ).save_to_disk(tmp_path / "cache")
    settings = {"k": 8, "cos_threshold": 0.8, "progress": False}
    itda = build_itda_from_activations(sae_lens_cache_batches(tmp_path / "cache", hook), **settings)
    direct = build_itda_from_activations([cache[hook].reshape(-1, 128)], **settings)
    torch.testing.assert_close(itda.W_dec, direct.W_dec, atol=1e-6, rtol=0)
    rows = itda.atom_labels[:, 0] * ctx + itda.atom_labels[:, 1]
    assert torch.equal(rows, direct.atom_labels[:, 0])  # (cache row, position) <-> stream row
    assert torch.equal(itda.atom_token_ids, toks.reshape(-1)[rows])
    with pytest.raises(ValueError, match="has no column"):
        next(sae_lens_cache_batches(tmp_path / "cache", "blocks.0.hook_resid_post"))

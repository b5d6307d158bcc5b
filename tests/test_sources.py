"""Activation sources beyond HookedTransformer, offline on a tiny GPT-2 made from a config and saved
locally: the same weights read as a Hugging Face model by module path, as a TransformerLens model,
as a TransformerBridge, as an nnsight model and offloaded to disk by accelerate give the same
dictionary; the CLI builds from ``hf:DIR`` (and under ``torchrun``), and the folders load in
``itda-lens inspect`` and sae_lens."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE, SAETransformerBridge
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens import loading_from_pretrained as loading
from transformer_lens.model_bridge import TransformerBridge
from transformers import GPT2Config, GPT2LMHeadModel

from itda_lens import ITDA, build_itda, zoo
from itda_lens.cli import main
from itda_lens.sources import ModuleSource, NNsightSource, as_source, load_hf

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
    calls: list[dict[str, Any]] = []
    hf.register_forward_pre_hook(lambda m, a, kw: calls.append(kw), with_kwargs=True)
    from_hf = build_itda(source, tokens(), "transformer.h.1", **SETTINGS)["transformer.h.1"]
    assert calls and all(kw.get("use_cache") is False for kw in calls)  # no key/value cache kept
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


def nnsight_or_skip() -> Any:
    """nnsight, or a skip saying how to install it (it is the optional ``nnsight`` extra)."""
    return pytest.importorskip(
        "nnsight", reason='nnsight is not installed (pip install -e ".[nnsight]")'
    )


def test_nnsight_model_builds_the_module_source_dictionary(
    hf_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An nnsight LanguageModel given to build_itda as is (wrapped in NNsightSource) reads the same
    activations as ModuleSource at a module's output and at an ``:input``, stopping after the last
    requested module; bad names get ModuleSource's errors."""
    nnsight = nnsight_or_skip()
    tok = zoo.load_model().tokenizer
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    with warnings.catch_warnings():  # 0.8.1 names it TransformersModel; LanguageModel still works
        warnings.simplefilter("ignore", nnsight.NNsightDeprecationWarning)
        lm = nnsight.LanguageModel(hf, tokenizer=tok)
    hooks = ["transformer.h.1", "transformer.h.0:input"]
    from_nnsight = build_itda(lm, tokens(), hooks, **SETTINGS)
    from_hf = build_itda(ModuleSource(hf, tok), tokens(), hooks, **SETTINGS)
    for hook in hooks:
        assert from_nnsight[hook].cfg.d_sae > 20
        same_dictionary(from_nnsight[hook], from_hf[hook])
    assert from_nnsight["transformer.h.1"].cfg.metadata.model_name == str(hf_dir)

    # the forward pass stops after the last module read: the final norm never runs; and it
    # keeps no key/value cache
    final_norm: list[int] = []
    handle = hf.transformer.ln_f.register_forward_hook(lambda m, i, o: final_norm.append(1))
    calls: list[dict[str, Any]] = []
    hf.register_forward_pre_hook(lambda m, a, kw: calls.append(kw), with_kwargs=True)
    source = as_source(lm)
    assert isinstance(source, NNsightSource)
    x = tokens()[:2]
    _, acts = source.run_with_cache(x, ["transformer.h.1", "transformer.h.0.mlp"])
    assert final_norm == [] and set(acts) == {"transformer.h.1", "transformer.h.0.mlp"}
    assert [kw["use_cache"] for kw in calls] == [False]
    hf(input_ids=x)
    handle.remove()
    assert final_norm == [1]  # the counter counts a full pass
    # nnsight's dry run of the remote path (the trace serialised, run with local modules hidden;
    # it hides them by editing sys.path, which it restores in another order)
    monkeypatch.setattr(sys, "path", list(sys.path))
    _, shipped = NNsightSource(lm, remote="local").run_with_cache(x, hooks)
    _, local = source.run_with_cache(x, hooks)
    for hook in hooks:
        assert torch.equal(shipped[hook], local[hook])

    with pytest.raises(ValueError, match=r"Did you mean \['transformer\.h\.1'"):
        build_itda(lm, tokens(), "transformer.h1", **SETTINGS)
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel has no module 'transformer\.h1'"):
        source.run_with_cache(x, ["transformer.h1:input"])
    with pytest.raises(ValueError, match="never ran"):  # sdpa attention skips its dropout module
        source.run_with_cache(x, ["transformer.h.0", "transformer.h.0.attn.attn_dropout"])
    with pytest.raises(ValueError, match=r"not \[batch, seq, d\] activations"):
        source.run_with_cache(x, ["transformer"])
    with pytest.raises(TypeError, match="use ModuleSource"):
        NNsightSource(hf)
    with pytest.raises(ValueError, match="needs an nnsight model NDIF can run"):
        NNsightSource(nnsight.NNsight(hf), remote=True)


def test_package_works_without_nnsight(monkeypatch: pytest.MonkeyPatch) -> None:
    """nnsight is optional: the package imports without it, other models pass through as_source,
    and NNsightSource says how to install it."""
    blocked = "import sys; sys.modules['nnsight'] = None; import itda_lens.cli, itda_lens.sources"
    run = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    monkeypatch.setitem(sys.modules, "nnsight", None)
    model = zoo.load_model()
    assert as_source(model) is model
    with pytest.raises(ImportError, match=r'pip install "itda_lens\[nnsight\]"'):
        NNsightSource(model)


def test_disk_offloaded_model_builds_the_in_memory_dictionary(hf_dir: Path, tmp_path: Path) -> None:
    """A model accelerate offloads to disk (a CPU budget smaller than the model) builds the
    dictionary of the model in memory: reads run on accelerate's execution device (not the meta
    device of the placeholders), and the weights the build fingerprints are read from disk."""
    pytest.importorskip("accelerate", reason="accelerate is not installed")
    hooks = ["transformer.h.1", "transformer.h.0:input"]
    in_memory = load_hf(hf_dir)
    expected = build_itda(in_memory, tokens(), hooks, **SETTINGS)
    weights = in_memory.model.state_dict()
    size = (hf_dir / "model.safetensors").stat().st_size
    for share, on_disk in ((0.3, {"disk"}), (0.8, {"cpu", "disk"})):
        source = load_hf(
            hf_dir,
            device_map="auto",
            max_memory={"cpu": int(share * size)},
            offload_folder=tmp_path / f"offload_{share}",
        )
        assert set(source.model.hf_device_map.values()) == on_disk
        assert any(p.is_meta for p in source.model.parameters())
        assert source.cfg.device == torch.device("cpu")
        built = build_itda(source, tokens(), hooks, **SETTINGS)
        for hook in hooks:
            same_dictionary(built[hook], expected[hook])
        offloaded = source.state_dict()
        assert set(offloaded) == set(weights)
        assert all(torch.equal(offloaded[k], w) for k, w in weights.items())
    with pytest.raises(ValueError, match="pass device_map"):
        load_hf(hf_dir, max_memory={"cpu": size})


def test_cli_builds_from_an_hf_folder(hf_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "itda"
    argv = ["build", "--model", f"hf:{hf_dir}", "--hook", "transformer.h.1", "--data", "kjv"]
    assert main([*argv, "--out", str(out), "--max-tokens", "4096", "--k", "8"]) == 0
    itda = SAE.load_from_disk(str(out))
    assert isinstance(itda, ITDA) and itda.cfg.metadata.hook_name == "transformer.h.1"
    assert main(["inspect", str(out), "--top", "3"]) == 0


def test_cli_builds_an_offloaded_hf_model(hf_dir: Path, tmp_path: Path) -> None:
    """`--max-cpu-memory` / `--offload-folder` build through accelerate's disk offload: the same
    dictionary as the model in memory."""
    pytest.importorskip("accelerate", reason="accelerate is not installed")
    argv = ["build", "--model", f"hf:{hf_dir}", "--hook", "transformer.h.1", "--max-tokens", "2048"]
    budget = str(int(0.3 * (hf_dir / "model.safetensors").stat().st_size))
    assert main([*argv, "--out", str(tmp_path / "plain"), "--k", "8"]) == 0
    offload = ["--max-cpu-memory", budget, "--offload-folder", str(tmp_path / "offload")]
    assert main([*argv, *offload, "--out", str(tmp_path / "disk"), "--k", "8"]) == 0
    from itda_lens.resolve import resolve_model

    source = resolve_model(
        f"hf:{hf_dir}", max_cpu_memory=budget, offload_folder=str(tmp_path / "offload")
    )
    assert "disk" in set(source.model.hf_device_map.values())  # what the CLI build ran on
    same_dictionary(SAE.load_from_disk(tmp_path / "disk"), SAE.load_from_disk(tmp_path / "plain"))
    bad = [*argv, "--max-cpu-memory", budget, "--out", str(tmp_path / "x")]
    assert main(bad) == 2  # a budget without a folder to offload to
    assert (
        main(
            ["build", "--hook", "blocks.0.hook_resid_post", *offload, "--out", str(tmp_path / "y")]
        )
        == 2
    )


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

"""The command line: build and inspect against a local model folder and a token file."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from sae_lens import SAE

from itda_lens import ITDA, zoo
from itda_lens.cli import main
from itda_lens.models import load_model_folder, save_model_folder
from itda_lens.saes import load_itdas
from itda_lens.similarity import compare_layers
from tests.helpers import make_tokens

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model_folder(model, tmp_path_factory.mktemp("m") / "tiny", fp16=False)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("d") / "tokens.pt"
    torch.save(make_tokens(24), path)
    return path


def test_model_folder_round_trip(model, model_dir: Path) -> None:
    back = load_model_folder(model_dir)
    toks = make_tokens(2)
    torch.testing.assert_close(back(toks), model(toks))
    assert back.tokenizer is not None


def test_corrupt_model_folder_names_the_file(model, tmp_path: Path) -> None:
    folder = save_model_folder(model, tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        load_model_folder(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load_model_folder(folder)


def test_build_then_inspect(
    model_dir: Path, data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "itda"
    rc = main(
        [
            "build",
            "--model",
            str(model_dir),
            "--hook",
            HOOK,
            "--data",
            str(data_file),
            "--k",
            "5",
            "--cos-threshold",
            "0.8",
            "--batch-size",
            "8",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    itda = ITDA.load_from_disk(out)
    assert itda.cfg.k == 5 and itda.cfg.metadata.model_name == str(model_dir)
    assert "itda-lens inspect" in capsys.readouterr().out
    assert main(["inspect", str(out), "--top", "3"]) == 0
    text = capsys.readouterr().out
    assert (
        "top 3 atoms by use" in text
        and "[[" in text
        and f"n_atoms: {itda.cfg.d_sae}" in text.replace("  ", " ").replace("  ", " ")
    )


def test_build_two_hooks_and_errors(
    model_dir: Path, data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "two"
    assert (
        main(
            [
                "build",
                "--model",
                str(model_dir),
                "--hook",
                "blocks.0.hook_resid_post",
                "--hook",
                HOOK,
                "--data",
                str(data_file),
                "--k",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert ITDA.load_from_disk(out / HOOK).cfg.metadata.hook_name == HOOK
    capsys.readouterr()
    assert (
        main(
            [
                "build",
                "--model",
                str(model_dir),
                "--hook",
                "blocks.9.hook_resid_post",
                "--data",
                str(data_file),
                "--out",
                str(tmp_path / "bad"),
            ]
        )
        == 2
    )
    assert "no hook point" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "nothing")]) == 2


def test_real_model_path_offline(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`build --model NAME --dataset DIR` as with gpt2 + pile-10k: here a zoo model and a local text dataset."""
    from datasets import Dataset

    from itda_lens import zoo
    from itda_lens.zoo.corpus import documents

    data = tmp_path / "pile-like"
    Dataset.from_dict({"text": [d.text for d in documents("heldout")[:300]]}).save_to_disk(
        str(data)
    )
    for model_spec in (zoo.DEFAULT_MODEL, str(zoo.MODELS_DIR / zoo.DEFAULT_MODEL)):
        out = tmp_path / f"out{len(model_spec)}"
        assert (
            main(
                [
                    "build",
                    "--model",
                    model_spec,
                    "--hook",
                    "blocks.1.hook_resid_post",
                    "--dataset",
                    str(data),
                    "--context-size",
                    "64",
                    "--max-tokens",
                    "4096",
                    "--k",
                    "8",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        itda = ITDA.load_from_disk(out)
        assert itda.cfg.metadata.context_size == 64 and itda.cfg.metadata.dataset_path == str(data)
        assert itda.require_build_record().tokens_seen >= 4096
    capsys.readouterr()
    assert (
        main(
            [
                "build",
                "--model",
                "kjv-nope",
                "--hook",
                "blocks.1.hook_resid_post",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "available" in capsys.readouterr().err


def test_build_defaults_to_the_zoo(tmp_path: Path) -> None:
    out = tmp_path / "default"
    assert (
        main(
            [
                "build",
                "--hook",
                "blocks.2.hook_resid_post",
                "--max-tokens",
                "8192",
                "--k",
                "10",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    itda = ITDA.load_from_disk(out)
    assert (
        itda.cfg.metadata.model_name == "kjv-4l128-s0"
        and itda.cfg.metadata.dataset_path == "kjv:train"
    )
    assert main(["inspect", str(out), "--top", "3"]) == 0


def test_eval_command_on_itda_and_sae_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import json

    from itda_lens import zoo
    from itda_lens.activations import collect_activations
    from itda_lens.training import train_sae

    itda_dir = tmp_path / "itda"
    assert (
        main(
            [
                "build",
                "--hook",
                "blocks.1.hook_resid_post",
                "--max-tokens",
                "4096",
                "--k",
                "8",
                "--out",
                str(itda_dir),
            ]
        )
        == 0
    )
    assert main(["eval", str(itda_dir), "--heldout-seqs", "16", "--no-probe"]) == 0
    result = json.loads((itda_dir / "eval.json").read_text())
    assert result["architecture"] == "itda" and 0 < result["run_evals"]["l0"] <= 8
    model = zoo.load_model()
    cached = collect_activations(model, zoo.load_tokens("train", 64), "blocks.1.hook_resid_post")
    sae = train_sae(
        cached, d_sae=256, k=8, training_tokens=8192, batch_size=512, model_name=zoo.DEFAULT_MODEL
    ).sae
    sae.save_model(tmp_path / "topk")
    assert (
        main(
            [
                "eval",
                str(tmp_path / "topk"),
                "--heldout-seqs",
                "16",
                "--out",
                str(tmp_path / "t.json"),
            ]
        )
        == 0
    )
    topk = json.loads((tmp_path / "t.json").read_text())
    assert topk["architecture"] == "topk" and set(topk["probing"]["mean"]) == {"1", "2", "5", "all"}
    assert "probing (mean over tasks)" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "missing")]) == 2


def test_similarity_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    hooks = ["--hook", "blocks.0.hook_resid_post", "--hook", "blocks.1.hook_resid_post"]
    for seed in (0, 1):
        assert (
            main(
                [
                    "build",
                    "--model",
                    f"kjv-4l128-s{seed}",
                    *hooks,
                    "--max-tokens",
                    "4096",
                    "--k",
                    "8",
                    "--cos-threshold",
                    "0.9",
                    "--batch-size",
                    "8",
                    "--out",
                    str(tmp_path / f"s{seed}"),
                ]
            )
            == 0
        )
    capsys.readouterr()
    png = tmp_path / "sim.png"
    assert main(["similarity", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(png)]) == 0
    text = capsys.readouterr().out
    assert "blocks.1.hook_resid_post" in text and png.stat().st_size > 1000
    assert (
        main(
            [
                "similarity",
                str(tmp_path / "s0"),
                str(tmp_path / "s1"),
                str(tmp_path / "s0"),
                "--out",
                str(png),
            ]
        )
        == 0
    )
    assert "1.000" in capsys.readouterr().out  # a model against itself
    # the probe measures read both models; the CLI's matrix is the API's
    dirs = [str(tmp_path / "s0"), str(tmp_path / "s1")]
    for measure in ("transfer", "mutual-knn"):
        argv = [
            "similarity",
            *dirs,
            "--measure",
            measure,
            "--probe-tokens",
            "256",
            "--out",
            str(png),
        ]
        assert main(argv) == 0
        printed = capsys.readouterr().out.splitlines()
        rows = [line.split() for line in printed if line.startswith("blocks.")]
        got = torch.tensor([[float(v) for v in r[1:]] for r in rows])
        a, b = load_itdas(tmp_path / "s0"), load_itdas(tmp_path / "s1")
        want = compare_layers(
            list(a.values()), list(b.values()), measure,
            model_a=zoo.load_model("kjv-4l128-s0"), model_b=zoo.load_model("kjv-4l128-s1"),
            tokens=zoo.load_tokens("train")[: a["blocks.0.hook_resid_post"].build_record.stream.n_sequences],
            probe_tokens=zoo.load_tokens("heldout"), n_probe=256,
        )  # fmt: skip
        assert torch.allclose(got, want, atol=1e-3), (measure, got, want)
    assert main(["similarity", *dirs, dirs[0], "--measure", "transfer", "--out", str(png)]) == 2
    assert "for more builds only" in capsys.readouterr().err
    assert (
        main(
            [
                "build",
                "--model",
                "kjv-4l128-s1",
                "--hook",
                "blocks.0.hook_resid_post",
                "--data",
                "kjv:heldout",
                "--max-tokens",
                "2048",
                "--out",
                str(tmp_path / "other"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(["similarity", str(tmp_path / "s0"), str(tmp_path / "other"), "--out", str(png)]) == 2
    )
    assert "different token streams" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arch", "flags", "cls"),
    [
        ("pam", ["--k", "4", "--epochs", "2"], "TopKSAE"),
        ("pam", ["--k", "4", "--epochs", "2", "--activation", "abstopk"], "AbsTopKSAE"),
        ("kmeans-pca", ["--k", "4"], "LocalPCASAE"),
        ("kmeans", [], "KMeansSAE"),
        ("topk", ["--k", "4", "--epochs", "2"], "TopKSAE"),
    ],
)
def test_train_command_saves_an_evaluable_sae(
    tmp_path: Path, capsys: pytest.CaptureFixture, arch: str, flags: list[str], cls: str
) -> None:
    import json

    from sae_lens import SAE

    out = tmp_path / arch
    args = ["train", arch, "--hook", "blocks.1.hook_resid_post", "--max-tokens", "2048"]
    args += ["--d-sae", "128", *flags, "--out", str(out)]
    assert main(args) == 0
    assert f"next: itda-lens eval {out}" in capsys.readouterr().out
    sae = SAE.load_from_disk(out)
    assert type(sae).__name__ == cls and sae.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    assert main(["eval", str(out), "--heldout-seqs", "8", "--no-probe"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert 0 < result["run_evals"]["l0"] <= 4 and math.isfinite(
        result["run_evals"]["explained_variance"]
    )
    capsys.readouterr()
    assert main(args) == 2 and "not empty" in capsys.readouterr().err


def test_train_flags_belong_to_the_architecture() -> None:
    with pytest.raises(SystemExit):  # k-means has no epochs: argparse refuses the flag
        main(["train", "kmeans", "--hook", "h", "--out", "o", "--epochs", "2"])


def test_similarity_measure_is_checked_before_any_model_loads(
    capsys: pytest.CaptureFixture,
) -> None:
    from itda_lens.similarity import LAYER_MEASURES

    with pytest.raises(SystemExit):  # argparse refuses it: nothing is read
        main(["similarity", "no-such-dir", "other", "--measure", "cka"])
    err = capsys.readouterr().err
    assert "invalid choice: 'cka'" in err and all(m in err for m in LAYER_MEASURES)


def test_train_command_refuses_unknown_hooks(tmp_path: Path) -> None:
    args = ["train", "kmeans", "--hook", "blocks.9.hook_resid_post", "--out", str(tmp_path / "x")]
    assert main(args) != 0


def test_build_help_lists_exactly_the_config_fields(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import re
    from dataclasses import fields

    from itda_lens.builder import BuildConfig
    from itda_lens.config import BuildCommand

    monkeypatch.setenv("COLUMNS", "400")  # argparse would wrap flags in the prose at their dashes
    with pytest.raises(SystemExit) as exit_:
        main(["build", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    options = text.split("options:", 1)[1]
    listed = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", options))
    flag = {f"--{f.name.replace('_', '-')}" for f in fields(BuildConfig)}
    own = {f"--{f.name.replace('_', '-')}" for f in fields(BuildCommand)}
    extras = {"--help", "--dataset", "--noexclude-special-tokens", "--noresume"}  # aliases
    extras |= {"--noskip-connection", "--norefit-decoder"}
    assert flag <= listed, f"BuildConfig fields missing from --help: {flag - listed}"
    assert listed - extras == flag | own, (
        f"flags that are not config fields: {listed - extras - flag - own}"
    )


def test_every_build_flag_reaches_the_builder(monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import fields

    import itda_lens.cli as cli
    from itda_lens.builder import BuildConfig

    changed = {
        "k": 7,
        "cos_threshold": 0.7,
        "target_atoms": 90,
        "target_sample_tokens": 5000,
        "target_tolerance": 0.05,
        "refine": "energy",
        "refine_factor": 2.0,
        "max_atoms": 500,
        "encoder": "omp",
        "add_rule": "batch",
        "batch_size": 3,
        "context_size": 16,
        "max_tokens": 777,
        "patience_tokens": 99,
        "exclude_special_tokens": False,
        "dtype": "float16",
        "decision_dtype": "float32",
        "device": "cpu",
        "checkpoint_every": 9,
    }
    assert set(changed) == {f.name for f in fields(BuildConfig)}, "cover every field"
    seen = {}

    def fake_build(model, tokens, hooks, cfg, **kw):
        seen["cfg"] = cfg
        raise ValueError("stop here")

    monkeypatch.setattr(cli, "build_itda", fake_build)
    argv = ["build", "--hook", HOOK, "--out", "unused"]
    for name, value in changed.items():
        flag = "--" + name.replace("_", "-")
        argv += [flag, str(value).lower() if isinstance(value, bool) else str(value)]
    assert main(argv) == 2
    assert seen["cfg"] == BuildConfig(**changed)


def test_patience_flag_stops_a_build_early(tmp_path: Path) -> None:
    out = tmp_path / "p"
    args = ["build", "--hook", "blocks.1.hook_resid_post", "--k", "8", "--out", str(out)]
    assert main([*args, "--max-tokens", "20000", "--patience-tokens", "300"]) == 0
    record = ITDA.load_from_disk(out).require_build_record()
    assert record.stop_reason == "converged" and record.tokens_seen < 20000


def test_cli_works_without_scikit_learn(tmp_path: Path) -> None:
    import subprocess
    import sys

    blocker = tmp_path / "sklearn"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('scikit-learn is not installed')\n")
    code = (
        "import sys\n"
        "from itda_lens.cli import main\n"
        "assert 'sklearn' not in sys.modules\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "try:\n    main(['build', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "print('ok')\n"
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_train_init_from_an_itda_folder(
    model_dir: Path, data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`itda-lens train topk --init-from DIR` on a tiny build: the SAE is as wide as the ITDA's
    atoms (tied-fit fills one latent per atom), records its start, and loads as a sae_lens SAE;
    the other trainers, a wrong hook and a rule without a folder are refused."""
    from sae_lens import SAE

    itda_dir = tmp_path / "itda"
    common = ["--model", str(model_dir), "--data", str(data_file), "--hook", HOOK]
    assert (
        main(["build", *common, "--k", "4", "--cos-threshold", "0.9", "--out", str(itda_dir)]) == 0
    )
    n_atoms = ITDA.load_from_disk(itda_dir).cfg.d_sae
    out = tmp_path / "sae"
    train = ["train", "topk", *common, "--k", "4", "--epochs", "1"]
    assert main([*train, "--init-from", str(itda_dir), "--out", str(out)]) == 0
    assert f"started from {itda_dir} by 'tied-fit'" in capsys.readouterr().out
    sae = SAE.load_from_disk(out)
    init = sae.cfg.metadata.init
    assert type(sae).__name__ == "TopKSAE" and sae.cfg.d_sae == n_atoms
    assert (
        init["from"] == str(itda_dir) and init["n_atoms"] == n_atoms and init["rule"] == "tied-fit"
    )
    assert init["itda_k"] == 4 and init["itda_hook"] == HOOK
    for argv, message in [
        (["train", "kmeans", *common, "--init-from", str(itda_dir)], "own initialisation"),
        (
            [
                "train",
                "topk",
                *common[:-1],
                "blocks.0.hook_resid_post",
                "--init-from",
                str(itda_dir),
            ],
            "build the ITDA at the training hook",
        ),
        (["train", "topk", *common, "--init-rule", "pairs"], "--init-rule needs --init-from"),
        (["train", "topk", *common, "--init-from", str(tmp_path / "none")], "no SAE folder"),
    ]:
        assert main([*argv, "--out", str(tmp_path / "refused")]) == 2
        assert message in capsys.readouterr().err


def test_diff_command_shows_the_planted_trigger(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The issue's acceptance run, with every default: the fine-tune's card names its held-out
    text, every layer is diffed, and the top fine-tune-side contexts are the planted tokens."""
    from itda_lens import zoo

    out = tmp_path / "diff"
    assert main(["diff", "kjv-4l128-s0", "kjv-4l128-s0-planted", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "kjv:heldout:planted" in printed and "next: itda-lens dashboard" in printed
    report = (out / "report.md").read_text()
    summary = json.loads((out / "diff.json").read_text())
    marks = zoo.load_token_marks("heldout", variant="planted")
    assert [layer["hook"] for layer in summary["layers"]] == [
        f"blocks.{i}.hook_resid_post" for i in range(4)
    ]
    for layer in summary["layers"]:
        top = layer["top_contexts"]["fine-tune"]
        assert len(top) == 10 and 0 < layer["jaccard"] < 1
        hits = [c for c in top if marks[c["sequence"], c["position"]]]
        assert len(hits) >= 8, (layer["hook"], [c["context"] for c in top])
        assert all(_md_cell(c["context"]) in report for c in top)
    assert report.count("unicorn") >= 20
    for png in ("jaccard.png", "scores.png"):
        assert (out / png).stat().st_size > 1000
    itda = ITDA.load_from_disk(out / "itdas" / "fine-tune" / "blocks.2.hook_resid_post")
    assert itda.cfg.metadata.model_name == "kjv-4l128-s0-planted"
    # a second run into the same folder needs --overwrite
    assert main(["diff", "kjv-4l128-s0", "kjv-4l128-s0-planted", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def _md_cell(context: str) -> str:
    return context.replace("|", "\\|").replace("[[", "**").replace("]]", "**")


def test_diff_command_refuses_models_that_do_not_line_up(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = str(tmp_path / "d")
    assert main(["diff", "kjv-4l128-s0", "kjv-6l160-s0", "--out", out]) == 2
    assert "activation widths differ" in capsys.readouterr().err
    assert main(["diff", "kjv-4l128-s0", "kjv-4l128-bpe4096-s0", "--out", out]) == 2
    assert "different tokenizers" in capsys.readouterr().err
    assert main(["diff", "kjv-4l128-s0", "kjv-4l128-s0-planted", "--out", out,
                 "--target-atoms", "100"]) == 2  # fmt: skip
    assert "one cos_threshold" in capsys.readouterr().err


def test_diff_command_reuses_a_previous_diffs_dictionaries(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    args = ["diff", "kjv-4l128-s0", "kjv-4l128-s0-planted", "--hook", HOOK, "--seqs", "24"]
    assert main([*args, "--out", str(first)]) == 0
    assert main([*args, "--out", str(second), "--itdas", str(first / "itdas")]) == 0
    a, b = (json.loads((d / "diff.json").read_text())["layers"] for d in (first, second))
    assert a == b  # the same dictionaries and tokens give the same report
    capsys.readouterr()
    # other tokens than the dictionaries were built on: refused, not silently mislabelled
    assert (
        main([*args[:-1], "32", "--out", str(tmp_path / "c"), "--itdas", str(first / "itdas")]) == 2
    )
    assert "another token stream" in capsys.readouterr().err
    # --overwrite replaces the previous run's dictionaries (no stale hook folders left behind)
    other = "blocks.2.hook_resid_post"
    argv = ["diff", "kjv-4l128-s0", "kjv-4l128-s0-planted", "--hook", other, "--seqs", "24"]
    assert main([*argv, "--out", str(first), "--overwrite"]) == 0
    assert sorted(p.name for p in (first / "itdas" / "base").iterdir()) == [other]


def test_import_and_export_reference(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import yaml

    from tests.saes.test_reference import META, write_like_reference

    ref = write_like_reference(tmp_path / "ref")
    out = tmp_path / "itda"
    assert main(["import-reference", str(ref), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "imported 50 atoms" in text and "--tokens" in text and "next: itda-lens inspect" in text
    itda = SAE.load_from_disk(out)
    assert isinstance(itda, ITDA) and itda.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    assert torch.equal(itda.atom_labels, torch.load(ref / "atom_indices.pt"))
    # with the stream the reference read, each atom's token is known
    stream = torch.randint(0, 100, (1280, 16), generator=torch.Generator().manual_seed(0))
    torch.save(stream, tmp_path / "stream.pt")
    assert (
        main(
            [
                "import-reference",
                str(ref),
                "--out",
                str(out),
                "--tokens",
                str(tmp_path / "stream.pt"),
                "--overwrite",
            ]
        )
        == 0
    )
    labels = itda.atom_labels
    assert torch.equal(SAE.load_from_disk(out).atom_token_ids, stream[labels[:, 0], labels[:, 1]])
    back = tmp_path / "back"
    assert main(["export-reference", str(out), "--out", str(back)]) == 0
    assert yaml.safe_load((back / "metadata.yaml").read_text()) == META
    assert torch.equal(torch.load(back / "atoms.pt"), torch.load(ref / "atoms.pt"))
    capsys.readouterr()
    (ref / "atoms.pt").unlink()
    assert main(["import-reference", str(ref), "--out", str(tmp_path / "x")]) == 2
    assert "atoms.pt is missing" in capsys.readouterr().err
    assert main(["import-reference", str(back), "--out", str(out)]) == 2  # not empty
    assert "--overwrite" in capsys.readouterr().err


TC_IN, TC_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"


def test_build_transcoder_then_inspect(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`build --hook IN --hook-out OUT` saves an ITDA transcoder that sae_lens loads; `inspect`
    shows each atom's token in context and the tokens its output atom promotes."""
    from itda_lens import ITDATranscoder

    out = tmp_path / "tc"
    argv = ["build", "--hook", TC_IN, "--hook-out", TC_OUT, "--max-tokens", "2048"]
    assert main([*argv, "--k", "16", "--cos-threshold", "0.9", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    tc = SAE.load_from_disk(out)
    assert type(tc) is ITDATranscoder
    meta, record = tc.cfg.metadata, tc.build_record
    assert (meta.hook_name, meta.hook_name_out, meta.model_name) == (
        TC_IN,
        TC_OUT,
        zoo.DEFAULT_MODEL,
    )
    assert meta.dataset_path == "kjv:train" and tc.cfg.k == 16
    assert record is not None and (record.judge, record.tokens_seen) == ("output", 2048)
    assert f"saved ITDA transcoder {TC_IN} -> {TC_OUT}: {tc.cfg.d_sae} atoms" in text
    assert f"next: itda-lens inspect {out}" in text
    assert main(["inspect", str(out), "--top", "3", "--usage-seqs", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split() == ["hook_name_out:", TC_OUT] for line in lines)
    atoms = [i for i, line in enumerate(lines) if line.lstrip().startswith("atom ")]
    assert len(atoms) == 3
    model = zoo.load_model()
    W = model.W_U.detach() * model.ln_final.w.detach()[:, None]
    for i in atoms:
        atom = int(lines[i].split()[1])
        assert "[[" in lines[i]
        top = (tc.W_dec[atom] @ W).topk(5).indices.tolist()
        want = " ".join(repr(model.tokenizer.decode([t])) for t in top)
        assert lines[i + 1].strip() == f"output promotes {want}"
    capsys.readouterr()  # loading the model above printed a line
    assert main(["inspect", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["architecture"] == "itda_transcoder" and summary["d_out"] == 128
    assert summary["builder"]["judge"] == "output"


def test_transcoder_flags_reach_the_builder(monkeypatch: pytest.MonkeyPatch) -> None:
    import itda_lens.cli as cli
    from itda_lens.builder import BuildConfig

    seen = {}

    def fake_build(model, tokens, hook_in, hook_out, cfg, **kw):
        seen.update(hooks=(hook_in, hook_out), cfg=cfg, **kw)
        raise ValueError("stop here")

    monkeypatch.setattr(cli, "build_itda_transcoder", fake_build)
    argv = ["build", "--hook", TC_IN, "--hook-out", TC_OUT, "--judge", "input", "--k", "5"]
    assert main([*argv, "--skip-connection", "--refit-decoder", "--out", "unused"]) == 2
    assert seen["hooks"] == (TC_IN, TC_OUT) and seen["judge"] == "input"
    assert seen["skip_connection"] is True and seen["refit_decoder"] is True
    assert seen["cfg"] == BuildConfig(k=5) and seen["dataset_path"] == "kjv:train"


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--hook-out", TC_OUT], "exactly one --hook .*got 0"),
        (
            ["--hook", TC_IN, "--hook", "blocks.0.ln2.hook_normalized", "--hook-out", TC_OUT],
            "got 2",
        ),
        (["--hook", TC_IN, "--hook-out", TC_OUT, "--resume"], "keeps none"),
        (["--hook", TC_IN, "--judge", "input"], "--judge is for ITDA transcoders"),
        (["--hook", TC_IN, "--skip-connection"], "--skip-connection is for ITDA transcoders"),
        (["--hook", TC_IN, "--hook-out", TC_IN], "maps one hook to another"),
        (
            ["--hook", TC_IN, "--hook-out", TC_OUT, "--target-atoms", "64", "--refine", "energy"],
            "does not support",
        ),
        (["--hook", TC_IN, "--hook-out", "blocks.1.hook_mlp_outt"], "no hook point"),
    ],
)
def test_transcoder_build_refuses_bad_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture, flags: list[str], match: str
) -> None:
    assert main(["build", *flags, "--max-tokens", "256", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "itda-lens build: error: " in err and re.search(match, err), err
    assert not (tmp_path / "x" / "cfg.json").exists()


def test_inspect_refuses_other_saes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from sae_lens import TopKSAE, TopKSAEConfig

    TopKSAE(TopKSAEConfig(d_in=8, d_sae=16, k=2)).save_model(tmp_path / "topk")
    assert main(["inspect", str(tmp_path / "topk")]) == 2
    err = capsys.readouterr().err
    assert "holds a 'topk' SAE" in err and "itda-lens dashboard" in err


@pytest.fixture(scope="module")
def tc_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ITDA transcoder of the zoo's default model's layer-1 MLP, built by the CLI."""
    out = tmp_path_factory.mktemp("tc") / "tc"
    argv = ["build", "--hook", TC_IN, "--hook-out", TC_OUT, "--max-tokens", "1024", "--k", "8"]
    assert main([*argv, "--cos-threshold", "0.8", "--out", str(out)]) == 0
    return out


def test_eval_command_scores_a_transcoder_spliced_in(
    tc_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`eval` on a transcoder folder reports transcoder_scores (not run_evals at one hook), the
    same numbers as the library call, printed and saved; probing reads its codes at the input
    hook; --core is refused with what to do instead."""
    from itda_lens import ITDATranscoder
    from itda_lens.evals import transcoder_scores

    capsys.readouterr()
    out = tmp_path / "eval.json"
    assert main(["eval", str(tc_dir), "--heldout-seqs", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["architecture"] == "itda_transcoder" and "run_evals" not in result
    assert (result["hook_name"], result["hook_name_out"]) == (TC_IN, TC_OUT)
    tc = ITDATranscoder.load_from_disk(tc_dir)
    heldout = zoo.load_tokens(
        "heldout", 8, 128, tokenizer=zoo.model_card(zoo.DEFAULT_MODEL)["tokenizer"]
    )
    assert result["heldout_tokens"] == heldout.numel()
    want = transcoder_scores(tc, zoo.load_model(), heldout)
    got = result["transcoder_scores"]
    assert set(got) == set(want) >= {"ce_loss_score", "ce_loss_with_error_term", "fvu", "l0"}
    assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert 0 < got["ce_loss_score"] <= 1 and 0 < got["l0"] <= 8
    ce = f"CE loss clean {want['ce_loss_without_sae']:.4f}, spliced {want['ce_loss_with_sae']:.4f}"
    assert f"transcoder {TC_IN} -> {TC_OUT} spliced in" in printed and ce in printed
    assert f"CE loss recovered {want['ce_loss_score']:.3f}, output FVU {want['fvu']:.3f}" in printed
    assert set(result["probing"]["mean"]) == {"1", "2", "5", "all"}
    assert "probing (mean over tasks)" in printed and f"wrote {out}" in printed
    # misuse: SAEBench core scores one hook's reconstruction
    capsys.readouterr()
    assert main(["eval", str(tc_dir), "--core", "--out", str(tmp_path / "core.json")]) == 2
    err = capsys.readouterr().err
    assert "holds a transcoder" in err and "without --core" in err
    assert not (tmp_path / "core.json").exists()
    assert main(["eval", str(tc_dir), "--model", "kjv-nope"]) == 2
    assert "not a zoo model" in capsys.readouterr().err


def test_dashboard_command_on_a_transcoder(
    tc_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`dashboard` on a transcoder folder reads its input hook, names both hooks, shows each
    atom's provenance from its build stream; a damaged folder gets the ITDA folder check's
    error."""
    import shutil

    from itda_lens import ITDATranscoder

    capsys.readouterr()
    site = tmp_path / "dash"
    assert main(["dashboard", str(tc_dir), "--seqs", "4", "--out", str(site)]) == 0
    printed = capsys.readouterr().out
    assert f"latents read at {TC_IN}, output atoms at {TC_OUT}" in printed
    text = (site / "data" / "index.js").read_text()
    meta = json.loads(text[len("DASH.setIndex(") : -2])["meta"]
    assert (meta["hook"], meta["hook_out"], meta["is_transcoder"]) == (TC_IN, TC_OUT, True)
    tc = ITDATranscoder.load_from_disk(tc_dir)
    shard = (site / "data" / "shard_00000.js").read_text()
    items = json.loads(shard[len("DASH.addShard(0,") : -2])
    for a, item in enumerate(items):  # provenance: the build stream (kjv:train) replayed
        assert [item["src"]["s"], item["src"]["p"]] == tc.atom_labels[a].tolist()
        assert item["src"]["t"][item["src"]["c"]] == int(tc.atom_token_ids[a])
        assert len(item["up"]) == 10
    damaged = tmp_path / "damaged"
    shutil.copytree(tc_dir, damaged)
    weights = damaged / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert main(["dashboard", str(damaged), "--seqs", "4"]) == 2
    assert re.search(r"corrupt|truncated|checksum", capsys.readouterr().err)

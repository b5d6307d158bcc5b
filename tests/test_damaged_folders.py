"""Damaged ITDA save folders: each damage, loaded through ``sae_lens.SAE.load_from_disk`` and
``ITDA.load_from_disk``, gives its expected clear error, or loads the very dictionary that was
saved (never a different one).

What is detectable, and where:

* Format 2 folders (``itda_format_version: 2``) record the weights' sha256 in cfg.json, so any
  changed byte of any tensor is refused by both loaders, ahead of the finer checks (unit-norm atoms,
  zero ``b_dec``). ``SAE.load_from_disk`` sees the tensors only after sae_lens cast them to the
  cfg dtype: it verifies by casting back, which is exact unless the load dtype is narrower than the
  saved one (then only ``ITDA.load_from_disk``, which reads the file bytes, can verify).
* A tensor rewritten in another dtype is refused by ``ITDA.load_from_disk`` (stored dtypes are
  checked); through ``SAE.load_from_disk`` it is refused when the values changed, and loads the
  identical dictionary when they did not (float32 widened to float64).
* ``cfg.json`` is not checksummed: users edit it (k, hook_name, metadata). What contradicts the
  weights (d_sae, d_in) or is invalid (k < 1, an unknown encoder) is refused; a valid edit such as
  a k above d_sae (pursuit may pick an atom twice) or a dtype (the load dtype) is honoured.
* Truncated, missing or unparsable files: ``SAE.load_from_disk`` fails inside sae_lens before any
  itda_lens code runs (``SafetensorError`` / ``FileNotFoundError``); ``ITDA.load_from_disk``
  checks the folder first and names it.
* Format 1 folders (no version, no checksum) keep loading; there a bit flip is caught only when it
  breaks unit norm, a zero ``b_dec`` or the save id (a low mantissa bit or a provenance byte is not).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from json import JSONDecodeError
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE, TopKSAE, TopKSAEConfig
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from itda_lens import ITDA

WEIGHTS, CFG = "sae_weights.safetensors", "cfg.json"
N, D = 20, 16
SAVE_KEYS = ("itda_format_version", "itda_weights_sha256", "itda_weights_dtype")
MIXED = "different saves"
CHECKSUM = "does not match the sha256 recorded in cfg.json"
UPGRADE = r"saved by a newer itda_lens \(ITDA format version 3.*upgrade itda_lens"


def make_itda() -> ITDA:
    g = torch.Generator().manual_seed(0)
    return ITDA.from_atoms(
        torch.randn(N, D, generator=g),
        k=3,
        labels=torch.randint(0, 1000, (N, 2), generator=g),
        token_ids=torch.randint(0, 5000, (N,), generator=g),
        hook_name="blocks.0.hook_resid_post",
    )


# --- damage ---------------------------------------------------------------------------------


def edit_cfg(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        cfg = json.loads((folder / CFG).read_text())
        edit(cfg)
        (folder / CFG).write_text(json.dumps(cfg))

    return damage


def edit_weights(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        tensors = load_file(folder / WEIGHTS)
        edit(tensors)
        save_file(tensors, folder / WEIGHTS)

    return damage


def flip(key: str, byte: int, bit: int) -> Callable[[Path], None]:
    """Flip one bit inside ``key``'s data (the header still parses)."""

    def damage(folder: Path) -> None:
        data = bytearray((folder / WEIGHTS).read_bytes())
        (n,) = struct.unpack("<Q", data[:8])
        start = 8 + n + json.loads(data[8 : 8 + n])[key]["data_offsets"][0]
        data[start + byte] ^= 1 << bit
        (folder / WEIGHTS).write_bytes(bytes(data))

    return damage


def truncate(n_bytes: int) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        data = (folder / WEIGHTS).read_bytes()
        (folder / WEIGHTS).write_bytes(data[:n_bytes])

    return damage


def remove(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).unlink()


def set_cfg(key: str, value: Any) -> Callable[[Path], None]:
    return edit_cfg(lambda cfg: cfg.__setitem__(key, value))


def set_meta(key: str, value: Any) -> Callable[[Path], None]:
    return edit_cfg(lambda cfg: cfg["metadata"].__setitem__(key, value))


def as_format_1(folder: Path) -> None:
    """What itda_lens wrote before format versions: a save id, no checksum."""
    edit_cfg(lambda cfg: [cfg["metadata"].pop(k) for k in SAVE_KEYS])(folder)


def without_save_id(folder: Path) -> None:
    """What itda_lens wrote before save ids."""
    as_format_1(folder)
    edit_cfg(lambda cfg: cfg["metadata"].pop("itda_save_id"))(folder)
    edit_weights(lambda t: t.pop("itda_save_id"))(folder)


def both(*damages: Callable[[Path], None]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        for d in damages:
            d(folder)

    return damage


def topk_weights(folder: Path) -> None:
    """An ITDA cfg.json with a topk SAE's weights of the same width."""
    TopKSAE(TopKSAEConfig(d_in=D, d_sae=N, k=3)).save_model(folder.parent / "topk")
    (folder / WEIGHTS).write_bytes((folder.parent / "topk" / WEIGHTS).read_bytes())


def topk_folder(folder: Path) -> None:
    """A whole sae_lens topk SAE folder in place of the ITDA."""
    TopKSAE(TopKSAEConfig(d_in=D, d_sae=N, k=3)).save_model(folder)


def set_dtype(key: str, dtype: torch.dtype) -> Callable[[Path], None]:
    return edit_weights(lambda t: t.__setitem__(key, t[key].to(dtype)))


def unpack_labels(folder: Path) -> None:
    """atom_labels written as int64 [d_sae, 2] instead of the saved uint8 bytes [d_sae, 2, 8]."""
    edit_weights(lambda t: t.__setitem__("atom_labels", make_itda().atom_labels))(folder)


# --- expectations ---------------------------------------------------------------------------

SAME = "loads the saved dictionary"
FLOAT16 = "loads the saved dictionary in float16"
K50 = "loads the saved dictionary with k=50"
TOPK = "loads as the topk SAE it is"

Expect = tuple[type[BaseException], str] | str

CASES = [
    # (damage, SAE.load_from_disk, ITDA.load_from_disk)
    pytest.param(
        truncate(-100),
        (SafetensorError, "incomplete metadata, file not fully covered"),
        (ValueError, r"corrupt or truncated weights file .*sae_weights\.safetensors"),
        id="weights-truncated",
    ),
    pytest.param(
        truncate(0),
        (SafetensorError, "header too small"),
        (ValueError, "corrupt or truncated weights file"),
        id="weights-empty",
    ),
    pytest.param(
        flip("W_dec", 40, 0),
        (ValueError, CHECKSUM),
        (ValueError, CHECKSUM),
        id="bitflip-W_dec-lowest-mantissa-bit",
    ),
    pytest.param(
        flip("W_dec", 3, 7), (ValueError, CHECKSUM), (ValueError, CHECKSUM), id="bitflip-W_dec-sign"
    ),
    pytest.param(
        flip("b_dec", 3, 6), (ValueError, CHECKSUM), (ValueError, CHECKSUM), id="bitflip-b_dec"
    ),
    pytest.param(
        flip("atom_labels", 16, 0),
        (ValueError, CHECKSUM),
        (ValueError, CHECKSUM),
        id="bitflip-atom_labels",
    ),
    pytest.param(
        flip("atom_token_ids", 8, 3),
        (ValueError, CHECKSUM),
        (ValueError, CHECKSUM),
        id="bitflip-atom_token_ids",
    ),
    pytest.param(
        flip("itda_save_id", 0, 0), (ValueError, MIXED), (ValueError, MIXED), id="bitflip-save-id"
    ),
    pytest.param(lambda folder: None, SAME, SAME, id="undamaged"),
    pytest.param(
        remove(WEIGHTS),
        (FileNotFoundError, r"sae_weights\.safetensors"),
        (ValueError, r"incomplete: sae_weights\.safetensors is missing"),
        id="weights-missing",
    ),
    pytest.param(
        remove(CFG),
        (FileNotFoundError, r"cfg\.json"),
        (ValueError, r"not an SAE folder: it has no cfg\.json"),
        id="cfg-missing",
    ),
    pytest.param(
        lambda folder: (folder / CFG).write_text('{"d_in": 16, "d_sae'),
        (JSONDecodeError, "Unterminated string"),
        (ValueError, r"corrupt .*cfg\.json"),
        id="cfg-not-json",
    ),
    pytest.param(
        edit_weights(lambda t: t.__setitem__("extra", torch.zeros(3))),
        (ValueError, r"unexpected tensors \['extra'\]"),
        (ValueError, r"unexpected tensors \['extra'\]"),
        id="extra-tensor",
    ),
    pytest.param(
        edit_weights(lambda t: t.pop("atom_token_ids")),
        (ValueError, r"lacks \['atom_token_ids'\]"),
        (ValueError, r"lacks \['atom_token_ids'\]"),
        id="missing-tensor",
    ),
    pytest.param(
        set_dtype("W_dec", torch.float16),
        (ValueError, CHECKSUM),
        (ValueError, "stores W_dec as float16, but this ITDA was saved with W_dec as float32"),
        id="dtype-W_dec-narrowed",
    ),
    pytest.param(
        set_dtype("W_dec", torch.float64),
        SAME,  # sae_lens casts to float32 before itda_lens sees it: the values are the saved ones
        (ValueError, "stores W_dec as float64"),
        id="dtype-W_dec-widened",
    ),
    pytest.param(
        unpack_labels,
        (ValueError, r"atom_labels has shape \(20, 2\) .* needs \(20, 2, 8\)"),
        (ValueError, "stores atom_labels as int64"),
        id="dtype-atom_labels-int64",
    ),
    pytest.param(
        set_cfg("d_sae", N + 1),
        (ValueError, r"W_dec has shape \(20, 16\) but cfg.json says d_sae=21"),
        (ValueError, r"W_dec has shape \(20, 16\) but cfg.json says d_sae=21"),
        id="cfg-d_sae",
    ),
    pytest.param(
        set_cfg("d_in", D + 1),
        (ValueError, "cfg.json says d_sae=20, d_in=17"),
        (ValueError, "cfg.json says d_sae=20, d_in=17"),
        id="cfg-d_in",
    ),
    pytest.param(
        set_cfg("k", 0),
        (ValueError, "k must be an integer >= 1, got 0"),
        (ValueError, "k must be an integer >= 1, got 0"),
        id="cfg-k-zero",
    ),
    pytest.param(set_cfg("k", 50), K50, K50, id="cfg-k-above-d_sae-is-valid"),
    pytest.param(
        set_cfg("encoder", "lasso"),
        (ValueError, "encoder must be one of 'mp', 'omp', 'gp'"),
        (ValueError, "encoder must be one of 'mp', 'omp', 'gp'"),
        id="cfg-encoder",
    ),
    pytest.param(set_cfg("dtype", "float16"), FLOAT16, FLOAT16, id="cfg-dtype-is-the-load-dtype"),
    pytest.param(
        topk_folder,
        TOPK,
        (ValueError, r"is not an ITDA: its cfg.json has architecture 'topk'"),
        id="foreign-topk-folder",
    ),
    pytest.param(
        topk_weights,
        (ValueError, r"lacks \['atom_labels', 'atom_token_ids'\] \(it holds \['W_enc', 'b_enc'\]"),
        (ValueError, r"lacks \['atom_labels', 'atom_token_ids'\] \(it holds \['W_enc', 'b_enc'\]"),
        id="foreign-topk-weights",
    ),
    pytest.param(
        set_cfg("architecture", "topk"),
        (RuntimeError, "Missing key"),  # sae_lens's own TopKSAE refuses the ITDA weights
        (ValueError, "is not an ITDA"),
        id="cfg-claims-topk",
    ),
    pytest.param(
        set_meta("itda_format_version", 3),
        (ValueError, UPGRADE),
        (ValueError, UPGRADE),
        id="newer-format",
    ),
    pytest.param(
        set_meta("itda_format_version", "two"),
        (ValueError, "invalid itda_format_version 'two'"),
        (ValueError, "invalid itda_format_version 'two'"),
        id="invalid-format-version",
    ),
    pytest.param(as_format_1, SAME, SAME, id="format-1-loads"),
    pytest.param(without_save_id, SAME, SAME, id="format-1-without-save-id-loads"),
    pytest.param(
        both(as_format_1, flip("W_dec", 3, 6)),
        (ValueError, "not unit-norm"),
        (ValueError, "not unit-norm"),
        id="format-1-bitflip-W_dec-exponent",
    ),
    pytest.param(
        both(as_format_1, flip("b_dec", 3, 6)),
        (ValueError, "b_dec must be zero"),
        (ValueError, "b_dec must be zero"),
        id="format-1-bitflip-b_dec",
    ),
    pytest.param(
        both(as_format_1, flip("itda_save_id", 0, 0)),
        (ValueError, MIXED),
        (ValueError, MIXED),
        id="format-1-bitflip-save-id",
    ),
    pytest.param(
        both(as_format_1, edit_cfg(lambda cfg: cfg["metadata"].pop("itda_save_id"))),
        (ValueError, MIXED),  # weights with an id and a cfg.json without: an interrupted save
        (ValueError, MIXED),
        id="format-1-cfg-without-save-id",
    ),
]


@pytest.fixture(scope="module")
def saved() -> ITDA:
    return make_itda()


@pytest.mark.parametrize(("damage", "via_sae_lens", "via_itda"), CASES)
def test_damaged_folder(
    damage: Callable[[Path], None],
    via_sae_lens: Expect,
    via_itda: Expect,
    saved: ITDA,
    tmp_path: Path,
) -> None:
    folder = tmp_path / "itda"
    saved.save_model(folder)
    damage(folder)
    for load, expect in ((SAE.load_from_disk, via_sae_lens), (ITDA.load_from_disk, via_itda)):
        if isinstance(expect, tuple):
            err, match = expect
            with pytest.raises(err, match=match) as raised:
                load(folder)
            assert type(raised.value) not in (KeyError, struct.error)
            continue
        got = load(folder)
        if expect == TOPK:
            assert type(got) is TopKSAE
            continue
        assert type(got) is ITDA
        want = saved.W_dec.half() if expect == FLOAT16 else saved.W_dec
        assert torch.equal(got.W_dec, want), f"{load.__qualname__} loaded other atoms"
        assert torch.equal(got.atom_labels, saved.atom_labels)
        assert torch.equal(got.atom_token_ids, saved.atom_token_ids)
        assert got.cfg.k == (50 if expect == K50 else saved.cfg.k)


def test_nonexistent_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no SAE folder"):
        ITDA.load_from_disk(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match=r"cfg\.json"):
        SAE.load_from_disk(tmp_path / "nothing")

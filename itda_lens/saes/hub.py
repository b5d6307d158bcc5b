"""Loading ITDAs and ITDA transcoders from a Hugging Face repository the sae_lens way.

:func:`itda_hub_loader` is a sae_lens ``PretrainedSaeHuggingfaceLoader``: pass it as
``converter=`` to ``SAE.from_pretrained(repo_id, folder)`` and the folder may hold either a
sae_lens save (``cfg.json`` + ``sae_weights.safetensors``: an ITDA, an ITDA transcoder, or any
registered architecture; the first two are checked byte for byte as their ``load_from_disk``
does) or the reference code's three files (``atoms.pt``, ``atom_indices.pt``,
``metadata.yaml``). Files come through ``huggingface_hub`` (its cache, ``HF_HUB_OFFLINE``,
``force_download``), or straight from disk when ``repo_id`` is a local folder laid out like the
repository. :func:`load_itda_from_hub` is the one-liner.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.loading.pretrained_sae_loaders import sae_lens_disk_loader

from itda_lens.saes.itda import ITDA, ITDABase, check_itda_folder
from itda_lens.saes.itda_transcoder import ITDATranscoder
from itda_lens.saes.reference import ATOMS_FILE, LABELS_FILE, METADATA_FILE

#: the architectures whose save folders are checked (format, save id, checksum) before loading
CHECKED: dict[str, type[ITDABase[Any]]] = {
    cls.CONFIG.architecture(): cls for cls in (ITDA, ITDATranscoder)
}


def _fetch(repo_id: str, folder_name: str, filename: str, force_download: bool) -> Path | None:
    """The local path of ``folder_name/filename`` in the repository, or None if it has none."""
    local = Path(repo_id)
    if local.is_dir():
        path = local / folder_name / filename
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    name = f"{folder_name.strip('/')}/{filename}" if folder_name.strip("/") else filename
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=name, force_download=force_download))
    except EntryNotFoundError:  # also the offline cache's miss (LocalEntryNotFoundError)
        return None


def itda_hub_loader(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], torch.Tensor | None]:
    """sae_lens loader (module doc): ``(cfg dict, state dict, None)`` for ``folder_name`` of
    ``repo_id`` (a hub repository or a local folder laid out like one)."""
    overrides = dict(cfg_overrides or {})
    cfg_path = _fetch(repo_id, folder_name, SAE_CFG_FILENAME, force_download)
    if cfg_path is not None:
        weights = _fetch(repo_id, folder_name, SAE_WEIGHTS_FILENAME, force_download)
        if weights is None or weights.parent != cfg_path.parent:
            raise FileNotFoundError(
                f"{repo_id}/{folder_name} has {SAE_CFG_FILENAME} but no {SAE_WEIGHTS_FILENAME}"
            )
        folder = cfg_path.parent
        cls = CHECKED.get(_architecture(cfg_path) or "")
        if cls is not None:
            check_itda_folder(folder, cls)  # the bytes against cfg.json, with clear errors
        cfg_dict, state = sae_lens_disk_loader(folder, device, cfg_overrides=overrides or None)
        return cfg_dict, state, None
    meta = _fetch(repo_id, folder_name, METADATA_FILE, force_download)
    if meta is None:
        raise FileNotFoundError(
            f"{repo_id}/{folder_name or '.'} holds neither a sae_lens folder ({SAE_CFG_FILENAME}) "
            f"nor a reference dictionary ({METADATA_FILE}); with HF_HUB_OFFLINE=1 the repository "
            "must already be in the Hugging Face cache"
        )
    for name in (ATOMS_FILE, LABELS_FILE):
        if _fetch(repo_id, folder_name, name, force_download) is None:
            raise FileNotFoundError(f"{repo_id}/{folder_name} has {METADATA_FILE} but no {name}")
    itda = ITDA.from_reference(meta.parent, device=device, dtype=overrides.get("dtype"))
    cfg_dict = itda.cfg.to_dict() | overrides
    state = {key: value.detach().clone() for key, value in itda.state_dict().items()}
    itda.process_state_dict_for_saving(state)
    return cfg_dict, state, None


def _architecture(cfg_path: Path) -> str | None:
    import json

    try:
        return json.loads(cfg_path.read_text()).get("architecture")
    except (json.JSONDecodeError, AttributeError):
        return None  # check_sae_folder (in the disk loader) names the problem


def load_itda_from_hub(
    repo_id: str, folder_name: str = "", device: str = "cpu", force_download: bool = False
) -> ITDA | ITDATranscoder:
    """``SAE.from_pretrained(repo_id, folder_name, converter=itda_hub_loader)``, checked to be an
    ITDA or an ITDA transcoder."""
    sae = SAE.from_pretrained(
        repo_id,
        folder_name,
        device=device,
        force_download=force_download,
        converter=itda_hub_loader,
    )
    if not isinstance(sae, ITDA | ITDATranscoder):
        raise ValueError(
            f"{repo_id}/{folder_name} holds a {type(sae).__name__}, not an ITDA or ITDA "
            "transcoder: load it with SAE.from_pretrained(..., converter=itda_hub_loader)"
        )
    return sae


__all__ = ["itda_hub_loader", "load_itda_from_hub"]

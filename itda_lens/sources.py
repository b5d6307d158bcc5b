"""Activation sources beyond HookedTransformer: Hugging Face (any torch) models read at module paths.

The builder reads a model through three things a TransformerLens model has: ``hook_dict`` (the
readable names), ``cfg`` (``device``, ``d_vocab``, ``model_name``) and ``run_with_cache(tokens,
names_filter=, stop_at_layer=)``. :class:`ModuleSource` gives any ``torch.nn.Module`` language
model those three, with module paths as hook names: ``transformer.h.3`` reads the module's output
(the first element when it returns a tuple, as HF blocks do), ``transformer.h.3:input`` its first
input. The forward pass stops as soon as every requested module has run (an exception raised in the
last hook), so reading layer 3 of a 70B model costs three layers. It works with ``device_map="auto"``
/ accelerate offloading: hooks see each module's output wherever it lives, and activations are
returned on the device of the first parameter.

:func:`sae_lens_cache_batches` reads activations sae_lens's ``CacheActivationsRunner`` saved.
TransformerLens 3.9's ``TransformerBridge`` needs no adapter: it already has TL hook names and
``run_with_cache``, so ``build_itda(bridge, tokens, "blocks.3.hook_resid_post")`` works as is.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

INPUT_SUFFIX = ":input"


class _Stop(Exception):
    """Raised in the last needed hook to end the forward pass early."""


@dataclass
class SourceConfig:
    """What the builder reads off a model's ``cfg``."""

    device: torch.device
    d_vocab: int | None
    model_name: str | None


class ModuleSource:
    """A Hugging Face (or any torch) language model read at module paths, presented to the
    builder like a TransformerLens model (module doc). ``model(input_ids=tokens)`` must run it."""

    def __init__(self, model: nn.Module, tokenizer: Any = None, *, name: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self._modules = dict(model.named_modules())
        config = getattr(model, "config", None)
        first = next(model.parameters(), None)
        self.cfg = SourceConfig(
            device=first.device if first is not None else torch.device("cpu"),
            d_vocab=getattr(config, "vocab_size", None),
            model_name=name or getattr(config, "_name_or_path", None) or type(model).__name__,
        )

    @property
    def hook_dict(self) -> dict[str, nn.Module]:
        """Every readable name: each module path, and the same with ``:input``."""
        out = {p: m for p, m in self._modules.items() if p}
        out.update({p + INPUT_SUFFIX: m for p, m in list(out.items())})
        return out

    def state_dict(self) -> dict[str, Tensor]:
        return self.model.state_dict()

    def parameters(self) -> Any:
        return self.model.parameters()

    def module(self, name: str) -> nn.Module:
        """The module a hook name reads, or a ValueError with the closest module paths."""
        path = name.removesuffix(INPUT_SUFFIX)
        if not path or path not in self._modules:
            close = difflib.get_close_matches(path, [p for p in self._modules if p], n=4)
            hint = f" Did you mean {close}?" if close else ""
            raise ValueError(
                f"{type(self.model).__name__} has no module {path!r}.{hint} "
                "Hook names are module paths (print(model) shows them), e.g. 'transformer.h.3', "
                "optionally with ':input'."
            )
        return self._modules[path]

    @torch.no_grad()
    def run_with_cache(
        self,
        tokens: Int[Tensor, "batch seq"],
        names_filter: Sequence[str],
        stop_at_layer: int | None = None,
    ) -> tuple[None, dict[str, Float[Tensor, "batch seq d"]]]:
        """One forward pass of ``tokens`` that records ``names_filter`` and stops after the last."""
        names = list(names_filter)
        cache: dict[str, Tensor] = {}
        handles = []

        def record(name: str, value: Any) -> None:
            value = value[0] if isinstance(value, tuple | list) else value
            if not isinstance(value, Tensor) or value.ndim != 3:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"{name!r} gives {shape}, not [batch, seq, d] activations: "
                    "hook a module whose output (or first input) is the residual stream"
                )
            cache[name] = value.detach().to(self.cfg.device)
            if len(cache) == len(names):
                raise _Stop

        for name in names:
            mod = self.module(name)
            if name.endswith(INPUT_SUFFIX):
                handles.append(
                    mod.register_forward_pre_hook(lambda m, args, n=name: record(n, args))
                )
            else:
                handles.append(mod.register_forward_hook(lambda m, i, o, n=name: record(n, o)))
        try:
            self.model(input_ids=tokens.to(self.cfg.device))
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in names if n not in cache]
        if missing:
            raise ValueError(f"the forward pass never ran {missing}: they are not on its path")
        return None, cache


def sae_lens_cache_batches(
    folder: str | Path, hook_name: str, *, rows_per_batch: int = 32
) -> Iterator[tuple[Float[Tensor, "n d"], Int[Tensor, "n 2"], Int[Tensor, " n"]]]:
    """Batches ``(acts, labels, token_ids)`` for ``build_itda_from_activations`` from activations
    sae_lens's ``CacheActivationsRunner`` saved to ``folder`` (a ``datasets`` folder with a
    ``[context, d]`` column named by the hook and a ``token_ids`` column). Labels are ``(row of the
    cache, position)``: the runner shuffles sequences, so they do not point into the original
    corpus; they still identify each atom's activation in the cache."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(folder))
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"{folder} is not a saved activation cache: {err}") from err
    if hook_name not in ds.column_names:
        raise ValueError(
            f"the cache in {folder} has no column {hook_name!r}; it has {ds.column_names}"
        )
    ds = ds.with_format("torch")
    for start in range(0, len(ds), rows_per_batch):
        rows = ds[start : start + rows_per_batch]
        acts = rows[hook_name].float()
        b, ctx, d = acts.shape
        labels = torch.stack(
            [torch.arange(start, start + b).repeat_interleave(ctx), torch.arange(ctx).repeat(b)],
            dim=1,
        )
        tids = rows["token_ids"].long().reshape(-1) if "token_ids" in rows else None
        if tids is None:
            tids = torch.full((b * ctx,), -1, dtype=torch.long)
        yield acts.reshape(b * ctx, d), labels, tids


def load_hf(
    spec: str | Path, device: str = "cpu", *, device_map: str | None = None
) -> ModuleSource:
    """A causal LM from a Hugging Face name or folder (``AutoModelForCausalLM``) with its
    tokenizer, as a :class:`ModuleSource`. ``device_map="auto"`` spreads a large model over the
    devices (and CPU) with accelerate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"device_map": device_map} if device_map else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(spec), **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"cannot load Hugging Face model {str(spec)!r}: {str(err).splitlines()[0][:200]}"
        ) from err
    if not device_map:
        model = model.to(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(spec))
    except (OSError, ValueError):
        tokenizer = None
    return ModuleSource(model, tokenizer, name=str(spec))


__all__ = ["INPUT_SUFFIX", "ModuleSource", "SourceConfig", "load_hf", "sae_lens_cache_batches"]

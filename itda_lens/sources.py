"""Activation sources beyond HookedTransformer: Hugging Face (any torch) and nnsight models read at
module paths.

The builder reads a model through three things a TransformerLens model has: ``hook_dict`` (the
readable names), ``cfg`` (``device``, ``d_vocab``, ``model_name``) and ``run_with_cache(tokens,
names_filter=, stop_at_layer=)``. Two sources give a model those three with one hook-name vocabulary,
module paths: ``transformer.h.3`` reads the module's output (the first element when it returns a
tuple, as HF blocks do), ``transformer.h.3:input`` its first input (first positional argument, else
first keyword argument). Both stop the forward pass as soon as every requested module has run, so
reading layer 3 of a 70B model costs three layers.

- :class:`ModuleSource` wraps any ``torch.nn.Module`` language model and reads with torch hooks (the
  stop is an exception raised in the last one). It works with ``device_map="auto"`` / accelerate
  offloading, disk offload included (:func:`load_hf` with ``max_memory`` and ``offload_folder``):
  hooks see each module's output wherever it lives, activations are returned on accelerate's
  execution device, and offloaded weights are read from disk one tensor at a time when the build
  fingerprints the model.
- :class:`NNsightSource` wraps an nnsight model and reads inside an nnsight trace (the stop is
  ``tracer.stop()``); ``remote=True`` sends the trace to NDIF. :func:`as_source` wraps an nnsight
  model automatically, so ``build_itda(nnsight_model, tokens, "transformer.h.3")`` works; nnsight is
  imported only when given such a model (``pip install "itda_lens[nnsight]"``).

:func:`sae_lens_cache_batches` reads activations sae_lens's ``CacheActivationsRunner`` saved.
TransformerLens 3.9's ``TransformerBridge`` needs no adapter: it already has TL hook names and
``run_with_cache``, so ``build_itda(bridge, tokens, "blocks.3.hook_resid_post")`` works as is.
"""

from __future__ import annotations

import difflib
import inspect
import sys
from collections.abc import Iterator, Mapping, Sequence
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


def execution_device(model: nn.Module) -> torch.device:
    """Where ``model`` computes: accelerate's execution device when accelerate dispatched it (its
    first parameter may then be offloaded, a placeholder on the meta device), else the device of its
    first parameter that holds data (CPU when none does)."""
    for module in model.modules():
        device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device)
    first = next((p for p in model.parameters() if not p.is_meta), None)
    return first.device if first is not None else torch.device("cpu")


def forward_options(model: nn.Module) -> dict[str, Any]:
    """Keyword arguments for a forward pass that only reads activations: ``use_cache=False`` when
    the model takes it (an HF model otherwise keeps every layer's keys and values it ran)."""
    try:
        takes = "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # no signature to read
        takes = False
    return {"use_cache": False} if takes else {}


def first_input(args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    """A module call's first input: its first positional argument, else its first keyword argument
    (what ``:input`` reads; nnsight's ``.input`` is the same)."""
    if args:
        return args[0]
    return next(iter(kwargs.values()), None)


def as_activation(name: str, value: Any) -> Float[Tensor, "batch seq d"]:
    """The activations hook ``name`` read from a module's output or first input (the first element
    of a tuple or list, as HF blocks return), or a ValueError when they are not [batch, seq, d]."""
    if isinstance(value, tuple | list) and value:
        value = value[0]
    if not isinstance(value, Tensor) or value.ndim != 3:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(
            f"{name!r} gives {shape}, not [batch, seq, d] activations: "
            "hook a module whose output (or first input) is the residual stream"
        )
    return value


def check_all_ran(names: Sequence[str], read: Mapping[str, Any]) -> None:
    """Raise a ValueError naming the requested hooks a forward pass never reached."""
    missing = [n for n in names if n not in read]
    if missing:
        raise ValueError(f"the forward pass never ran {missing}: they are not on its path")


class OffloadedWeights(Mapping[str, Tensor]):
    """A module's ``state_dict`` whose weights accelerate offloaded (placeholders on the meta
    device) are read from the offload store when asked for, one at a time: iterating the weights of a
    model larger than memory never holds more than one of them. A placeholder with no store to read
    (the weights of a remote nnsight model live on the server) is left out."""

    def __init__(self, root: nn.Module):
        self._root = root
        self._tensors = root.state_dict(keep_vars=True)  # placeholders cost no memory
        self._keys = [k for k, t in self._tensors.items() if not t.is_meta or self._store(k)]

    def _store(self, key: str) -> Mapping[str, Tensor] | None:
        path = key.rpartition(".")[0]
        module = self._root.get_submodule(path) if path else self._root
        return getattr(getattr(module, "_hf_hook", None), "weights_map", None)

    def __getitem__(self, key: str) -> Tensor:
        tensor = self._tensors[key]
        if not tensor.is_meta:
            return tensor.detach()
        store = self._store(key)
        if store is None:
            raise KeyError(f"{key} is a placeholder with no offloaded weights to read")
        return store[key.rpartition(".")[2]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class PathSource:
    """What both sources share: a torch module tree's paths as hook names (and with ``:input``),
    the ``cfg`` the builder reads, and the weights the build fingerprints."""

    def __init__(
        self,
        root: nn.Module,
        tokenizer: Any = None,
        *,
        name: str | None = None,
        device: torch.device | None = None,
    ):
        self.root = root.eval()
        self.tokenizer = tokenizer
        self._modules = dict(root.named_modules())
        config = getattr(root, "config", None)
        self.cfg = SourceConfig(
            device=device if device is not None else execution_device(root),
            d_vocab=getattr(config, "vocab_size", None),
            model_name=name or getattr(config, "_name_or_path", None) or type(root).__name__,
        )

    @property
    def hook_dict(self) -> dict[str, nn.Module]:
        """Every readable name: each module path, and the same with ``:input``."""
        out = {p: m for p, m in self._modules.items() if p}
        out.update({p + INPUT_SUFFIX: m for p, m in list(out.items())})
        return out

    def state_dict(self) -> Mapping[str, Tensor]:
        """The weights by name, offloaded ones read from disk as they are asked for
        (:class:`OffloadedWeights`)."""
        return OffloadedWeights(self.root)

    def parameters(self) -> Iterator[nn.Parameter]:
        """The module tree's parameters (an offloaded one is a placeholder on the meta device)."""
        return self.root.parameters()

    def module(self, name: str) -> nn.Module:
        """The module a hook name reads, or a ValueError with the closest module paths."""
        path = name.removesuffix(INPUT_SUFFIX)
        if not path or path not in self._modules:
            close = difflib.get_close_matches(path, [p for p in self._modules if p], n=4)
            hint = f" Did you mean {close}?" if close else ""
            raise ValueError(
                f"{type(self.root).__name__} has no module {path!r}.{hint} "
                "Hook names are module paths (print(model) shows them), e.g. 'transformer.h.3', "
                "optionally with ':input'."
            )
        return self._modules[path]


class ModuleSource(PathSource):
    """A Hugging Face (or any torch) language model read at module paths with torch hooks,
    presented to the builder like a TransformerLens model (module doc). ``model(input_ids=tokens)``
    must run it."""

    def __init__(self, model: nn.Module, tokenizer: Any = None, *, name: str | None = None):
        super().__init__(model, tokenizer, name=name)
        self.model = model
        self._options = forward_options(model)

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
            cache[name] = as_activation(name, value).detach().to(self.cfg.device)
            if len(cache) == len(names):
                raise _Stop

        for name in names:
            mod = self.module(name)
            if name.endswith(INPUT_SUFFIX):
                handles.append(
                    mod.register_forward_pre_hook(
                        lambda m, args, kwargs, n=name: record(n, first_input(args, kwargs)),
                        with_kwargs=True,
                    )
                )
            else:
                handles.append(mod.register_forward_hook(lambda m, i, o, n=name: record(n, o)))
        try:
            self.model(input_ids=tokens.to(self.cfg.device), **self._options)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        check_all_ran(names, cache)
        return None, cache


def _nnsight() -> Any:
    try:
        import nnsight
    except ImportError as err:
        raise ImportError(
            'reading an nnsight model needs nnsight: pip install "itda_lens[nnsight]"'
        ) from err
    return nnsight


class NNsightSource(PathSource):
    """An nnsight model (``LanguageModel``, ``TransformersModel``, or ``NNsight`` over a torch
    language model) read at module paths inside nnsight traces, presented to the builder like
    :class:`ModuleSource` with the same hook names (module doc).

    Each batch is one ``model.trace``: one invoke holds the tokens and one empty invoke per hook
    name reads its module, so the names need not come in execution order (nnsight refuses reads
    that do). The read that completes the set calls ``tracer.stop()``: the forward pass ends after
    the last requested module. The weights are loaded (``dispatch()``) when the source is made.

    ``remote=True`` (a ``LanguageModel`` / ``TransformersModel``) sends each trace to NDIF, where
    the model runs; its weights then stay placeholders here, so the build's model fingerprint covers
    none of them. Untested here (NDIF cannot be reached); ``remote="local"``, nnsight's dry run of
    the remote path (the trace serialised and run in-process with local modules hidden), is tested.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        name: str | None = None,
        remote: bool | str = False,
    ):
        if not isinstance(model, _nnsight().Envoy):
            raise TypeError(
                "NNsightSource wraps an nnsight model (nnsight.LanguageModel, TransformersModel or "
                f"NNsight), got {type(model).__name__}; use ModuleSource for a torch module"
            )
        if remote and not hasattr(model, "to_model_key"):  # what NDIF names its models by
            raise ValueError(
                f"remote={remote!r} needs an nnsight model NDIF can run (LanguageModel or "
                f"TransformersModel); {type(model).__name__} runs only here"
            )
        if not remote and not getattr(model, "dispatched", True):
            model.dispatch()  # real weights now: the device and the fingerprint read them
        super().__init__(
            model._module,  # the torch module the envoy tree mirrors (nnsight has no public name)
            tokenizer if tokenizer is not None else getattr(model, "tokenizer", None),
            name=name,
            device=torch.device("cpu") if remote else None,
        )
        self.model = model
        self.remote = remote
        self._options = forward_options(self.root)

    @torch.no_grad()
    def run_with_cache(
        self,
        tokens: Int[Tensor, "batch seq"],
        names_filter: Sequence[str],
        stop_at_layer: int | None = None,
    ) -> tuple[None, dict[str, Float[Tensor, "batch seq d"]]]:
        """One traced forward pass of ``tokens`` that reads ``names_filter`` and stops after the
        last. The trace body names only nnsight and its own locals, so it ships to a server."""
        nnsight = _nnsight()
        from nnsight.intervention.interleaver import OutOfOrderError

        names = list(names_filter)
        for name in names:
            self.module(name)
        reads = [(n, n.removesuffix(INPUT_SUFFIX), n.endswith(INPUT_SUFFIX)) for n in names]
        lm = self.model
        options = {"remote": self.remote} if self.remote else {}
        forward = self._options
        got: dict[str, Any] = {}  # filled in place by a local run
        acts: dict[str, Any] = {}  # pushed back by nnsight, also from a remote run
        try:
            with lm.trace(**options) as tracer:
                with tracer.invoke(tokens, **forward):
                    pass
                for name, path, is_input in reads:
                    with tracer.invoke():
                        envoy = lm.get(path)
                        value = envoy.input if is_input else envoy.output
                        got[name] = value[0] if isinstance(value, tuple | list) else value
                        if len(got) == len(reads):
                            acts = nnsight.save(got)
                            tracer.stop()
        except OutOfOrderError:
            pass  # a module the forward pass never reached: named below
        acts = acts or got
        check_all_ran(names, acts)
        return None, {n: as_activation(n, acts[n]).detach().to(self.cfg.device) for n in names}


def as_source(model: Any) -> Any:
    """``model`` as the reader takes it: an nnsight model wrapped in :class:`NNsightSource` (run
    locally; wrap it yourself for ``remote=True``), anything else unchanged. Checked without
    importing nnsight: an nnsight model exists only once nnsight is imported."""
    nnsight = sys.modules.get("nnsight")
    if nnsight is not None and isinstance(model, nnsight.Envoy):
        return NNsightSource(model)
    return model


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
    spec: str | Path,
    device: str = "cpu",
    *,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | Path | None = None,
) -> ModuleSource:
    """A causal LM from a Hugging Face name or folder (``AutoModelForCausalLM``) with its
    tokenizer, as a :class:`ModuleSource`. ``device_map="auto"`` spreads a large model over the
    devices and the CPU with accelerate; ``max_memory`` (e.g. ``{"cpu": "8GiB"}``, or
    ``{0: "20GiB", "cpu": "64GiB"}``) caps what each holds, and the layers that do not fit are
    offloaded to disk and read back in each forward pass (a model larger than memory). Offloaded
    weights go to ``offload_folder``, unless accelerate reads them in place from the checkpoint's
    safetensors files."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (max_memory is not None or offload_folder is not None) and not device_map:
        raise ValueError(
            "max_memory and offload_folder place a model with accelerate: pass device_map "
            "(e.g. device_map='auto') too"
        )
    kwargs: dict[str, Any] = {"device_map": device_map} if device_map else {}
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
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


__all__ = [
    "INPUT_SUFFIX",
    "ModuleSource",
    "NNsightSource",
    "OffloadedWeights",
    "PathSource",
    "SourceConfig",
    "as_source",
    "forward_options",
    "load_hf",
    "sae_lens_cache_batches",
]

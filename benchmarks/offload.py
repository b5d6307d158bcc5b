"""Reading one layer of a model: the early stop against the full forward pass, with the model in
memory and with the model offloaded to disk (a model larger than memory).

A GPT-2-shaped Hugging Face model is built from a config (12 layers, d_model 768, GPT-2's 50,257
token vocabulary; random weights: nothing is downloaded, and the cost of a forward pass does not
depend on the weights), saved as safetensors and loaded twice: in memory, and with accelerate's
``device_map="auto"`` under a CPU budget of a third of the checkpoint, which offloads to disk what
does not fit (here the whole model: accelerate keeps room for the largest layer), read back in
every forward pass. For each layer L, one batch (4 windows of 128 random tokens) is read at
``transformer.h.L`` by :class:`itda_lens.sources.ModuleSource`, which stops the forward pass after
that block (what ``build_itda`` does), and by the full forward pass (the model's logits computed,
the blocks' outputs taken from hooks: reading without the stop); both pass ``use_cache=False``, so
neither keeps a key/value cache. Reported per batch: the median wall-clock of the repeats, the peak
RSS above the RSS before the call (sampled every 2 ms, with glibc told to map every allocation of
64 KB or more on its own and to return freed memory before each call, so that the RSS follows what
is live instead of hiding new tensors in memory freed earlier; for the offloaded model it includes
the pages of weights read back from disk), and how many blocks ran. The early stop's activations
must equal the full pass's, and the offloaded model's the in-memory model's. The offloaded model
reads its own copy of the checkpoint, whose pages are dropped from the page cache
(``posix_fadvise``) before every call, so that its weights come from the disk as they would for a
model larger than memory; the disk's read rate, cold and from the page cache, is printed and
recorded.

    python benchmarks/offload.py            # full run (about a minute)
    python benchmarks/offload.py --quick    # reduced run, same code and tables
"""

from __future__ import annotations

import ctypes
import gc
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import Measured, bench_parser, fmt_bytes, measure, prepare, record, table, table_spec
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel

from itda_lens.sources import ModuleSource, forward_options, load_hf

FULL = {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}
QUICK = {"n_layer": 4, "n_embd": 64, "n_head": 4, "vocab_size": 2048, "n_positions": 64}
#: the CPU budget of the offloaded model, as a share of the checkpoint's bytes
BUDGET_SHARE = 1 / 3


def save_model(folder: Path, shape: dict[str, int]) -> int:
    """A GPT-2-shaped model with random weights saved to ``folder``; returns its parameter count."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**shape))
    model.save_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    os.sync()  # written out, so the page cache can drop the checkpoint's pages
    return n


LIBC = ctypes.CDLL("libc.so.6")
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def follow_live_memory() -> None:
    """Make the RSS follow live allocations: each of 64 KB or more mapped on its own (and unmapped
    when freed), not carved from memory freed earlier, which glibc would reuse unseen."""
    LIBC.mallopt(M_MMAP_THRESHOLD, 64 * 1024)


def release_freed_memory() -> None:
    """Return the memory freed so far to the OS, so the next call's RSS starts from what is live."""
    gc.collect()
    LIBC.malloc_trim(0)


def read_rate(path: Path) -> dict[str, float]:
    """Bytes per second reading ``path`` whole: cold (its pages dropped first), then from the cache."""
    rates = {}
    for kind in ("cold", "cached"):
        if kind == "cold":
            drop_page_cache(path.parent)
        t0 = time.perf_counter()
        with path.open("rb") as f:
            while f.read(1 << 24):
                pass
        rates[kind] = path.stat().st_size / (time.perf_counter() - t0)
    return rates


def drop_page_cache(folder: Path) -> None:
    """Drop the checkpoint's pages from the page cache: the next read comes from the disk."""
    for path in folder.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def placed(device_map: dict[str, Any], path: str) -> Any:
    """Where accelerate's ``device_map`` put module ``path`` (its closest listed ancestor's place)."""
    owners = [m for m in device_map if m == "" or path == m or path.startswith(m + ".")]
    return device_map[max(owners, key=len)]


class BlockCounter:
    """Counts the blocks (and the LM head) that start running while it is installed."""

    def __init__(self, model: GPT2LMHeadModel):
        self.blocks = self.head = 0
        self.handles = [b.register_forward_pre_hook(self._block) for b in model.transformer.h]
        self.handles.append(model.lm_head.register_forward_pre_hook(self._head))

    def _block(self, module: nn.Module, args: Any) -> None:
        self.blocks += 1

    def _head(self, module: nn.Module, args: Any) -> None:
        self.head += 1

    def reset(self) -> None:
        self.blocks = self.head = 0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def full_pass(model: GPT2LMHeadModel, tokens: Tensor, layers: list[int]) -> dict[int, Tensor]:
    """The whole forward pass (logits included), the blocks' outputs at ``layers`` taken from
    hooks: reading them without the early stop."""
    out: dict[int, Tensor] = {}
    handles = [
        model.transformer.h[i].register_forward_hook(
            lambda m, a, o, i=i: out.__setitem__(i, o[0] if isinstance(o, tuple) else o)
        )
        for i in layers
    ]
    try:
        with torch.no_grad():
            model(input_ids=tokens, **forward_options(model))  # as ModuleSource runs it
    finally:
        for h in handles:
            h.remove()
    return out


def repeated(fn: Callable[[], Any], repeats: int, before: Callable[[], None]) -> dict[str, Any]:
    """``fn`` run ``repeats`` times (``before`` ahead of each): median seconds, largest peak
    extra RSS, and the last result."""
    runs: list[Measured] = []
    for _ in range(repeats):
        before()
        release_freed_memory()
        runs.append(measure(fn))
    return {
        "seconds": statistics.median(r.seconds for r in runs),
        "peak_bytes": max(r.peak_extra_bytes for r in runs),
        "result": runs[-1].result,
    }


def run_placement(
    placement: str,
    source: ModuleSource,
    tokens: Tensor,
    layers: list[int],
    repeats: int,
    before: Callable[[], None],
) -> list[dict[str, Any]]:
    """Every layer read with the early stop, against one full pass reading them all."""
    model = source.model
    counter = BlockCounter(model)
    try:
        repeated(lambda: full_pass(model, tokens, layers), 1, before)  # warm-up
        counter.reset()
        full = repeated(lambda: full_pass(model, tokens, layers), repeats, before)
        full_blocks, full_head = counter.blocks // repeats, counter.head // repeats
        rows = []
        for layer in layers:
            hook = f"transformer.h.{layer}"
            counter.reset()
            stop = repeated(
                lambda h=hook: source.run_with_cache(tokens, [h])[1][h], repeats, before
            )
            rows.append(
                {
                    "placement": placement,
                    "layer": layer,
                    "stop_seconds": stop["seconds"],
                    "full_seconds": full["seconds"],
                    "stop_peak_bytes": stop["peak_bytes"],
                    "full_peak_bytes": full["peak_bytes"],
                    "stop_blocks": counter.blocks // repeats,
                    "full_blocks": full_blocks,
                    "stop_head": counter.head // repeats,
                    "full_head": full_head,
                    "acts": stop["result"],
                    "same_as_full": torch.equal(stop["result"], full["result"][layer]),
                }
            )
            print(
                f"{placement}, layer {layer}: {stop['seconds']:.3f} s with the stop, "
                f"{full['seconds']:.3f} s full",
                flush=True,
            )
    finally:
        counter.remove()
    return rows


def main() -> None:
    parser = bench_parser(__doc__, "bench_out/offload")
    args = parser.parse_args()
    prepare(args)
    t0 = time.perf_counter()
    shape = QUICK if args.quick else FULL
    n_layer = shape["n_layer"]
    layers = [0, 1, n_layer - 1] if args.quick else [0, 3, 6, n_layer - 1]
    batch, seq = (2, 32) if args.quick else (4, 128)
    repeats = 1 if args.quick else 3
    tokens = torch.randint(
        0, shape["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0)
    )
    follow_live_memory()
    with tempfile.TemporaryDirectory() as tmp:
        folder, copy = Path(tmp) / "model", Path(tmp) / "model_offloaded"
        n_params = save_model(folder, shape)
        shutil.copytree(folder, copy)  # pages the in-memory model maps cannot be dropped
        os.sync()
        checkpoint = next(copy.glob("*.safetensors"))
        size = checkpoint.stat().st_size
        rates = read_rate(checkpoint)
        budget = int(BUDGET_SHARE * size)
        in_memory = load_hf(folder)
        offloaded = load_hf(
            copy,
            device_map="auto",
            max_memory={"cpu": budget},
            offload_folder=Path(tmp) / "offload",
        )
        device_map = dict(offloaded.model.hf_device_map)
        blocks_on_disk = sum(
            placed(device_map, f"transformer.h.{i}") == "disk" for i in range(n_layer)
        )
        setup = {
            "parameters": f"{n_params / 1e6:.1f} M",
            "checkpoint": fmt_bytes(size),
            "cpu_budget": fmt_bytes(budget),
            "blocks_on_disk": f"{blocks_on_disk} of {n_layer}",
            "disk_read_cold": f"{fmt_bytes(rates['cold'])}/s",
            "disk_read_cached": f"{fmt_bytes(rates['cached'])}/s",
        }
        print(
            f"{setup['parameters']} parameters, checkpoint {setup['checkpoint']}; CPU budget "
            f"{setup['cpu_budget']}: {setup['blocks_on_disk']} blocks offloaded to disk; the disk "
            f"reads the checkpoint at {setup['disk_read_cold']} cold, "
            f"{setup['disk_read_cached']} from the page cache",
            flush=True,
        )
        rows = run_placement("in memory", in_memory, tokens, layers, repeats, lambda: None)
        rows += run_placement(
            "disk offload", offloaded, tokens, layers, repeats, lambda: drop_page_cache(copy)
        )
    same_offload = all(
        torch.equal(a["acts"], b["acts"])
        for a, b in zip(rows[: len(layers)], rows[len(layers) :], strict=True)
    )
    shown = [
        {
            "placement": r["placement"],
            "layer": r["layer"],
            "blocks run (stop / full)": f"{r['stop_blocks']} / {r['full_blocks']}",
            "LM head run (stop / full)": f"{r['stop_head']} / {r['full_head']}",
            "s per batch, stop": f"{r['stop_seconds']:.3f}",
            "s per batch, full": f"{r['full_seconds']:.3f}",
            "time full / stop": f"{r['full_seconds'] / r['stop_seconds']:.1f}x",
            "peak RSS, stop": fmt_bytes(r["stop_peak_bytes"]),
            "peak RSS, full": fmt_bytes(r["full_peak_bytes"]),
            "memory full / stop": f"{r['full_peak_bytes'] / max(r['stop_peak_bytes'], 1):.1f}x",
            "same activations": str(r["same_as_full"]),
        }
        for r in rows
    ]
    cols = list(shown[0])
    print(table(shown, cols))
    print(f"the offloaded model read the in-memory model's activations: {same_offload}")
    for r in rows:
        del r["acts"]
    record(
        "offload",
        args,
        {"main": table_spec(shown, cols)},
        {
            "rows": rows,
            "shape": shape,
            "parameters": n_params,
            "checkpoint_bytes": size,
            "cpu_budget_bytes": budget,
            "disk_read_bytes_per_s": rates,
            "setup": setup,
            "device_map": device_map,
            "blocks_on_disk": blocks_on_disk,
            "batch": [batch, seq],
            "repeats": repeats,
            "same_offload": same_offload,
        },
        time.perf_counter() - t0,
    )
    if not (same_offload and all(r["same_as_full"] for r in rows)):
        raise SystemExit("the early stop or the offloaded model read different activations")


if __name__ == "__main__":
    main()

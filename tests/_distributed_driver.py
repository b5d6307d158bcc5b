"""Driver for the data-parallel build tests: each spawned rank joins a gloo group through a file
store and builds on its shard of the same stream (zoo model, CPU)."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import torch
import torch.distributed as dist

HOOKS = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
SETTINGS = {"k": 8, "cos_threshold": 0.8, "batch_size": 8, "checkpoint_every": 1}


def tokens(n: int = 48) -> torch.Tensor:
    from itda_lens import zoo

    return zoo.load_tokens("train", n, 64)


def build(out: Path, checkpoint: Path | None = None, resume: bool = False, **extra: object) -> None:
    """Build (in whatever process group exists) and, on rank 0, save every hook's ITDA."""
    from itda_lens import build_itda, zoo

    model = zoo.load_model()
    if extra.pop("perturb", False) and dist.get_rank() == 1:
        with torch.no_grad():
            next(model.parameters()).add_(1e-3)
    itdas = build_itda(
        model,
        tokens(),
        HOOKS,
        progress=False,
        checkpoint_dir=checkpoint,
        resume=resume,
        **{**SETTINGS, **extra},
    )
    if not dist.is_initialized() or dist.get_rank() == 0:
        for hook, itda in itdas.items():
            itda.save_model(out / hook)


def rank_main(
    rank: int, world: int, store: str, out: str, checkpoint: str | None, flags: dict
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        build(Path(out), Path(checkpoint) if checkpoint else None, **flags)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":  # RANK WORLD STORE OUT CHECKPOINT [resume] [perturb] [setting=int]
    rank, world = int(sys.argv[1]), int(sys.argv[2])
    flags: dict = {name: True for name in ("resume", "perturb") if name in sys.argv[6:]}
    flags.update(arg.split("=", 1) for arg in sys.argv[6:] if "=" in arg)  # setting=value
    flags = {k: int(v) if isinstance(v, str) and v.isdigit() else v for k, v in flags.items()}
    rank_main(rank, world, sys.argv[3], sys.argv[4], sys.argv[5] or None, flags)

"""``python -m itda_lens``: the CLI, also under ``torchrun``.

Launched by ``torchrun --nproc-per-node N -m itda_lens build ...`` (``WORLD_SIZE`` > 1 in the
environment), it first joins the process group torchrun describes (NCCL with one GPU per local
rank when CUDA is there, gloo on CPU), so ``build`` runs data-parallel (``itda_lens.builder.
distributed``): every rank reads its shard, rank 0 writes the checkpoints and the output.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from itda_lens.cli import main


def init_from_env() -> str | None:
    """Join torchrun's process group if there is one; returns the device this rank uses."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return None
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return f"cuda:{local}"
    dist.init_process_group("gloo")
    return "cpu"


def run() -> int:
    device = init_from_env()
    argv = sys.argv[1:]
    if device and device.startswith("cuda") and argv[:1] == ["build"] and "--device" not in argv:
        argv = [*argv, "--device", device]  # one GPU per rank
    try:
        return main(argv)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(run())

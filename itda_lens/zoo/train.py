"""Train the zoo on CPU: a BPE tokenizer and small causal TransformerLens models.

    python -m itda_lens.zoo.train tokenizer --vocab-size 2048
    python -m itda_lens.zoo.train model --name kjv-4l128-s0 --n-layers 4 --d-model 128 --seed 0 \\
        --tokens 3000000 --checkpoints 0.125 0.25 0.5

    python -m itda_lens.zoo.train model --name kjv-4l128-s0-planted --init-from kjv-4l128-s0 \
        --variant planted --tokens 400000 --lr 5e-4 --warmup-steps 10

Each model folder gets fp16 safetensors weights, its TransformerLens config, and a card with the
config, seed, tokens seen, final train / held-out loss and the add-one unigram baseline on the same
held-out targets. A fine-tune (``init_from``: continued training of a zoo model on a variant of the
text, :data:`~itda_lens.zoo.VARIANTS`) also records its base, the base's losses on the same held-out
text, and (planted) the loss on the inserted tokens. The learning-rate schedule follows steps, so a busy machine slows a run down but
does not change its result.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from jaxtyping import Bool, Int
from sae_lens import HookedSAETransformer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformerConfig
from transformers import PreTrainedTokenizerFast

from itda_lens.models import save_model_folder
from itda_lens.zoo import (
    CHECKPOINT_SEP,
    MODELS_DIR,
    PLANTING,
    TOKENIZERS_DIR,
    load_model,
    load_token_marks,
    load_tokenizer,
    load_tokens,
    model_card,
)
from itda_lens.zoo.corpus import documents

SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>")


def train_tokenizer(vocab_size: int, out_dir: str | Path | None = None) -> Path:
    """Byte-level BPE with <bos>=0, <eos>=1, <pad>=2, trained on the train split's verses."""
    out = Path(out_dir) if out_dir is not None else TOKENIZERS_DIR / f"bpe{vocab_size}"
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator((d.text for d in documents("train")), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    fast.save_pretrained(str(out))
    return out


def unigram_baseline(
    train: Int[Tensor, "n seq"], heldout: Int[Tensor, "m seq"], vocab: int
) -> float:
    """Held-out nats/token of an add-one unigram model fit on the training targets."""
    counts = torch.bincount(train[:, 1:].reshape(-1), minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    return float(-logp[heldout[:, 1:].reshape(-1)].mean())


@torch.no_grad()
def heldout_loss(
    model: HookedSAETransformer,
    tokens: Int[Tensor, "m seq"],
    targets: Bool[Tensor, "m seq"] | None = None,
    batch_size: int = 64,
) -> float:
    """Mean next-token loss over every target of ``tokens`` (nats/token), or over the target
    positions where ``targets`` is set."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start : start + batch_size]
        loss = model(batch, return_type="loss", loss_per_token=True)
        if targets is not None:
            loss = loss[targets[start : start + batch_size, 1:]]
        total += float(loss.sum())
        count += loss.numel()
    model.train(was_training)
    return total / count


@dataclass
class TrainConfig:
    name: str
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    seq_len: int = 128
    tokenizer: str = "bpe2048"
    seed: int = 0
    tokens: int = 3_000_000
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    checkpoints: list[float] = field(
        default_factory=list
    )  # fractions of training to keep as name@stepN
    out: str = str(MODELS_DIR)
    init_from: str | None = None  # zoo model to continue training (its architecture and tokenizer)
    variant: str | None = None  # corpus variant to train on (zoo.VARIANTS)

    @property
    def steps(self) -> int:
        return max(1, self.tokens // (self.batch_size * self.seq_len))


def make_model(cfg: TrainConfig, tokenizer: PreTrainedTokenizerFast) -> HookedSAETransformer:
    tl_cfg = HookedTransformerConfig(
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        d_head=cfg.d_model // cfg.n_heads,
        d_mlp=4 * cfg.d_model,
        n_ctx=cfg.seq_len,
        d_vocab=len(tokenizer),
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type="standard",
        seed=cfg.seed,
        model_name=cfg.name,
    )
    return HookedSAETransformer(tl_cfg, tokenizer=tokenizer)


def _start(cfg: TrainConfig, tokenizer: PreTrainedTokenizerFast) -> HookedSAETransformer:
    """A fresh model, or the ``init_from`` zoo model (which must use ``cfg.tokenizer``)."""
    if cfg.init_from is None:
        return make_model(cfg, tokenizer)
    base_tokenizer = model_card(cfg.init_from)["tokenizer"]
    if base_tokenizer != cfg.tokenizer:
        raise ValueError(
            f"{cfg.init_from} uses tokenizer {base_tokenizer}, not {cfg.tokenizer}: "
            f"pass --tokenizer {base_tokenizer}"
        )
    model = load_model(cfg.init_from)
    model.cfg.model_name = cfg.name
    return model


def _split_losses(model: HookedSAETransformer, cfg: TrainConfig) -> dict[str, float]:
    """Held-out loss on the plain text and, for a variant, on its held-out text (and, planted, on
    the inserted tokens alone)."""
    out = {"heldout_loss": round(heldout_loss(model, _heldout(cfg, None)), 4)}
    if cfg.variant is not None:
        tokens = _heldout(cfg, cfg.variant)
        out[f"heldout_loss_{cfg.variant}"] = round(heldout_loss(model, tokens), 4)
        marks = load_token_marks(
            "heldout",
            seq_len=cfg.seq_len,
            tokenizer=cfg.tokenizer,
            shuffle=False,
            variant=cfg.variant,
        )
        if marks.any():
            out["heldout_loss_marked"] = round(heldout_loss(model, tokens, marks), 4)
    return out


def _heldout(cfg: TrainConfig, variant: str | None) -> Tensor:
    return load_tokens(
        "heldout", seq_len=cfg.seq_len, tokenizer=cfg.tokenizer, shuffle=False, variant=variant
    )


def train_model(cfg: TrainConfig, progress: bool = True) -> dict:
    """Train one model; returns (and saves) its card."""
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.tokenizer)
    train = load_tokens(
        "train", seq_len=cfg.seq_len, tokenizer=cfg.tokenizer, shuffle=False, variant=cfg.variant
    )
    heldout = _heldout(cfg, None)
    model = _start(cfg, tokenizer)
    base_losses = _split_losses(model, cfg) if cfg.init_from is not None else None
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "W_" in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "W_" in n)]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    steps = cfg.steps

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    keep = {max(1, round(f * steps)) for f in cfg.checkpoints if 0 < f < 1}
    gen = torch.Generator().manual_seed(1000 + cfg.seed)
    order = torch.randperm(train.shape[0], generator=gen)
    cursor, epoch, ema = 0, 0, None
    saved_checkpoints = []
    t0 = time.perf_counter()

    def card_at(step: int) -> dict:
        return _card(
            cfg,
            step,
            ema,
            heldout_loss(model, heldout),
            train,
            heldout,
            len(tokenizer),
            time.perf_counter() - t0,
            epoch,
        )

    bar = tqdm(range(steps), desc=f"train {cfg.name}", disable=not progress)
    for step in bar:
        if cursor + cfg.batch_size > train.shape[0]:
            order, cursor, epoch = torch.randperm(train.shape[0], generator=gen), 0, epoch + 1
        batch = train[order[cursor : cursor + cfg.batch_size]]
        cursor += cfg.batch_size
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(batch, return_type="loss")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = float(loss) if ema is None else 0.98 * ema + 0.02 * float(loss)
        bar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr_at(step):.1e}")
        if step + 1 in keep:
            name = f"{cfg.name}{CHECKPOINT_SEP}step{step + 1}"
            card = card_at(step + 1)
            save_model_folder(
                model,
                Path(cfg.out) / name,
                card={**card, "name": name, "checkpoint_of": cfg.name},
                save_tokenizer=False,
            )
            saved_checkpoints.append(name)
    card = card_at(steps)
    card["checkpoints"] = saved_checkpoints
    if base_losses is not None:
        card.update(_split_losses(model, cfg))
        card["finetuned_from"] = cfg.init_from
        card["base_losses"] = base_losses
        if cfg.variant == "planted":
            card["planting"] = asdict(PLANTING)
        card["diff_data"] = "kjv:heldout:planted" if cfg.variant == "planted" else "kjv:heldout"
    save_model_folder(model, Path(cfg.out) / cfg.name, card=card, save_tokenizer=False)
    return card


def _card(
    cfg: TrainConfig,
    step: int,
    train_loss: float | None,
    held: float,
    train: Tensor,
    heldout: Tensor,
    vocab: int,
    seconds: float,
    epoch: int,
) -> dict:
    return {
        "name": cfg.name,
        "tokenizer": cfg.tokenizer,
        # where it was written is not part of what was trained (a card says nothing about the machine)
        "train_config": {k: v for k, v in asdict(cfg).items() if k != "out"},
        "steps": step,
        "tokens_seen": step * cfg.batch_size * cfg.seq_len,
        "epochs": round(step * cfg.batch_size / train.shape[0], 2),
        "train_loss_ema": round(train_loss or float("nan"), 4),
        "heldout_loss": round(held, 4),
        "unigram_heldout_loss": round(unigram_baseline(train, heldout, vocab), 4),
        "heldout_tokens": int(heldout[:, 1:].numel()),
        "train_seconds": round(seconds, 1),
        "torch": torch.__version__,
    }


#: The shipped zoo, in training order (the default model first): 5 seeds of 4 layers x 128,
#: 2 seeds of 6 layers x 160, a 4 x 128 model on the second (4096-token) tokenizer, and 5 seeds
#: of 8 layers x 128 (more layers to tell apart in layer matching).
ZOO_RECIPE: list[TrainConfig] = [
    TrainConfig("kjv-4l128-s0", seed=0, checkpoints=[0.1, 0.25, 0.5]),
    *(TrainConfig(f"kjv-4l128-s{s}", seed=s) for s in range(1, 5)),
    *(TrainConfig(f"kjv-6l160-s{s}", n_layers=6, d_model=160, n_heads=5, seed=s) for s in range(2)),
    TrainConfig("kjv-4l128-bpe4096-s0", tokenizer="bpe4096", seed=0),
    *(TrainConfig(f"kjv-8l128-s{s}", n_layers=8, d_model=128, n_heads=4, seed=s) for s in range(5)),
    # fine-tunes of the default model, for model diffing: a planted behaviour, a domain shift
    *(
        TrainConfig(
            f"kjv-4l128-s0-{v}",
            init_from="kjv-4l128-s0",
            variant=v,
            tokens=409_600,
            lr=5e-4,
            warmup_steps=10,
        )
        for v in ("planted", "epistles")
    ),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m itda_lens.zoo.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("tokenizer")
    t.add_argument("--vocab-size", type=int, default=2048)
    t.add_argument("--out", default=None)
    m = sub.add_parser("model")
    for f in TrainConfig.__dataclass_fields__.values():
        if f.name == "checkpoints":
            m.add_argument("--checkpoints", type=float, nargs="*", default=[])
        elif f.name == "name":
            m.add_argument("--name", required=True)
        elif f.name in ("init_from", "variant"):
            m.add_argument(f"--{f.name.replace('_', '-')}", default=None)
        else:
            m.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    sub.add_parser("all", help="train every ZOO_RECIPE model that is not in the zoo yet")
    args = parser.parse_args(argv)
    if args.what == "tokenizer":
        print(f"tokenizer saved to {train_tokenizer(args.vocab_size, args.out)}")
        return 0
    if args.what == "all":
        configs = [c for c in ZOO_RECIPE if not (Path(c.out) / c.name / "card.json").is_file()]
    else:
        configs = [
            TrainConfig(
                **{k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
            )
        ]
    for cfg in configs:
        card = train_model(cfg)
        keys = (
            "name",
            "tokens_seen",
            "train_loss_ema",
            "heldout_loss",
            "unigram_heldout_loss",
            "train_seconds",
        )
        print(json.dumps({k: card[k] for k in keys}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Daydreams from a trained ACN checkpoint: x -> code -> z ~ p(z | code) -> x' -> ...

Run: python python/daydream.py runs/acn-default/checkpoint.pt --steps 12 --out daydream.png
"""

from __future__ import annotations

import argparse

import torch

from acn_kernels.acn.checkpoint import load_checkpoint
from acn_kernels.acn.config import TrainConfig
from acn_kernels.acn.data import load
from acn_kernels.acn.evaluate import save_grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("checkpoint")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--chains", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="daydream.png")
    args = ap.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    config = TrainConfig(**ckpt["config"])
    if config.model != "acn":
        raise SystemExit("daydreams need an ACN checkpoint (the VAE has no conditional prior)")
    data = load(config.data)
    model = config.build(data.train_x.shape[0], data.image_shape)
    model.load_state_dict(ckpt["model"])
    start = data.test_x[: args.chains]
    chains = model.daydream(start, args.steps, torch.Generator().manual_seed(args.seed))
    save_grid(chains.transpose(0, 1), args.out)  # one row per chain
    print(f"wrote {args.out}: {args.chains} chains of {args.steps} steps")


if __name__ == "__main__":
    main()

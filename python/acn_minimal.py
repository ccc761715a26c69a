"""The smallest useful ACN training script, built from the drop-in modules (no acn-train).

Trains an ACN on the embedded 5,000 MNIST digits for a few passes and prints the loss terms.
Run: python python/acn_minimal.py [--epochs 3]
"""

from __future__ import annotations

import argparse

import torch

from acn_kernels import ACN, CodeBank, MixturePrior
from acn_kernels.acn import rng
from acn_kernels.acn.data import load_default
from acn_kernels.acn.evaluate import heldout_terms
from acn_kernels.acn.networks import MLPDecoder, MLPEncoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    data = load_default()                       # binarised, 4,000 train / 1,000 held out
    n, code_dim = data.train_x.shape[0], 16
    model = ACN(
        encoder=MLPEncoder(code_dim),           # x -> code (posterior N(code, I))
        decoder=MLPDecoder(code_dim),           # z -> Bernoulli logits
        prior=MixturePrior(code_dim, components=3),
        bank=CodeBank(n, code_dim, k=5, seed=args.seed),  # one code per training example
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(args.epochs):
        order = rng.permutation(args.seed, model.pass_index, n)
        for s in range(0, n, 128):
            idx = order[s : s + 128]
            terms = model(data.train_x[idx], idx)   # neighbours in batch order, fused KL
            opt.zero_grad()
            terms.loss.mean().backward()
            opt.step()
        model.new_pass()                           # clears the used mask
        h = heldout_terms(model, data.test_x)
        print(f"pass {model.pass_index}: train {terms.loss.mean():.1f} nats (last batch); held out "
              f"{h['test_loss']:.1f} = KL {h['test_kl']:.1f} + recon {h['test_recon']:.1f}")


if __name__ == "__main__":
    main()

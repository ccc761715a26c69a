"""Porting an existing ACN codebase onto acn-kernels, worked through (docs/acn.md, "Porting an
existing ACN codebase").

``original_step`` is written the way public MLP ACN implementations are: a data set of
(image, label) without example indices (so the loop numbers them itself), a code memory tensor
written in the training step, each code's neighbour found with scikit-learn's NearestNeighbors one
query at a time (refitted each pass), a Gaussian posterior with a learned log-scale, one Gaussian
per dimension as the prior, the KL from torch.distributions, evaluation at z = mu. ``ported_step``
is the same model on the library; its changes are marked PORT 1-4.

Run: python python/port_example.py [--epochs 2] [--steps N] [--original]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal
from torch.utils.data import DataLoader, TensorDataset

from acn_kernels import CodeBank, acn_kl, as_mixture, gaussian_kl
from acn_kernels.acn import IndexedDataset
from acn_kernels.acn.data import load_default

CODE, K, BATCH = 16, 5, 128


class Net(nn.Module):
    """Encoder x -> (mu, log_sigma), decoder z -> Bernoulli logits, prior c-hat -> (mean, log-scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 2 * CODE))
        self.dec = nn.Sequential(nn.Linear(CODE, 512), nn.ReLU(), nn.Linear(512, 784))
        self.prior = nn.Sequential(nn.Linear(CODE, 512), nn.Tanh(), nn.Linear(512, 2 * CODE))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_sigma = self.enc(x).chunk(2, -1)
        return mu, log_sigma.clamp(-6, 2)

    def prior_params(self, c_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_scale = self.prior(c_hat).chunk(2, -1)
        return mean, 4 * torch.tanh(log_scale / 4)

    def recon(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(self.dec(z), x.flatten(1), reduction="none").sum(-1)


# ------------------------------------------------------------------------------------------------
# The original


class WithIndex(torch.utils.data.Dataset):
    """What the original wrote by hand so that it could write its code memory."""

    def __init__(self, base: torch.utils.data.Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        return (*self.base[i], i)


def original_step(net: Net, memory: torch.Tensor, knn, x: torch.Tensor, index: torch.Tensor,
                  gen: torch.Generator) -> torch.Tensor:
    """The per-example loss [B] of the original (memory [N, D] written in place)."""
    mu, log_sigma = net.encode(x)
    picks = []
    for q in mu.detach().numpy():  # one query at a time
        _, cand = knn.kneighbors(q[None], K + 1)
        # Drops the first hit as "self" (it is not, once the code moved since the fit) and has no
        # unique-neighbour rule: two examples may share a neighbour in one pass.
        picks.append(cand[0, 1 + int(torch.randint(K, (1,), generator=gen))])
    c_hat = memory[torch.tensor(np.array(picks))]
    z = mu + log_sigma.exp() * torch.randn(mu.shape, generator=gen)
    mean, log_scale = net.prior_params(c_hat)
    kl = (Normal(mu, log_sigma.exp()).log_prob(z) - Normal(mean, log_scale.exp()).log_prob(z)).sum(-1)
    memory[index] = mu.detach()
    return kl + net.recon(z, x)


# ------------------------------------------------------------------------------------------------
# The port


def ported_step(net: Net, bank: CodeBank, x: torch.Tensor, index: torch.Tensor,
                gen: torch.Generator) -> torch.Tensor:
    """The same loss [B] on the library."""
    mu, log_sigma = net.encode(x)
    bank.update(index, mu)  # PORT 2: where the original wrote memory[index] = mu.detach()
    nb = bank.pick(index)   # PORT 3: where it searched one query at a time (the batch order rule)
    z = mu + log_sigma.exp() * torch.randn(mu.shape, generator=gen)
    # PORT 4: the fused KL estimate with q's learned log-scale; one Gaussian as an M = 1 mixture.
    kl = acn_kl(z, mu, *as_mixture(*net.prior_params(nb.codes)), posterior_log_scale=log_sigma)
    return kl + net.recon(z, x)


@torch.no_grad()
def heldout(net: Net, bank: CodeBank, x: torch.Tensor, gen: torch.Generator) -> dict[str, float]:
    """Held-out nats per digit, c-hat the nearest training code. The original evaluated at
    z = mu; there the one-sample KL estimate is not the KL (its log q term is q's density at the
    mode), so ``test_kl`` is the closed form (gaussian_kl), and the estimate is reported beside
    it, at z ~ q (mean and spread around the closed form) and at z = mu."""
    mu, log_sigma = net.encode(x)
    c_hat = bank.codes[bank.search(mu, 1).indices[:, 0]]  # search's dists are squared distances
    prior = net.prior_params(c_hat)
    exact = gaussian_kl(mu, *prior, posterior_log_scale=log_sigma)
    z = mu + log_sigma.exp() * torch.randn(mu.shape, generator=gen)
    sampled = acn_kl(z, mu, *as_mixture(*prior), posterior_log_scale=log_sigma)
    at_mu = acn_kl(mu, mu, *as_mixture(*prior), posterior_log_scale=log_sigma)
    return {"test_kl": float(exact.mean()), "test_kl_sampled": float(sampled.mean()),
            "sampled_spread": float((sampled - exact).std()), "test_kl_at_mu": float(at_mu.mean()),
            "negative_at_mu": float((at_mu < 0).double().mean()), "test_recon": float(net.recon(mu, x).mean())}


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=0, help="stop after this many steps (0 = none)")
    ap.add_argument("--original", action="store_true", help="run the original loop instead of the port")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    data = load_default()
    train_x, n = data.train_x, data.train_x.shape[0]
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    memory = torch.randn(n, CODE, generator=gen)
    if args.original:
        from sklearn.neighbors import NearestNeighbors

        loader = DataLoader(WithIndex(TensorDataset(train_x, data.train_y)), batch_size=BATCH, shuffle=True,
                            generator=gen)
    else:
        # PORT 1: the library adds the example index; a DataLoader yields (index, x, y).
        loader = DataLoader(IndexedDataset(TensorDataset(train_x, data.train_y)), batch_size=BATCH,
                            shuffle=True, generator=gen)
        bank = CodeBank.from_codes(memory, k=K)  # PORT 2: the bank starts from the existing codes
    step, start, out = 0, time.perf_counter(), {}
    for _ in range(args.epochs):
        if args.original:
            knn = NearestNeighbors(n_neighbors=K + 1).fit(memory.numpy())
        for batch in loader:
            if args.original:
                x, _, index = batch
                loss = original_step(net, memory, knn, x, index, gen)
            else:
                index, x, _ = batch
                loss = ported_step(net, bank, x, index, gen)
            opt.zero_grad()
            loss.mean().backward()
            opt.step()
            step += 1
            out["train_loss"] = float(loss.detach().mean())
            if step == args.steps:
                break
        if not args.original:
            bank.new_pass()  # PORT 3: a pass ends: clear the used mask (a forgotten one warns)
        if step == args.steps:
            break
    out["seconds_per_step"] = (time.perf_counter() - start) / max(step, 1)
    if args.original:
        bank = CodeBank.from_codes(memory, k=K)  # only to score both the same way
    out.update(heldout(net, bank, data.test_x, gen))
    print(f"{'original' if args.original else 'port'}: {step} steps, {out['seconds_per_step'] * 1e3:.1f} ms/step, "
          f"last batch {out['train_loss']:.1f} nats; held out: KL {out['test_kl']:.2f} (closed form) + recon "
          f"{out['test_recon']:.1f} at z = mu; one-sample KL {out['test_kl_sampled']:.2f} at z ~ q (spread "
          f"{out['sampled_spread']:.2f}), {out['test_kl_at_mu']:.2f} at z = mu ({out['negative_at_mu']:.1%} negative)")
    return out


if __name__ == "__main__":
    main()

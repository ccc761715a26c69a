"""One training pass of the default ACN against one pass of the same-size VAE (the same encoder,
decoder, batches, noise and Adam; the ACN adds the code bank's write, search and batch-order
resolution, the prior network and the fused KL), on the embedded 4,000 training digits.

The passes are interleaved (ACN, VAE, then VAE, ACN, ...) so that a change in the machine's load
affects both alike, and both get the same number of passes; extra_info holds the median pass
times and their ratio (ACN / VAE, the issue's "at most 1.3x" on one CPU thread), and, timed
interleaved on the trained models' shapes afterwards, what an ACN step adds per batch: the
bank's ``neighbours`` (write, search, walk) and the prior network with the KL, forward and
backward.

Run: OMP_NUM_THREADS=1 flock /tmp/acn_bench.lock pytest tests/benchmarks/bench_acn_pass.py \\
         --benchmark-enable --benchmark-json=pass.json -s
"""

from __future__ import annotations

import statistics
import time

import torch
from bench_train_step import interleaved_medians
from conftest import SMOKE

from acn_kernels.acn import rng
from acn_kernels.acn.data import load_default
from acn_kernels.acn.models import build_model

BATCH = 128
PAIRS = 1 if SMOKE else 7  # rounds of one ACN pass and one VAE pass


class Trainer:
    """One model, its Adam and the training images; :meth:`one_pass` times a pass."""

    def __init__(self, kind: str, x: torch.Tensor) -> None:
        torch.manual_seed(0)
        self.x, self.n = x, x.shape[0]
        self.model = build_model(kind, num_codes=self.n, image_shape=tuple(x.shape[1:]))
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.in_bank: list[float] = []  # per pass: seconds inside the bank's neighbours()
        if kind == "acn":
            bank, neighbours = self.model.bank, self.model.bank.neighbours

            def timed(index: torch.Tensor, codes: torch.Tensor):
                t0 = time.perf_counter()
                out = neighbours(index, codes)
                self.in_bank[-1] += time.perf_counter() - t0
                return out

            bank.neighbours = timed

    def one_pass(self) -> float:
        order = rng.permutation(0, self.model.pass_index, self.n)
        self.in_bank.append(0.0)
        t0 = time.perf_counter()
        for s in range(0, self.n, BATCH):
            idx = order[s : s + BATCH]
            terms = self.model(self.x[idx], idx)
            self.opt.zero_grad(set_to_none=True)
            terms.loss.mean().backward()
            self.opt.step()
        elapsed = time.perf_counter() - t0
        self.model.new_pass()
        return elapsed


def test_acn_pass_vs_vae_pass(benchmark):
    x = load_default().train_x
    if SMOKE:
        x = x[: 2 * BATCH]
    trainers = {kind: Trainer(kind, x) for kind in ("acn", "vae")}
    times: dict[str, list[float]] = {kind: [] for kind in trainers}
    for t in trainers.values():  # warm-up pass each, not timed
        t.one_pass()
    rounds = iter(range(PAIRS))

    def pair() -> None:
        kinds = ("acn", "vae") if next(rounds) % 2 == 0 else ("vae", "acn")
        for kind in kinds:
            times[kind].append(trainers[kind].one_pass())

    benchmark.group = f"ACN pass vs VAE pass, {x.shape[0]} images, B={BATCH}, cpu"
    benchmark.pedantic(pair, rounds=PAIRS, iterations=1)
    acn, vae = (statistics.median(times[kind]) for kind in ("acn", "vae"))
    t_nb, t_prior = interleaved_medians(additions(trainers["acn"]), 3 if SMOKE else 30)
    steps = -(-x.shape[0] // BATCH)
    benchmark.extra_info.update(op="acn_pass", impl="acn_vs_vae", images=x.shape[0], B=BATCH,
                                threads=torch.get_num_threads(), acn_pass_s=round(acn, 4),
                                vae_pass_s=round(vae, 4), ratio_acn_vae=round(acn / vae, 4),
                                neighbours_ms=round(1e3 * t_nb, 3), prior_kl_ms=round(1e3 * t_prior, 3),
                                acn_minus_vae_per_step_ms=round(1e3 * (acn - vae) / steps, 3),
                                acn_passes_s=[round(t, 4) for t in times["acn"]],
                                neighbours_per_pass_s=[round(t, 4) for t in trainers["acn"].in_bank],
                                vae_passes_s=[round(t, 4) for t in times["vae"]])
    print(f"\nACN pass {acn:.3f} s, VAE pass {vae:.3f} s (medians of {PAIRS}): ratio {acn / vae:.3f}; "
          f"per step the ACN adds {1e3 * (acn - vae) / steps:.2f} ms; neighbours {1e3 * t_nb:.2f} ms, "
          f"prior + KL fwd+bwd {1e3 * t_prior:.2f} ms; neighbours per pass (s): "
          f"{[round(t, 3) for t in trainers['acn'].in_bank]}")


def additions(trainer: Trainer) -> list:
    """What an ACN step adds to a VAE step, on one batch of the trained model: the bank's
    neighbours (the used mask restored after each call) and the prior + KL forward and backward."""
    model = trainer.model
    idx = rng.permutation(1, 0, trainer.n)[:BATCH]
    with torch.no_grad():
        code = model.encoder(trainer.x[idx])
    c_hat = model.bank.neighbours(idx, code).codes
    used = model.bank.used.clone()

    def neighbours() -> None:
        model.bank.neighbours(idx, code)
        model.bank.used.copy_(used)

    def prior() -> None:
        z = (code + torch.randn_like(code)).requires_grad_()
        model.prior.kl(z, code, c_hat).sum().backward()

    return [neighbours, prior]

"""One training pass of the default ACN against one pass of the same-size VAE (the same encoder,
decoder, batches, noise and Adam; the ACN adds the code bank's write, search and batch-order
resolution, the prior network and the fused KL), on the embedded 4,000 training digits.

Both train with the training loop's own step (:func:`acn_kernels.acn.train.train_step`). The
passes are interleaved (ACN, VAE, then VAE, ACN, ...) so that a change in the machine's load
affects both alike, and both get the same number of passes; extra_info holds the median pass
times and their ratio (ACN / VAE, the issue's "at most 1.3x" on one CPU thread); where each
model's pass goes (``phases_s``, seconds per pass, medians over the timed passes: encoder,
the bank's ``neighbours`` (write, search, walk), the prior network's forward, the fused KL, the
decoder with its likelihood, Adam, and "backward" = the rest of the step: the backward pass and
the few small ops around it); and, timed interleaved on the trained models' shapes afterwards,
what an ACN step adds per batch: the bank's ``neighbours`` and the prior network with the KL,
forward and backward.

Run: OMP_NUM_THREADS=1 flock /tmp/acn_bench.lock pytest tests/benchmarks/bench_acn_pass.py \\
         --benchmark-enable --benchmark-json=pass.json -s
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from bench_train_step import interleaved_medians
from conftest import SMOKE

from acn_kernels.acn import rng
from acn_kernels.acn.data import load_default
from acn_kernels.acn.models import build_model
from acn_kernels.acn.train import train_step

BATCH = 128
PAIRS = 1 if SMOKE else 7  # rounds of one ACN pass and one VAE pass


PHASES = ("encoder", "neighbours", "prior", "kl", "decoder", "adam", "backward")
"""Where a pass goes (``Trainer.phases``); "kl" is the fused KL op alone (the prior's ``kl``
less its forward), "backward" the pass less every other phase."""


class Trainer:
    """One model, its Adam and the training images; :meth:`one_pass` times a pass and its phases."""

    def __init__(self, kind: str, x: torch.Tensor) -> None:
        torch.manual_seed(0)
        self.x, self.n = x, x.shape[0]
        self.model = build_model(kind, num_codes=self.n, image_shape=tuple(x.shape[1:]))
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.phases: dict[str, list[float]] = {name: [] for name in PHASES}  # per pass, seconds
        self._inside: dict[str, float] = {}
        m = self.model
        timed = [(m.encoder, "forward", "encoder"), (m.decoder, "forward", "decoder"), (self.opt, "step", "adam")]
        if kind == "acn":
            timed += [(m.bank, "neighbours", "neighbours"), (m.prior, "forward", "prior"), (m.prior, "kl", "prior_kl")]
        for obj, attr, name in timed:
            setattr(obj, attr, self._timed(getattr(obj, attr), name))

    def _timed(self, fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self._inside[name] = self._inside.get(name, 0.0) + time.perf_counter() - t0
            return out
        return call

    @property
    def in_bank(self) -> list[float]:
        """Per pass: seconds inside the bank's neighbours()."""
        return self.phases["neighbours"]

    def one_pass(self) -> float:
        order = rng.permutation(0, self.model.pass_index, self.n)
        self._inside = {}
        t0 = time.perf_counter()
        for s in range(0, self.n, BATCH):
            idx = order[s : s + BATCH]
            train_step(self.model, self.opt, self.x[idx], idx)
        elapsed = time.perf_counter() - t0
        self.model.new_pass()
        inside = dict(self._inside)
        inside["kl"] = inside.pop("prior_kl", 0.0) - inside.get("prior", 0.0)
        for name in PHASES[:-1]:
            self.phases[name].append(inside.get(name, 0.0))
        self.phases["backward"].append(elapsed - sum(inside.values()))
        return elapsed


def test_acn_pass_vs_vae_pass(benchmark):
    x = load_default().train_x
    if SMOKE:
        x = x[: 2 * BATCH]
    trainers = {kind: Trainer(kind, x) for kind in ("acn", "vae")}
    times: dict[str, list[float]] = {kind: [] for kind in trainers}
    for t in trainers.values():  # warm-up pass each, not timed
        t.one_pass()
        for ts in t.phases.values():
            ts.clear()
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
    phases = {kind: {name: round(statistics.median(ts), 4) for name, ts in t.phases.items()}
              for kind, t in trainers.items()}
    benchmark.extra_info.update(op="acn_pass", impl="acn_vs_vae", images=x.shape[0], B=BATCH,
                                threads=torch.get_num_threads(), acn_pass_s=round(acn, 4),
                                vae_pass_s=round(vae, 4), ratio_acn_vae=round(acn / vae, 4),
                                neighbours_ms=round(1e3 * t_nb, 3), prior_kl_ms=round(1e3 * t_prior, 3),
                                acn_minus_vae_per_step_ms=round(1e3 * (acn - vae) / steps, 3),
                                phases_s=phases, acn_passes_s=[round(t, 4) for t in times["acn"]],
                                neighbours_per_pass_s=[round(t, 4) for t in trainers["acn"].in_bank],
                                vae_passes_s=[round(t, 4) for t in times["vae"]])
    print(f"\nACN pass {acn:.3f} s, VAE pass {vae:.3f} s (medians of {PAIRS}): ratio {acn / vae:.3f}; "
          f"per step the ACN adds {1e3 * (acn - vae) / steps:.2f} ms; neighbours {1e3 * t_nb:.2f} ms, "
          f"prior + KL fwd+bwd {1e3 * t_prior:.2f} ms; neighbours per pass (s): "
          f"{[round(t, 3) for t in trainers['acn'].in_bank]}")
    print("seconds per pass (medians): " + "; ".join(
        f"{name} {phases['acn'][name]:.3f} / {phases['vae'][name]:.3f}" for name in PHASES) + " (ACN / VAE)")


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

"""The training loop, checkpoints (atomic, resumable mid-pass), the command lines, and the data
sources (embedded default, IDX files raw and gzipped, user tensors)."""

from __future__ import annotations

import gzip
import json
import os
import stat
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from acn_kernels.acn import cli, evaluate, train
from acn_kernels.acn import data as acn_data
from acn_kernels.acn.checkpoint import CHECKPOINT, FORMAT_VERSION, atomic_write, load_checkpoint, save_checkpoint
from acn_kernels.acn.config import TrainConfig


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models here run fastest on one thread, and on a shared 2-core runner extra
    threads that compete for cores slow them many-fold."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mnist5k() -> acn_data.ImageData:
    return acn_data.load_default()


@pytest.fixture(scope="module")
def tiny(mnist5k) -> acn_data.ImageData:
    """200 training and 50 held-out digits."""
    d = mnist5k
    return acn_data.ImageData(d.train_x[:200], d.train_y[:200], d.test_x[:50], d.test_y[:50])


def run(tiny, out, steps=None, epochs=None, resume=None, **cfg):
    config = TrainConfig(batch_size=64, minutes=None, steps=steps, epochs=epochs, checkpoint_every=3, **cfg)
    model = config.build(200, tiny.image_shape)
    hist = train.train(model, tiny, config, out, resume=resume, progress=False)
    return model, hist


# ------------------------------------------------------------------------------------------------
# Data


def test_default_data_is_binarised_and_split(mnist5k):
    d = mnist5k
    assert d.train_x.shape == (4000, 1, 28, 28) and d.test_x.shape == (1000, 1, 28, 28)
    assert d.train_x.dtype == torch.float32 and bool(((d.train_x == 0) | (d.train_x == 1)).all())
    assert torch.equal(torch.bincount(torch.cat([d.train_y, d.test_y])), torch.full((10,), 500))
    assert 0.1 < float(d.train_x.mean()) < 0.2  # MNIST: about 13% of pixels are on


def write_idx(path, arr: np.ndarray, code: int, gz: bool) -> None:
    big = arr.astype(arr.dtype.newbyteorder(">"))
    blob = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + big.tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(blob)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files(tmp_path, gz):
    rs = np.random.RandomState(0)
    imgs = {s: rs.randint(0, 256, (n, 4, 5)).astype(np.uint8) for s, n in (("train", 6), ("t10k", 3))}
    labels = {s: rs.randint(0, 10, len(v)).astype(np.uint8) for s, v in imgs.items()}
    sfx = ".gz" if gz else ""
    for s in imgs:
        write_idx(tmp_path / f"{s}-images-idx3-ubyte{sfx}", imgs[s], 0x08, gz)
        write_idx(tmp_path / f"{s}-labels-idx1-ubyte{sfx}", labels[s], 0x08, gz)
    d = acn_data.load(str(tmp_path))
    assert d.train_x.shape == (6, 1, 4, 5) and d.test_x.shape == (3, 1, 4, 5)
    assert torch.equal(d.train_x[:, 0], torch.from_numpy(imgs["train"] >= 128).float())
    assert torch.equal(d.test_y, torch.from_numpy(labels["t10k"].astype(np.int64)))


def test_read_idx_types_and_errors(tmp_path):
    arr = np.arange(12, dtype=np.int32).reshape(3, 4) - 5
    write_idx(tmp_path / "a", arr, 0x0C, gz=False)
    assert np.array_equal(acn_data.read_idx(tmp_path / "a"), arr)
    f64 = np.linspace(-1, 1, 5)
    write_idx(tmp_path / "b", f64, 0x0E, gz=True)
    assert np.array_equal(acn_data.read_idx(tmp_path / "b"), f64)
    (tmp_path / "c").write_bytes(b"\x01\x02\x08\x01")
    with pytest.raises(ValueError, match="not an IDX file"):
        acn_data.read_idx(tmp_path / "c")
    (tmp_path / "d").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="expected 10 data bytes"):
        acn_data.read_idx(tmp_path / "d")
    with pytest.raises(FileNotFoundError, match="train-images"):
        acn_data.load_mnist_idx(tmp_path)


def test_user_tensors(tmp_path):
    x = (torch.rand(30, 6, 6) > 0.5).to(torch.uint8)
    d = acn_data.from_tensors(x, torch.arange(30) % 3)
    assert d.train_x.shape == (27, 1, 6, 6) and d.test_x.shape == (3, 1, 6, 6)
    assert d.test_y.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="binarised"):
        acn_data.from_tensors(torch.rand(10, 6, 6))
    with pytest.raises(ValueError, match="train_y"):
        acn_data.from_tensors(x, torch.arange(29))
    torch.save({"train_x": x[:20], "test_x": x[20:]}, tmp_path / "mine.pt")
    d = acn_data.load(str(tmp_path / "mine.pt"))
    assert d.train_x.shape == (20, 1, 6, 6) and d.test_x.shape == (10, 1, 6, 6) and d.train_y is None
    with pytest.raises(FileNotFoundError, match="--data"):
        acn_data.load(str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------------------
# The loop and its checkpoints


def test_training_smoke_and_outputs(tiny, tmp_path):
    model, hist = run(tiny, str(tmp_path), epochs=2)
    assert [h["epoch"] for h in hist] == [1, 2] and hist[-1]["step"] == 8  # ceil(200 / 64) = 4 steps a pass
    assert hist[1]["train_loss"] < hist[0]["train_loss"]
    for h in hist:
        assert h["train_loss"] == pytest.approx(h["train_kl"] + h["train_recon"])
        assert h["test_loss"] == pytest.approx(h["test_kl"] + h["test_recon"])
    assert model.pass_index == 2 and not bool(model.bank.used.any())
    assert json.loads((tmp_path / "metrics.json").read_text())["history"] == hist
    assert (tmp_path / "metrics.png").stat().st_size > 0
    ckpt = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert ckpt["format_version"] == FORMAT_VERSION
    assert {"config", "model", "optimizer", "position", "rng", "history"} <= ckpt.keys()
    assert {"bank.codes", "bank.used", "bank._extra_state"} <= ckpt["model"].keys()
    assert ckpt["position"]["offset"] == 0 and ckpt["position"]["pass_index"] == 2


def test_seeded_runs_are_reproducible(tiny):
    a, _ = run(tiny, None, steps=3, seed=4)
    b, _ = run(tiny, None, steps=3, seed=4)
    c, _ = run(tiny, None, steps=3, seed=5)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor))
    assert not torch.equal(sa["encoder.net.1.weight"], sc["encoder.net.1.weight"])


@pytest.mark.parametrize("stop", [6, 8])  # mid-pass (2 of 4 steps into pass 2), and at a pass end
def test_resume_matches_uninterrupted(tiny, tmp_path, stop):
    full, full_hist = run(tiny, str(tmp_path / "full"), steps=11)
    run(tiny, str(tmp_path / "part"), steps=stop)
    ckpt = load_checkpoint(str(tmp_path / "part" / CHECKPOINT))
    assert ckpt["position"]["step"] == stop
    resumed, resumed_hist = run(tiny, str(tmp_path / "part"), steps=11, resume=ckpt)
    assert resumed_hist == [{**h, "elapsed_s": r["elapsed_s"]} for h, r in zip(full_hist, resumed_hist,
                                                                                   strict=True)]
    sf, sr = full.state_dict(), resumed.state_dict()
    assert sf.keys() == sr.keys()
    for key in sf:
        if isinstance(sf[key], torch.Tensor):
            assert torch.equal(sf[key], sr[key]), key
        else:
            assert sf[key] == sr[key], key
    a = load_checkpoint(str(tmp_path / "full" / CHECKPOINT))
    b = load_checkpoint(str(tmp_path / "part" / CHECKPOINT))
    for key in ("offset", "step", "pass_index"):
        assert a["position"][key] == b["position"][key]
    assert torch.equal(a["position"]["order"], b["position"]["order"])
    assert torch.equal(a["position"]["sums"], b["position"]["sums"])


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint({"format_version": FORMAT_VERSION, "v": torch.arange(3)}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"v": torch.arange(5)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["v"], torch.arange(3))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # the temporary file was removed


def test_killed_checkpoint_write_keeps_the_previous_one(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint({"format_version": FORMAT_VERSION, "v": torch.arange(3)}, path)
    script = textwrap.dedent(f"""
        import os, signal, torch
        from acn_kernels.acn.checkpoint import save_checkpoint
        def dying_save(obj, f):
            f.write(b"half a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        save_checkpoint({{"v": torch.arange(5)}}, {path!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    assert torch.equal(load_checkpoint(path)["v"], torch.arange(3))


def test_bad_checkpoint_version(tmp_path):
    torch.save({"format_version": 99}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="format 99"):
        load_checkpoint(str(tmp_path / "x.pt"))


# ------------------------------------------------------------------------------------------------
# The commands


def test_commands_train_resume_and_eval(tiny, tmp_path):
    blob = {"train_x": tiny.train_x[:120], "train_y": tiny.train_y[:120],
            "test_x": tiny.test_x[:40], "test_y": tiny.test_y[:40]}
    torch.save(blob, tmp_path / "digits.pt")
    out = str(tmp_path / "run")
    args = ["--data", str(tmp_path / "digits.pt"), "--out", out, "--batch-size", "50", "--no-progress",
            "--code-dim", "8"]
    assert cli.train_main([*args, "--steps", "4"]) == 0
    assert load_checkpoint(os.path.join(out, CHECKPOINT))["position"]["step"] == 4
    assert cli.train_main([*args, "--steps", "7", "--resume"]) == 0
    ckpt = load_checkpoint(os.path.join(out, CHECKPOINT))
    assert ckpt["position"]["step"] == 7 and ckpt["config"]["code_dim"] == 8
    for name in ("reconstructions.png", "daydreams.png", "neighbours.png", "metrics.png", "metrics.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    final = json.loads(open(os.path.join(out, "metrics.json")).read())["final"]
    assert {"heldout", "representation"} <= final.keys()

    vae_out = str(tmp_path / "vae")
    assert cli.train_main(["--data", str(tmp_path / "digits.pt"), "--out", vae_out, "--model", "vae",
                       "--steps", "3", "--batch-size", "50", "--no-progress", "--no-report"]) == 0
    ev = str(tmp_path / "eval")
    assert cli.eval_main([out, vae_out, "--out", ev, "--daydream-steps", "2"]) == 0
    res = json.loads(open(os.path.join(ev, "eval.json")).read())
    assert len(res) == 4 and "pixels" in res and "pca16" in res
    assert os.path.getsize(os.path.join(ev, "run", "daydreams.png")) > 0
    assert "| pixels |" in open(os.path.join(ev, "eval.md")).read()


def test_heldout_terms_are_reproducible(tiny):
    model, _ = run(tiny, None, steps=2)
    a = evaluate.heldout_terms(model, tiny.test_x)
    b = evaluate.heldout_terms(model, tiny.test_x, batch=7)
    assert a == pytest.approx(b, rel=1e-5)
    assert a["test_loss"] == pytest.approx(a["test_kl"] + a["test_recon"], rel=1e-5)


# ------------------------------------------------------------------------------------------------
# Issue 9: one atomic write, one command


@pytest.mark.parametrize(("content", "want"), [
    ("text, UTF-8: \u00fc", "text, UTF-8: \u00fc".encode()),
    (b"\x00\x01 bytes", b"\x00\x01 bytes"),
    (lambda f: f.write(b"by a writer"), b"by a writer"),
], ids=["text", "bytes", "writer"])
def test_atomic_write_syncs_the_file_then_its_folder(tmp_path, monkeypatch, content, want):
    synced = []
    fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        fsync(fd)

    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    monkeypatch.setattr(os, "fsync", recording_fsync)
    atomic_write(str(path), content)
    assert synced == ["file", "folder"]  # the data before the rename, the rename itself after
    assert path.read_bytes() == want
    assert os.listdir(tmp_path) == ["out.bin"]


def test_epochs_zero_means_no_limit(tiny, tmp_path):
    """acn-train --epochs 0: no pass limit (the other budgets decide), under torchrun too
    (test_distributed.py runs the same command on 2 ranks)."""
    torch.save({"train_x": tiny.train_x[:100], "test_x": tiny.test_x[:20]}, tmp_path / "digits.pt")
    out = str(tmp_path / "run")
    assert cli.train_main(["--data", str(tmp_path / "digits.pt"), "--out", out, "--batch-size", "50",
                           "--code-dim", "4", "--epochs", "0", "--steps", "5", "--minutes", "0",
                           "--no-progress", "--no-report"]) == 0
    ckpt = load_checkpoint(os.path.join(out, CHECKPOINT))
    assert ckpt["position"]["step"] == 5 and len(ckpt["history"]) == 2 and ckpt["config"]["epochs"] is None

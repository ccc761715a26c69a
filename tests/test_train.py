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
    with pytest.raises(ValueError, match=r"truncated IDX file \(expected 10 more bytes, found 3\)"):
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
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.arange(3))
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
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.arange(3))


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


# ------------------------------------------------------------------------------------------------
# Issue 16: a resumed position is checked against the data; the loop cannot spin on empty batches


@pytest.fixture
def no_hang():
    """Fail (instead of hanging the suite) if the test body runs past 60 s."""
    import signal

    def alarm(signum, frame):
        raise TimeoutError("the training loop did not end")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def resume_on(data, ckpt, *, epochs=2, model="acn"):
    config = TrainConfig(**{**ckpt["config"], "epochs": epochs, "steps": None, "minutes": None})
    net = config.build(data.train_x.shape[0], data.image_shape)
    return train.train(net, data, config, None, resume=ckpt, progress=False)


@pytest.mark.parametrize("model", ["acn", "vae"])
def test_resume_on_data_that_grew_is_refused(tiny, tmp_path, no_hang, model):
    from acn_kernels.acn.checkpoint import CheckpointError

    run(tiny, str(tmp_path), steps=2, model=model)
    ckpt = load_checkpoint(str(tmp_path / CHECKPOINT))
    grown = acn_data.ImageData(torch.cat([tiny.train_x, tiny.train_x[:20]]), None, tiny.test_x, None)
    with pytest.raises(CheckpointError, match="covers 200 examples but the training data has 220"):
        resume_on(grown, ckpt)


@pytest.mark.parametrize(("edit", "match"), [
    ({"offset": 500}, r"offset must lie in \[0, 200\), got 500"),
    ({"offset": 200}, r"offset must lie in \[0, 200\)"),
    ({"offset": -64}, r"offset must lie in \[0, 200\)"),
    ({"order": torch.arange(200)}, "order is not pass 0's order of 200 examples with seed 0"),
    ({"order": torch.zeros(200, dtype=torch.int64)}, "order is not pass 0's order"),
    ({"order": torch.arange(200).float()}, "order must be a 1-D int64 tensor"),
    ({"pass_index": -1}, "pass_index must be >= 0"),
    ({"step": -3}, "step must be >= 0"),
    ({"sums": torch.zeros(3)}, r"sums must be a float64 tensor of shape \[4\]"),
], ids=["offset-beyond", "offset-n", "offset-negative", "order-not-permuted", "order-not-permutation",
        "order-float", "pass-negative", "step", "sums"])
def test_inconsistent_position_is_refused(tiny, tmp_path, no_hang, edit, match):
    from acn_kernels.acn.checkpoint import CheckpointError

    run(tiny, str(tmp_path), steps=2, model="vae")
    ckpt = load_checkpoint(str(tmp_path / CHECKPOINT))
    ckpt["position"].update(edit)
    with pytest.raises(CheckpointError, match=match):
        resume_on(tiny, ckpt)


def test_position_and_model_at_different_passes_are_refused(tiny, tmp_path):
    from acn_kernels.acn import rng
    from acn_kernels.acn.checkpoint import CheckpointError

    run(tiny, str(tmp_path), steps=2)
    ckpt = load_checkpoint(str(tmp_path / CHECKPOINT))
    ckpt["position"].update(pass_index=3, order=rng.permutation(0, 3, 200))  # a valid order of pass 3
    with pytest.raises(CheckpointError, match="position is at pass 3 but its model state at pass 0"):
        resume_on(tiny, ckpt)


def test_state_that_does_not_fit_is_a_checkpoint_error(tiny, tmp_path):
    from acn_kernels.acn.checkpoint import CheckpointError

    run(tiny, str(tmp_path), steps=2)
    ckpt = load_checkpoint(str(tmp_path / CHECKPOINT))
    ckpt["config"]["code_dim"] = 8
    with pytest.raises(CheckpointError, match="state does not fit the model"):
        resume_on(tiny, ckpt)


def test_the_loop_cannot_spin_on_empty_batches(tiny, tmp_path, no_hang, monkeypatch):
    """Even with the position check bypassed, an empty batch ends the run with an error."""
    run(tiny, str(tmp_path), steps=2, model="vae")
    ckpt = load_checkpoint(str(tmp_path / CHECKPOINT))
    ckpt["position"]["offset"] = 500
    monkeypatch.setattr(train, "check_position", lambda *args: None)
    with pytest.raises(RuntimeError, match="no examples left at offset 500 of pass 0"):
        resume_on(tiny, ckpt)


@pytest.mark.parametrize(("field", "value"), [
    ("batch_size", 0), ("batch_size", -5), ("batch_size", 2.0), ("k", 0), ("code_dim", True),
    ("checkpoint_every", -1), ("epochs", -1), ("steps", 1.5), ("lr", float("nan")), ("lr", 0.0),
    ("minutes", -1.0), ("seed", -1),
])
def test_config_out_of_range_is_refused(tiny, no_hang, field, value):
    config = TrainConfig(batch_size=64, minutes=None, epochs=1)
    model = config.build(200, tiny.image_shape)
    setattr(config, field, value)
    with pytest.raises(ValueError, match=f"TrainConfig.{field} must be"):
        train.train(model, tiny, config, None, progress=False)


# ------------------------------------------------------------------------------------------------
# Issue 16: checkpoints carry a content digest and are checked against their schema


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory) -> str:
    """A real checkpoint (an ACN after 2 steps)."""
    out = tmp_path_factory.mktemp("saved")
    run(tiny, str(out), steps=2)
    return str(out / CHECKPOINT)


def test_checkpoint_holds_a_digest_of_its_content(saved):
    from acn_kernels.acn.checkpoint import content_digest

    raw = torch.load(saved, weights_only=True)
    assert raw["format_version"] == FORMAT_VERSION == 2 and raw["sha256"] == content_digest(raw)
    ckpt = load_checkpoint(saved)
    assert "sha256" not in ckpt and content_digest(ckpt) == raw["sha256"]  # verified, then removed


def test_flipped_bytes_are_refused(saved, tmp_path):
    """One bit of the bank's codes changed in the file: torch.load itself does not notice."""
    from acn_kernels.acn.checkpoint import CheckpointError

    blob = bytearray(open(saved, "rb").read())
    codes = torch.load(saved, weights_only=True)["model"]["bank.codes"]
    at = bytes(blob).find(codes[:4].numpy().tobytes())
    assert at > 0
    blob[at + 5] ^= 0x01
    path = tmp_path / "flipped.pt"
    path.write_bytes(bytes(blob))
    assert not torch.equal(torch.load(path, weights_only=True)["model"]["bank.codes"], codes)  # loads silently
    with pytest.raises(CheckpointError, match=r"flipped.pt: the content does not match its digest"):
        load_checkpoint(str(path))


@pytest.mark.parametrize("cut", ["empty", "half", "junk"])
def test_unreadable_files_are_checkpoint_errors(saved, tmp_path, cut):
    from acn_kernels.acn.checkpoint import CheckpointError

    blob = open(saved, "rb").read()
    path = tmp_path / "bad.pt"
    path.write_bytes({"empty": b"", "half": blob[: len(blob) // 2], "junk": b"junk" * 50}[cut])
    with pytest.raises(CheckpointError, match=r"bad.pt: not a readable checkpoint"):
        load_checkpoint(str(path))


@pytest.mark.parametrize(("edit", "match"), [
    (lambda c: c.pop("position"), "not a complete checkpoint: no 'position'"),
    (lambda c: c.pop("optimizer"), "no 'optimizer'"),
    (lambda c: c["position"].pop("offset"), "no 'position.offset'"),
    (lambda c: c["rng"].pop("torch"), "no 'rng.torch'"),
    (lambda c: c["optimizer"].pop("param_groups"), "no 'optimizer.param_groups'"),
    (lambda c: c["position"].update(offset="3"), "position.offset must be int, got str"),
    (lambda c: c["position"].update(step=True), "position.step must be int, got bool"),
    (lambda c: c.update(history={}), "history must be list, got dict"),
    (lambda c: c.update(model=[]), "model must be dict, got list"),
    (lambda c: c.update(world_size=0), "world_size must be >= 1"),
    (lambda c: c["config"].update(hidden=3), r"config has unknown fields \['hidden'\]"),
    (lambda c: c["config"].update(batch_size=0), "config: TrainConfig.batch_size must be"),
], ids=["position", "optimizer", "offset", "rng", "param_groups", "offset-str", "step-bool", "history",
        "model", "world_size", "config-unknown", "config-range"])
def test_schema_is_checked(saved, tmp_path, edit, match):
    from acn_kernels.acn.checkpoint import CheckpointError

    ckpt = load_checkpoint(saved)
    edit(ckpt)
    path = str(tmp_path / "edited.pt")
    save_checkpoint(ckpt, path)  # a valid digest: only the schema can refuse it
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(path)
    assert "edited.pt" in str(info.value)


def test_format_1_loads_with_a_warning_and_resumes(tiny, saved, tmp_path):
    raw = torch.load(saved, weights_only=True)
    del raw["sha256"]
    raw["format_version"] = 1
    torch.save(raw, tmp_path / "v1.pt")
    with pytest.warns(UserWarning, match="format 1 has no content digest"):
        ckpt = load_checkpoint(str(tmp_path / "v1.pt"))
    assert ckpt["position"]["step"] == 2
    _, hist = run(tiny, str(tmp_path / "resumed"), steps=4, resume=ckpt)
    assert torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=True)["format_version"] == 2


# ------------------------------------------------------------------------------------------------
# Issue 12: the loop's step, its sync points (where deferred bank errors are raised) and the
# capturable mode


def capturable_config(**overrides) -> TrainConfig:
    """Tiny's pass is 13 steps of 16: step 10 logs, step 13 ends the pass."""
    options = {"batch_size": 16, "minutes": None, "steps": 25, "checkpoint_every": 0, "capturable": True}
    return TrainConfig(**{**options, **overrides})


def corrupt_batch(monkeypatch, model, at: int) -> list[int]:
    """From now on, model's forward pass ``at`` (1-based) gets a batch whose second index repeats
    its first; returns the list that counts forward passes. The bank is made to check on the
    device, as a CUDA bank does (a CPU bank checks at once)."""
    monkeypatch.setattr(model.bank, "_defers_checks", lambda: True)
    calls: list[int] = []
    forward = model.forward

    def counted(x, index):
        calls.append(1)
        if len(calls) == at:
            index = index.clone()
            index[1] = index[0]
        return forward(x, index)

    monkeypatch.setattr(model, "forward", counted)
    return calls


@pytest.mark.parametrize(("at", "overrides", "raised_at"), [
    (3, {}, 10),                        # the next log line
    (3, {"checkpoint_every": 5}, 5),    # the next checkpoint (none is written)
    (3, {"steps": 7}, 7),               # the end of training
    (11, {}, 13),                       # the end of the pass
], ids=["logging", "checkpoint", "end", "pass-end"])
def test_deferred_bank_error_is_raised_at_the_next_sync_point(tiny, tmp_path, monkeypatch, at, overrides,
                                                              raised_at):
    """A bad batch on a bank that checks on the device changes nothing in the bank and the loop
    goes on without reading the device; at its next read (log, checkpoint, pass end, end) it
    raises the bank's error, before any checkpoint holds the step."""
    config = capturable_config(**overrides)
    model = config.build(200, tiny.image_shape)
    calls = corrupt_batch(monkeypatch, model, at)
    out = str(tmp_path / "run")
    with pytest.raises(ValueError, match="index holds duplicate rows; each example may appear once per batch"):
        train.train(model, tiny, config, out, progress=False)
    assert len(calls) == raised_at
    assert not os.path.exists(os.path.join(out, CHECKPOINT))
    model.bank.raise_deferred_errors()  # raised once: the flag was cleared


def test_a_bank_that_checks_at_once_raises_in_the_step(tiny, monkeypatch):
    """The contrast: a CPU bank's checks are immediate, so the same bad batch raises in its step."""
    config = capturable_config(capturable=False)
    model = config.build(200, tiny.image_shape)
    calls = corrupt_batch(monkeypatch, model, 3)
    monkeypatch.setattr(model.bank, "_defers_checks", lambda: False)
    with pytest.raises(ValueError, match="index holds duplicate rows"):
        train.train(model, tiny, config, progress=False)
    assert len(calls) == 3


@pytest.mark.parametrize("model", ["acn", "vae"])
def test_a_capturable_run_trains_as_a_normal_one(tiny, tmp_path, model):
    """Four passes over 40 digits in batches of 8 (with this seed, pass 4 ends in an end-of-pass
    fallback), mid-pass checkpoints: the same history, fallbacks, weights and bank, bit for bit."""
    data = acn_data.ImageData(tiny.train_x[:40], tiny.train_y[:40], tiny.test_x[:8], tiny.test_y[:8])
    runs = {}
    for capturable in (False, True):
        config = TrainConfig(model=model, batch_size=8, seed=1, epochs=4, minutes=None, checkpoint_every=3,
                             capturable=capturable)
        m = config.build(40, data.image_shape)
        hist = train.train(m, data, config, str(tmp_path / f"run-{capturable}"), progress=False)
        if model == "acn":
            assert m.bank.capturable is capturable
        runs[capturable] = (m.state_dict(), hist)
    (plain, plain_hist), (capt, capt_hist) = runs[False], runs[True]
    assert [{k: v for k, v in h.items() if k != "elapsed_s"} for h in plain_hist] == \
        [{k: v for k, v in h.items() if k != "elapsed_s"} for h in capt_hist]
    assert plain.keys() == capt.keys()
    for name in plain:
        if isinstance(plain[name], torch.Tensor):
            assert torch.equal(plain[name], capt[name]), name
    if model == "acn":
        assert [h["fallbacks"] for h in plain_hist] == [0, 0, 0, 1]  # the fallback path ran


def test_capturable_config_is_checked(tiny):
    from acn_kernels.ops import MAX_K

    with pytest.raises(ValueError, match=rf"TrainConfig.capturable .* batch_size must be <= MAX_K - k \+ 1 = "
                                         rf"{MAX_K - 4}, got {MAX_K}"):
        TrainConfig(capturable=True, batch_size=MAX_K, k=5).validate()
    TrainConfig(capturable=True, batch_size=MAX_K - 4, k=5).validate()
    TrainConfig(capturable=True, batch_size=MAX_K, model="vae").validate()  # no bank: no limit
    with pytest.raises(ValueError, match="TrainConfig.capturable must be a bool, got 1"):
        TrainConfig(capturable=1).validate()
    config = TrainConfig(capturable=True, batch_size=16, steps=1, minutes=None)
    plain = TrainConfig(batch_size=16, steps=1, minutes=None).build(200, tiny.image_shape)
    with pytest.raises(ValueError, match="config.capturable is True but the model's bank has capturable=False"):
        train.train(plain, tiny, config, progress=False)


def test_the_step_reads_the_device_only_at_sync_points(tiny, monkeypatch):
    """Between its sync points the loop never reads a tensor's value on the host (on a GPU such a
    read is a synchronisation): a CPU stand-in for torch.cuda.set_sync_debug_mode("error"), over
    9 whole steps of the library's loop with a capturable bank that checks on the device."""
    import sys

    config = capturable_config(steps=9)
    model = config.build(200, tiny.image_shape)
    monkeypatch.setattr(model.bank, "_defers_checks", lambda: True)
    steps: list[int] = []
    reads = []
    for name in ("__bool__", "__int__", "__float__", "item", "tolist", "numpy", "cpu", "nonzero"):
        original = getattr(torch.Tensor, name)

        def read(self, *args, _original=original, _name=name, **kwargs):
            reads.append((_name, len(steps), sys._getframe(1).f_globals.get("__name__", "")))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)
    step = train.train_step

    def counted(*args, **kwargs):
        steps.append(1)
        return step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", counted)
    train.train(model, tiny, config, progress=False)
    assert len(steps) == 9
    # CPU Adam reads its step count (a CPU tensor even on a GPU: no device read); every other
    # read comes after the last step, at the end's sync point.
    assert [r for r in reads if not r[2].startswith("torch.optim")] == [("tolist", 9, "acn_kernels.acn.bank")]
    assert any(r[1] < 9 for r in reads)  # the hook sees Adam's reads within the steps

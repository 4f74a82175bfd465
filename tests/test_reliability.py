"""Reliability: exact resume after SIGKILL, SIGINT/SIGTERM checkpoints, crash-safe and verified
checkpoint files (truncation, bit flips, bad headers, full disk), and non-finite losses/gradients
in fp32 and bf16."""

import errno
import json
import logging
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from latentdiff.codecs.autoencoder import Autoencoder
from latentdiff.errors import ConfigError, ModelError, TrainingError, WriteError
from latentdiff.pipeline.config import TrainConfig, load_config
from latentdiff.training import checkpoints as ckpt
from latentdiff.training.loop import Stage, TrainLoop
from latentdiff.training.metrics import MetricsLog, read_metrics
from latentdiff.utils import files as ld_io
from latentdiff.utils import state as ld_state

ROOT = Path(__file__).resolve().parents[1]


# --- a tiny stage trained in-process (real autoencoder, synthetic 16×16 images) ----------------

def make_stage(steps=6, fault_step=None, fault="loss", seen=None, **train) -> Stage:
    """The tiny autoencoder on fixed random images; optionally a NaN loss (`fault="loss"`) or an
    infinite gradient with a finite loss (`fault="grad"`) at step `fault_step` (1-based)."""
    cfg = load_config(preset="tiny")
    cfg.autoencoder.image_channels = 1
    torch.manual_seed(0)
    ae = Autoencoder(cfg.autoencoder, (16, 16))
    images = torch.rand(64, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    calls = {"n": 0}

    def loss(idx, gen, rows):
        calls["n"] += 1
        if seen is not None:
            seen.append(torch.is_autocast_enabled("cpu"))
        noise = torch.randn((len(idx), *ae.latent_shape), generator=gen)
        per_sample, logs = ae.loss(images[idx[rows]], noise=noise[rows])
        if calls["n"] == fault_step:
            if fault == "loss":
                per_sample = per_sample * float("nan")
            else:  # the loss stays finite, its gradient does not
                per_sample.register_hook(lambda g: g * float("inf"))
        return per_sample, logs

    options = {"steps": steps, "batch_size": 8, "lr": 1e-3, "warmup_steps": 0, "ema_decay": 0.9, "log_every": 1,
               "checkpoint_every": 2, "keep_checkpoints": 10, **train}
    return Stage("autoencoder", ae, loss, len(images), TrainConfig(**options), section="autoencoder_training")


class Lines(logging.Handler):
    """The messages of the "latentdiff" loggers, whatever the CLI's configure_logging did to them."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def run(stage, run_dir, resume=False, **kw):
    """Train `stage` in RUN_DIR through the library's loop; returns the log messages."""
    kw.setdefault("precision", "fp32")
    logger, handler = logging.getLogger("latentdiff"), Lines()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        TrainLoop(stage, Path(run_dir), torch.device("cpu"), progress=False, **kw).run(resume)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return handler.lines


def tensors_equal(a: Path, b: Path, prefix=("model.", "ema.", "optim.")):
    ta, _ = ld_state.load_state(a)
    tb, _ = ld_state.load_state(b)
    keys = [k for k in ta if k.startswith(prefix)]
    assert keys and sorted(keys) == sorted(k for k in tb if k.startswith(prefix))
    return all(torch.equal(ta[k], tb[k]) for k in keys)


def losses(run_dir: Path, stage="autoencoder"):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / f"{stage}_metrics.jsonl")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step run: checkpoints at 2, 4, 6 and a per-step metrics file."""
    d = tmp_path_factory.mktemp("reference")
    run(make_stage(), d)
    return d


# --- SIGINT / SIGTERM ---------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_a_checkpoint_and_resume_is_exact(sig, reference, tmp_path):
    stage = make_stage()
    inner = stage.loss

    def loss(idx, gen, rows):  # the signal arrives during step 3 (between checkpoints)
        if loss.calls == 2:
            os.kill(os.getpid(), sig)
        loss.calls += 1
        return inner(idx, gen, rows)

    loss.calls = 0
    stage.loss = loss
    before = signal.getsignal(sig)
    with pytest.raises(KeyboardInterrupt):
        run(stage, tmp_path)
    assert signal.getsignal(sig) is before  # the caller's handler is back
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints", "autoencoder")]
    assert names == ["autoencoder-00000003.safetensors", "autoencoder-00000002.safetensors"]
    logs = run(make_stage(), tmp_path, resume=True)
    assert "resumed autoencoder from autoencoder-00000003.safetensors at step 3" in logs
    assert tensors_equal(tmp_path / "checkpoints" / "autoencoder-00000006.safetensors",
                         reference / "checkpoints" / "autoencoder-00000006.safetensors")
    assert losses(tmp_path) == losses(reference)


def test_log_sums_survive_a_resume_between_log_lines(tmp_path):
    """Checkpoints every 2 steps, log lines every 3: resumed from step 4, mid-interval, the run
    logs the same means as without the interruption."""
    run(make_stage(log_every=3), tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "checkpoints" / "autoencoder-00000006.safetensors").unlink()
    logs = run(make_stage(log_every=3), tmp_path / "b", resume=True)
    assert "resumed autoencoder from autoencoder-00000004.safetensors at step 4" in logs
    assert [s for s, _ in losses(tmp_path / "a")] == [3, 6]
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


# --- SIGKILL through the CLI ----------------------------------------------------------------------

def cli(*args, **popen):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "latentdiff", *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    d = tmp_path_factory.mktemp("stage1")
    code, _, err = finish(cli("train-autoencoder", "--preset", "tiny", "--run-dir", d, "--no-progress",
                              "--set", "data.limit=64"))
    assert code == 0, err
    return d


DENOISER = ("--preset", "tiny", "--no-progress", "--set", "data.limit=64", "--steps", "40", "--set",
            "training.log_every=1", "--set", "training.checkpoint_every=4", "--set", "training.batch_size=8")


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(stage1, tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    shutil.copytree(stage1, ref)
    shutil.copytree(stage1, killed)
    code, _, err = finish(cli("train", "--run-dir", ref, *DENOISER))
    assert code == 0, err

    target = random.Random().randint(4, 24)  # after the first checkpoint, well before the end
    proc = cli("train", "--run-dir", killed, *DENOISER)
    metrics = killed / "denoiser_metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        if len(lines) >= target and ckpt.list_checkpoints(killed / "checkpoints", "denoiser"):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    code, _, err = finish(proc)
    assert code == -signal.SIGKILL, f"the run was not killed mid-way (exit {code}, target step {target}): {err}"
    assert not (killed / "config.json").exists()  # it never finished
    logged = len(metrics.read_text().splitlines())
    last = ckpt.list_checkpoints(killed / "checkpoints", "denoiser")[0]
    (last.parent / f".{last.name}.x1y2.tmp").write_bytes(b"partial")  # as if killed mid-save

    code, out, err = finish(cli("train", "--run-dir", killed, *DENOISER, "--resume"))
    assert code == 0, err
    resumed_at = int(last.stem.split("-")[1])
    assert f"resumed denoiser from {last.name} at step {resumed_at}" in out
    assert logged >= resumed_at  # the lines logged after the checkpoint were cut back, not repeated
    assert losses(killed, "denoiser") == losses(ref, "denoiser")
    assert [s for s, _ in losses(killed, "denoiser")] == list(range(1, 41))
    assert tensors_equal(killed / "checkpoints" / "denoiser-00000040.safetensors",
                         ref / "checkpoints" / "denoiser-00000040.safetensors")
    for name in ("denoiser.safetensors", "autoencoder.safetensors"):
        a, b = ld_state.load_state(killed / name)[0], ld_state.load_state(ref / name)[0]
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert not list((killed / "checkpoints").glob("*.tmp"))


# --- checkpoint files: truncation, bit flips, bad headers --------------------------------------

def small_file(path: Path) -> bytes:
    ld_state.save_state(path, {"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor(3)}, {"step": 3, "note": "x"})
    return path.read_bytes()


def test_every_truncation_is_detected(tmp_path):
    p = tmp_path / "s.safetensors"
    raw = small_file(p)
    for n in range(len(raw)):
        p.write_bytes(raw[:n])
        with pytest.raises(ModelError, match="truncated or corrupted|corrupted"):
            ld_state.load_state(p)


def test_every_single_bit_flip_is_detected(tmp_path):
    """Header (length, JSON, checksums, metadata) and tensor bytes alike: no flip loads silently."""
    p = tmp_path / "s.safetensors"
    raw = small_file(p)
    for i in range(len(raw)):
        for bit in range(8):
            flipped = bytearray(raw)
            flipped[i] ^= 1 << bit
            p.write_bytes(bytes(flipped))
            with pytest.raises(ModelError):
                ld_state.load_state(p)
    p.write_bytes(raw)
    assert ld_state.load_state(p)[1] == {"step": 3, "note": "x"}


@pytest.mark.parametrize("damage", ["truncate", "flip", "header", "empty"])
def test_resume_falls_back_to_the_newest_intact_checkpoint_and_says_so(damage, reference, tmp_path):
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    newest = tmp_path / "checkpoints" / "autoencoder-00000006.safetensors"
    raw = newest.read_bytes()
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip":
        raw = raw[:-100] + bytes([raw[-100] ^ 0x10]) + raw[-99:]  # inside the tensor data
    elif damage == "header":
        raw = (10**9).to_bytes(8, "little") + raw[8:]  # header length beyond the file
    else:
        raw = b""
    newest.write_bytes(raw)
    logs = run(make_stage(), tmp_path, resume=True)
    assert any("skipping checkpoint" in line and newest.name in line for line in logs), logs
    assert any("resuming from the newest intact checkpoint autoencoder-00000004.safetensors, not from the "
               "corrupt autoencoder-00000006.safetensors" in line for line in logs), logs
    assert (newest.parent / (newest.name + ".corrupt")).read_bytes() == raw  # kept aside for inspection
    assert tensors_equal(newest, reference / "checkpoints" / newest.name)  # re-trained to the same weights
    assert losses(tmp_path) == losses(reference)


def test_resume_with_only_corrupt_checkpoints_is_an_error(reference, tmp_path):
    shutil.copytree(reference / "checkpoints", tmp_path / "checkpoints")
    for p in (tmp_path / "checkpoints").iterdir():
        p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(ModelError, match="none of the 3 autoencoder checkpoints .* is intact"):
        run(make_stage(), tmp_path, resume=True)


def test_meta_checksum_catches_an_edited_step(tmp_path):
    """A header edit that stays valid JSON (step 3 -> 7) is caught by the metadata checksum."""
    p = tmp_path / "s.safetensors"
    raw = small_file(p)
    p.write_bytes(raw.replace(b'\\"step\\": 3', b'\\"step\\": 7'))
    assert p.read_bytes() != raw
    with pytest.raises(ModelError, match="metadata checksum"):
        ld_state.load_state(p)


# --- writes: fsync, full disk, incomplete files --------------------------------------------------

def test_atomic_write_fsyncs_the_file_and_its_directory(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(ld_io.os, "fsync", fsync)
    small_file(tmp_path / "s.safetensors")
    assert synced == ["file", "dir"]


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    real = ld_state.save_file
    calls = {"n": 0}

    def save_file(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: half written, then the disk is full
            real(tensors, filename, metadata=metadata)
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ld_state, "save_file", save_file)
    with pytest.raises(WriteError) as err:
        run(make_stage(), tmp_path)
    msg = str(err.value)
    assert "No space left on device" in msg and "free some space" in msg and "--resume" in msg
    assert "autoencoder-00000002.safetensors" in msg and "training stopped at step 4" in msg.lower()
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == ["autoencoder-00000002.safetensors"]  # no partial or temporary file
    assert ld_state.load_state(tmp_path / "checkpoints" / files[0])[1]["step"] == 2
    monkeypatch.setattr(ld_state, "save_file", real)
    logs = run(make_stage(), tmp_path, resume=True)  # space freed: resume goes on from step 2
    assert "resumed autoencoder from autoencoder-00000002.safetensors at step 2" in logs


def test_a_silently_short_write_is_caught(tmp_path, monkeypatch):
    """A writer that loses its last bytes without an error (dropped flush) never replaces a good file."""
    target = tmp_path / "s.safetensors"
    good = small_file(target)
    real = ld_state.save_file

    def short(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:-3])

    monkeypatch.setattr(ld_state, "save_file", short)
    with pytest.raises(WriteError, match="incomplete write"):
        ld_state.save_state(target, {"w": torch.zeros(3)}, {})
    assert target.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]


def test_unwritable_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(WriteError, match="cannot write"):
        ld_state.save_state(blocker / "sub" / "s.safetensors", {"w": torch.zeros(1)})


# --- the metrics file ----------------------------------------------------------------------------

def test_metrics_file_is_cut_back_to_the_resumed_step(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    MetricsLog(path, 5)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5]
    MetricsLog(path, 0)  # a fresh start
    assert path.read_text() == ""


# --- non-finite losses and gradients --------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("fault", ["loss", "grad"])
def test_nonfinite_stops_naming_the_step_and_keeps_the_last_good_checkpoint(precision, fault, tmp_path):
    seen = []
    stage = make_stage(steps=8, fault_step=5, fault=fault, seen=seen, log_every=4)
    with pytest.raises(TrainingError) as err:
        run(stage, tmp_path, precision=precision)
    msg = str(err.value)
    what = "loss" if fault == "loss" else "gradient"
    assert f"non-finite {what} at step 5" in msg and "autoencoder-00000004.safetensors" in msg, msg
    assert "autoencoder_training.nonfinite=skip" in msg and "--resume" in msg
    assert set(seen) == {precision == "bf16"}  # bf16 really autocasts on the CPU; fp32 does not
    # detected at step 6 (a checkpoint step): no checkpoint of the bad weights was written
    names = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert sorted(names) == ["autoencoder-00000002.safetensors", "autoencoder-00000004.safetensors"]
    for name in names:
        tensors, _ = ld_state.load_state(tmp_path / "checkpoints" / name)
        assert all(torch.isfinite(v).all() for k, v in tensors.items() if v.is_floating_point()), name
    assert [s for s, _ in losses(tmp_path)] == [4]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nonfinite_skip_drops_the_batch_without_any_update(precision, tmp_path):
    stage = make_stage(steps=4, fault_step=3, nonfinite="skip", checkpoint_every=1)
    logs = run(stage, tmp_path, precision=precision)
    c = tmp_path / "checkpoints"
    assert tensors_equal(c / "autoencoder-00000002.safetensors", c / "autoencoder-00000003.safetensors")
    assert not tensors_equal(c / "autoencoder-00000003.safetensors", c / "autoencoder-00000004.safetensors")
    assert ld_state.load_state(c / "autoencoder-00000004.safetensors")[1]["skipped"] == 1
    records = read_metrics(tmp_path / "autoencoder_metrics.jsonl")
    assert [(r["step"], r["loss"] is None, r["skipped"]) for r in records] == [
        (1, False, 0), (2, False, 0), (3, True, 1), (4, False, 1)]
    assert any("step 3: non-finite loss or gradient, batch skipped (1 so far)" in line for line in logs)
    assert any("1 of 4 batches were skipped" in line for line in logs)


def test_precision_and_nonfinite_options_are_validated():
    assert load_config(preset="demo").precision == "auto"  # the CPU demo keeps running in fp32
    with pytest.raises(ConfigError, match="training.nonfinite must be one of stop, skip"):
        load_config(preset="tiny", overrides=["training.nonfinite=ignore"])
    with pytest.raises(ConfigError, match="precision must be one of auto, bf16, fp32"):
        load_config(preset="tiny", overrides=["precision=fp16"])
    assert load_config(preset="tiny", overrides=["autoencoder_training.nonfinite=skip"]) \
        .autoencoder_training.nonfinite == "skip"


# --- the run directory: run identity, lock, resume config, reproducibility, temporaries ---------------

def one_line_error(code, err, needle):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("latentdiff: error:") and needle in lines[0], err
    assert "Traceback" not in err


TINY_DEN = ("--preset", "tiny", "--no-progress", "--set", "data.limit=64", "--set", "training.batch_size=8",
            "--set", "training.checkpoint_every=3", "--set", "training.keep_checkpoints=5")


def test_a_fresh_start_over_another_runs_checkpoints_is_refused_unless_overwrite(stage1, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(stage1, d)
    before = {p.name: p.read_bytes() for p in (d / "checkpoints").iterdir()}
    code, _, err = finish(cli("train-autoencoder", "--preset", "tiny", "--run-dir", d, "--no-progress",
                              "--set", "data.limit=64"))
    one_line_error(code, err, "--overwrite")
    assert {p.name: p.read_bytes() for p in (d / "checkpoints").iterdir()} == before  # nothing lost
    code, out, err = finish(cli("train-autoencoder", "--preset", "tiny", "--run-dir", d, "--no-progress",
                                "--set", "data.limit=64", "--set", "autoencoder_training.seed=1", "--overwrite"))
    assert code == 0, err
    ids = {ld_state.load_state(p)[1]["run_id"] for p in ckpt.list_checkpoints(d / "checkpoints", "autoencoder")}
    assert len(ids) == 1 and "deleted 2 autoencoder checkpoint(s)" in out


def test_a_second_command_on_a_locked_run_dir_is_refused(stage1, tmp_path):
    import fcntl

    d = tmp_path / "run"
    shutil.copytree(stage1, d)
    with open(d / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        code, _, err = finish(cli("train", "--run-dir", d, *TINY_DEN, "--steps", "2"))
        one_line_error(code, err, "is in use by another latentdiff command")
    assert not list((d / "checkpoints").glob("denoiser-*"))
    # the lock file is still there, its holder gone: a killed run's lock never blocks (flock is per process)
    (d / f".train_config.json.{os.getpid()}abc.tmp").write_text("{")  # as left by a SIGKILL at start
    code, _, err = finish(cli("train", "--run-dir", d, *TINY_DEN, "--steps", "2"))
    assert code == 0, err
    assert (d / ".lock").exists() and not list(d.glob(".*.tmp")) and not list((d / "checkpoints").glob(".*.tmp"))


def test_resume_refuses_a_changed_config_and_skips_foreign_files(stage1, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(stage1, d)
    code, _, err = finish(cli("train", "--run-dir", d, *TINY_DEN, "--steps", "3"))
    assert code == 0, err
    for change, needle in ((("--set", "unet.base_channels=32"), "unet.base_channels (16 -> 32)"),
                           (("--set", "training.lr=0.01"), "training.lr"),
                           (("--set", "unet.dropout=0.2"), "unet.dropout"),
                           (("--image-size", "16"), "data.image_size")):
        code, _, err = finish(cli("train", "--run-dir", d, *TINY_DEN, "--steps", "6", "--resume", *change))
        if "image_size" in needle:  # the data no longer fits the trained autoencoder: refused before resuming
            assert code == 2 and "Traceback" not in err, err
        else:
            one_line_error(code, err, needle)
    # an intact, checksummed file that is not a denoiser checkpoint is skipped with a warning
    ld_state.save_state(ckpt.checkpoint_path(d / "checkpoints", "denoiser", 99), {"w": torch.zeros(2)}, {"step": 99})
    code, out, err = finish(cli("train", "--run-dir", d, *TINY_DEN, "--steps", "6", "--resume",
                                "--set", "training.log_every=1", "--set", "training.sample_every=2"))
    assert code == 0, err
    assert "resumed denoiser from denoiser-00000003.safetensors at step 3" in out
    assert "skipping checkpoint" in err and "not a denoiser checkpoint" in err


@pytest.mark.slow
def test_dropout_runs_are_reproducible_and_resume_equals_them(stage1, tmp_path):
    """unet.dropout > 0 draws from the global generator: seeded from training.seed, and sample grids
    (drawn inside fork_rng) do not move it."""
    runs = {}
    for name in ("a", "b"):
        runs[name] = tmp_path / name
        shutil.copytree(stage1, runs[name])
        code, _, err = finish(cli("train", "--run-dir", runs[name], *TINY_DEN, "--steps", "6",
                                  "--set", "unet.dropout=0.3", "--set", "training.sample_every=2"))
        assert code == 0, err
    c = runs["c"] = tmp_path / "c"
    shutil.copytree(runs["a"], c)
    (c / "checkpoints" / "denoiser-00000006.safetensors").unlink()
    code, _, err = finish(cli("train", "--run-dir", c, *TINY_DEN, "--steps", "6", "--resume",
                              "--set", "unet.dropout=0.3"))
    assert code == 0, err
    final = {k: ld_state.load_state(v / "denoiser.safetensors")[0] for k, v in runs.items()}
    for other in ("b", "c"):
        assert all(torch.equal(final["a"][k], final[other][k]) for k in final["a"]), other


def test_resume_check_reads_a_missing_field_as_its_default():
    """A checkpoint written before a config field existed resumes when the field keeps its default; the data
    reading knobs (workers, cache shard size) may change; anything else is still refused."""
    from latentdiff.pipeline.config import Config
    from latentdiff.training.rundir import resume_check

    cfg = Config().to_dict()
    old = json.loads(json.dumps(cfg))
    del old["data"]["latent_cache"], old["data"]["workers"]  # an earlier version's checkpoint
    meta = {"stage": "denoiser", "step": 3, "optimizer": {}, "config": old}
    check = resume_check("denoiser", cfg)
    check({"rng.data": torch.zeros(1)}, meta)
    check_more = resume_check("denoiser", {**cfg, "data": {**cfg["data"], "workers": 4, "cache_shard_size": 64}})
    check_more({"rng.data": torch.zeros(1)}, meta)
    changed = resume_check("denoiser", {**cfg, "data": {**cfg["data"], "latent_cache": "auto"}})
    with pytest.raises(ConfigError, match=r"data.latent_cache \(None -> 'auto'\)"):
        changed({"rng.data": torch.zeros(1)}, meta)

"""Spoken digits, an SC09-like set synthesised offline with espeak-ng: "zero" … "nine", 1 s at 16 kHz.

No spoken-digit recording ships in any package these machines reach, so the set is made: every clip is one
espeak-ng call with a voice (an English accent + a voice variant), a speed, a pitch and a word gap jitter,
then resampled to 16 kHz, trimmed to its voiced part, placed at a random offset inside 1 s and scaled to a
random peak amplitude. All of these are drawn up front from one seed into a fixed, ordered list of jobs, so
the same seed gives the same bytes however many worker processes run them.

The held-out split is by voice *variant*: the test variants are never heard in training, with any accent.
The set is stored as ``train.npz`` / ``test.npz`` (int16 waveforms, labels, voice names) and ``meta.json``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from latentdiff.data.fashion_mnist import cache_dir
from latentdiff.errors import DataError
from latentdiff.utils.audio import read_wav
from latentdiff.utils.files import atomic_path, write_text_atomic

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SAMPLE_RATE = 16_000
CLIP_SAMPLES = 16_000  # 1 s
ACCENTS = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029",
           "en-us-nyc")
# espeak-ng voice variants (voices/!v). Every sixth one is held out for the test split.
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2",
            "klatt3", "croak", "Andy", "Annie", "belinda", "benjamin", "david", "edward", "grandma",
            "grandpa", "john", "linda", "max", "michel", "paul", "rob", "robert", "steph", "travis", "victor",
            "zac", "quincy")
TEST_VARIANTS = VARIANTS[5::6]


@dataclass(frozen=True)
class Job:
    """One clip: what espeak-ng is told, and the placement/level applied afterwards."""

    digit: int
    accent: str
    variant: str
    speed: int      # words per minute (espeak-ng -s)
    pitch: int      # 0-99 (espeak-ng -p)
    offset: float   # fraction of the free space placed before the word
    peak: float     # peak amplitude of the clip, in (0, 1]

    @property
    def voice(self) -> str:
        return f"{self.accent}+{self.variant}"


def make_jobs(n: int, seed: int) -> list[Job]:
    """`n` clips' parameters, balanced over digits, drawn from `seed` (the whole set's only randomness)."""
    rng = np.random.default_rng(seed)
    jobs = []
    for i in range(n):
        jobs.append(Job(digit=i % 10, accent=ACCENTS[rng.integers(len(ACCENTS))],
                        variant=VARIANTS[rng.integers(len(VARIANTS))], speed=int(rng.integers(110, 230)),
                        pitch=int(rng.integers(15, 85)), offset=float(rng.uniform(0.1, 0.9)),
                        peak=float(10 ** rng.uniform(-0.8, -0.05))))
    return jobs


def espeak_binary() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise DataError("espeak-ng is not installed, so the spoken digits cannot be synthesised; install it "
                        "(Debian/Ubuntu: apt-get install espeak-ng) and run the command again")
    return exe


def resample(wave: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling with scipy's Kaiser-windowed anti-aliasing filter."""
    if rate == target:
        return wave.astype(np.float32)
    from math import gcd

    from scipy.signal import resample_poly
    g = gcd(rate, target)
    return resample_poly(wave, target // g, rate // g).astype(np.float32)


FADE = 160  # 10 ms raised-cosine fades at the cut edges: a hard cut through low-level sound is a broadband click


def fade_edges(wave: np.ndarray, n: int = FADE) -> np.ndarray:
    """Raised-cosine fade-in over the first `n` samples and fade-out over the last `n` (a copy)."""
    wave = wave.astype(np.float32).copy()
    n = min(n, len(wave) // 2)
    ramp = (0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n)).astype(np.float32)
    wave[:n] *= ramp
    wave[len(wave) - n:] *= ramp[::-1]
    return wave


def place(wave: np.ndarray, offset: float, peak: float) -> np.ndarray:
    """Trim `wave` to its voiced part (40 dB below its peak) with 10 ms fades, fit it into 1 s at `offset`, and
    scale it to `peak`."""
    if not wave.size or np.abs(wave).max() == 0:
        raise DataError("espeak-ng produced a silent clip")
    loud = np.flatnonzero(np.abs(wave) > np.abs(wave).max() * 0.01)
    wave = wave[max(loud[0] - FADE, 0):loud[-1] + FADE]  # keep 10 ms either side
    if len(wave) > CLIP_SAMPLES:  # a very slow voice: keep the middle second
        start = (len(wave) - CLIP_SAMPLES) // 2
        wave = wave[start:start + CLIP_SAMPLES]
    wave = fade_edges(wave)
    out = np.zeros(CLIP_SAMPLES, np.float32)
    start = int(round((CLIP_SAMPLES - len(wave)) * offset))
    out[start:start + len(wave)] = wave
    return out * (peak / np.abs(out).max())


def synthesise(job: Job, exe: str = "espeak-ng") -> np.ndarray:
    """One clip as int16 samples (1 s at 16 kHz)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.wav"
        cmd = [exe, "-v", job.voice, "-s", str(job.speed), "-p", str(job.pitch), "-w", str(path),
               DIGITS[job.digit]]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=60)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
            raise DataError(f"espeak-ng failed for voice {job.voice!r}: {e}") from None
        wave, rate, _ = read_wav(path)
    clip = place(resample(wave, rate), job.offset, job.peak)
    return np.clip(np.round(clip * 32767), -32768, 32767).astype(np.int16)


def _synth_many(args: tuple[list[Job], str]) -> np.ndarray:
    jobs, exe = args
    return np.stack([synthesise(j, exe) for j in jobs])


def generate(dest: str | Path | None = None, n: int = 12_000, seed: int = 0, workers: int = 2,
             progress=None) -> Path:
    """Synthesise `n` clips into `dest` (default: the cache's spoken-digits folder); returns the folder.

    The output is deterministic given (n, seed, the espeak-ng version); `workers` only changes the speed.
    """
    if n < 20:
        raise DataError(f"the spoken-digit set needs at least 20 clips (2 per digit), got {n}")
    exe = espeak_binary()
    dest = Path(dest) if dest is not None else cache_dir() / "spoken-digits"
    jobs = make_jobs(n, seed)
    batches = [jobs[i:i + 50] for i in range(0, n, 50)]
    clips = []
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for out in pool.map(_synth_many, [(b, exe) for b in batches]):  # map keeps the order
            clips.append(out)
            if progress is not None:
                progress(len(out))
    waves = np.concatenate(clips)  # N×16000 int16
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False).stdout
    version = version.split("  Data at")[0].strip()  # the version, without the machine's data path
    test = np.array([j.variant in TEST_VARIANTS for j in jobs])
    dest.mkdir(parents=True, exist_ok=True)
    for split, mask in (("train", ~test), ("test", test)):
        with atomic_path(dest / f"{split}.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, waves=waves[mask], labels=np.array([j.digit for j in jobs], np.int64)[mask],
                     voices=np.array([j.voice for j in jobs])[mask])
    meta = {"name": "spoken-digits", "n": n, "seed": seed, "sample_rate": SAMPLE_RATE, "espeak_ng": version,
            "digits": list(DIGITS), "test_variants": list(TEST_VARIANTS),
            "train": int((~test).sum()), "test": int(test.sum()), "jobs_first": asdict(jobs[0])}
    write_text_atomic(dest / "meta.json", json.dumps(meta, indent=2) + "\n")
    return dest


def find_spoken_digits(data_dir: str | Path | None = None) -> Path:
    folder = Path(data_dir) if data_dir else cache_dir() / "spoken-digits"
    if not (folder / "train.npz").is_file() or not (folder / "test.npz").is_file():
        raise DataError(f"no spoken-digit set in {folder}; make it with `latentdiff download spoken-digits`"
                        " (needs espeak-ng), or pass --data-dir")
    return folder


def load_waves(folder: str | Path | None, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(float32 N×16000 waveforms in [-1, 1], int64 labels) of one split."""
    path = find_spoken_digits(folder) / f"{split}.npz"
    try:
        with np.load(path, allow_pickle=False) as npz:
            waves, labels = npz["waves"][:limit], npz["labels"][:limit]
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{path} is corrupt ({e}); make the set again with `latentdiff download spoken-digits`")
    if waves.ndim != 2 or waves.dtype != np.int16 or labels.shape != (len(waves),):
        raise DataError(f"{path} has unexpected contents; make the set again")
    return waves.astype(np.float32) / 32768.0, labels.astype(np.int64)

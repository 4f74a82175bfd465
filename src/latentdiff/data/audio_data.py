"""Audio data as log-mel "images": the spoken-digit set and folders of WAV files.

Every clip is turned into its log-mel spectrogram by the mel front end (codecs/mel.py, default parameters) and
quantised to uint8 over the front end's [db_min, db_max] range (90 dB / 255 = 0.35 dB a step, below what a
listener or the digit classifier notices), so audio arrives as the same :class:`ImageData` as pictures and the
autoencoder, the diffusion training and the evaluation run on it unchanged.

A folder of WAVs: labels come from subfolders (``root/<label>/*.wav``), else the files are unlabelled; a
``train/`` + ``test/`` pair is used as the split. Clips are resampled to 16 kHz and cut or zero-padded to 1 s.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from latentdiff.codecs.mel import MelConfig, waves_to_uint8
from latentdiff.data.image_data import ImageData
from latentdiff.data.spoken_digits import DIGITS, load_waves, resample
from latentdiff.errors import DataError
from latentdiff.utils.audio import read_wav

MAX_WAV_FILES = 200_000


@functools.lru_cache(maxsize=4)
def _spoken_digit_images(folder: str | None, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    waves, labels = load_waves(folder, split, limit)
    images = waves_to_uint8(waves)
    images.setflags(write=False)
    return images, labels


def load_spoken_digits(split: str, data_dir=None, limit: int | None = None) -> ImageData:
    images, labels = _spoken_digit_images(str(data_dir) if data_dir else None, split, limit)
    return ImageData(np.array(images), labels.copy(), len(DIGITS), DIGITS, f"spoken digits ({split})")


def fit_clip(wave: np.ndarray, rate: int, cfg: MelConfig | None = None) -> np.ndarray:
    """Resample to the front end's rate, then cut or zero-pad to one clip."""
    cfg = cfg or MelConfig()
    wave = resample(wave, rate, cfg.sample_rate)[:cfg.clip_samples]
    return np.pad(wave, (0, cfg.clip_samples - len(wave))).astype(np.float32)


def load_wav_folder(root: str | Path, limit: int | None = None) -> ImageData:
    """A folder of WAV files (labels from subfolders) as log-mel ImageData."""
    root = Path(root)
    subdirs = sorted(d for d in root.iterdir() if d.is_dir())
    files = [(p, i) for i, d in enumerate(subdirs) for p in sorted(d.glob("*.wav"))] if subdirs else []
    names = tuple(d.name for d in subdirs)
    if not files:
        files, names = [(p, -1) for p in sorted(root.glob("*.wav"))], ()
    if not files:
        raise DataError(f"no .wav files in {root} (or in its subfolders)")
    if len(files) > MAX_WAV_FILES:
        raise DataError(f"{root} holds {len(files)} WAV files; at most {MAX_WAV_FILES} are loaded")
    files = files[:limit]
    waves = np.stack([fit_clip(*read_wav(p)[:2]) for p, _ in files])
    labels = np.array([i for _, i in files], np.int64) if names else None
    return ImageData(waves_to_uint8(waves), labels, len(names), names, f"WAV folder {root.name}")


def is_wav_folder(root: Path) -> bool:
    return root.is_dir() and (any(root.glob("*.wav")) or any(root.glob("*/*.wav")))

"""WAV files without extra dependencies: mono 16-bit PCM out (with the provenance record in a RIFF
``LIST/INFO`` chunk), PCM 8/16/24/32-bit and 32-bit float in (any channel count, averaged to mono).

The RIFF layout is written by hand rather than through the stdlib ``wave`` module because ``wave`` can
neither write nor read chunks other than ``fmt `` and ``data``, and the provenance record must travel inside
the file. An ``ICMT`` (comment) entry holds the JSON record: every WAV reader skips unknown ``LIST`` chunks, and
tools such as ffprobe and sox show the comment.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from latentdiff.errors import DataError
from latentdiff.utils.files import atomic_path

MAX_WAV_BYTES = 512 * 1024 * 1024  # refuse larger inputs before reading them


def to_int16(wave: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] -> int16 (clipped, rounded)."""
    return np.clip(np.round(np.asarray(wave, np.float64) * 32767.0), -32768, 32767).astype(np.int16)


def wav_bytes(wave: np.ndarray, sample_rate: int, comment: str | None = None) -> bytes:
    """A complete mono 16-bit PCM WAV file as bytes; `comment` goes into a LIST/INFO/ICMT chunk."""
    pcm = (wave if wave.dtype == np.int16 else to_int16(wave)).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, sample_rate, sample_rate * 2, 2, 16)
    chunks = [b"fmt " + struct.pack("<I", len(fmt)) + fmt]
    if comment is not None:
        text = comment.encode("utf-8") + b"\x00"
        if len(text) % 2:
            text += b"\x00"  # RIFF chunks are word-aligned
        info = b"INFO" + b"ICMT" + struct.pack("<I", len(text)) + text
        chunks.append(b"LIST" + struct.pack("<I", len(info)) + info)
    chunks.append(b"data" + struct.pack("<I", len(pcm)) + pcm + (b"\x00" if len(pcm) % 2 else b""))
    body = b"WAVE" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def write_wav(path: str | Path, wave: np.ndarray, sample_rate: int, record: dict | None = None) -> None:
    """Write one mono waveform (float in [-1, 1] or int16) atomically, with `record` as JSON provenance."""
    data = wav_bytes(np.asarray(wave).reshape(-1), sample_rate,
                     None if record is None else json.dumps(record, sort_keys=True))
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _chunks(data: bytes, path) -> dict[bytes, bytes]:
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise DataError(f"{path} is not a WAV file (no RIFF/WAVE header)")
    out, pos = {}, 12
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        body = data[pos + 8:pos + 8 + size]  # streaming writers leave size = 0xFFFFFFFF: clamp to the file
        out.setdefault(cid, body)
        pos += 8 + size + (size % 2)
    return out


def _decode_pcm(raw: bytes, fmt_tag: int, bits: int, channels: int, path) -> np.ndarray:
    width = bits // 8
    raw = raw[:len(raw) - len(raw) % (width * channels)]
    if fmt_tag == 3 and bits == 32:
        x = np.frombuffer(raw, "<f4").astype(np.float32)
    elif fmt_tag == 1 and bits == 8:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif fmt_tag == 1 and bits == 16:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif fmt_tag == 1 and bits == 24:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    elif fmt_tag == 1 and bits == 32:
        x = np.frombuffer(raw, "<i4").astype(np.float32) / float(1 << 31)
    else:
        raise DataError(f"{path}: unsupported WAV encoding (format {fmt_tag}, {bits} bits); "
                        "use PCM 8/16/24/32-bit or 32-bit float")
    return x.reshape(-1, channels).mean(axis=1)


def read_wav(path: str | Path) -> tuple[np.ndarray, int, dict | None]:
    """(mono float32 waveform in [-1, 1], sample rate, provenance record or None)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_WAV_BYTES:
            raise DataError(f"{path} is larger than {MAX_WAV_BYTES >> 20} MB; refusing to read it")
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    chunks = _chunks(data, path)
    if b"fmt " not in chunks or b"data" not in chunks or len(chunks[b"fmt "]) < 16:
        raise DataError(f"{path} is a truncated or corrupt WAV file (no fmt or data chunk)")
    tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", chunks[b"fmt "][:16])
    if tag == 0xFFFE and len(chunks[b"fmt "]) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the sub-format's first 2 bytes
        tag = struct.unpack("<H", chunks[b"fmt "][24:26])[0]
    if channels < 1 or rate < 1:
        raise DataError(f"{path}: WAV header says {channels} channels at {rate} Hz")
    wave = _decode_pcm(chunks[b"data"], tag, bits, channels, path)
    return wave, int(rate), _record(chunks.get(b"LIST"))


def _record(lst: bytes | None) -> dict | None:
    if not lst or lst[:4] != b"INFO":
        return None
    pos = 4
    while pos + 8 <= len(lst):
        cid, size = lst[pos:pos + 4], struct.unpack("<I", lst[pos + 4:pos + 8])[0]
        if cid == b"ICMT":
            try:
                value = json.loads(lst[pos + 8:pos + 8 + size].rstrip(b"\x00").decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                return None
            return value if isinstance(value, dict) else None
        pos += 8 + size + (size % 2)
    return None


GAP_SECONDS = 0.25  # silence between clips when several go into one WAV


def save_audio_samples(waves: np.ndarray, path: str | Path, sample_rate: int, labels: np.ndarray | None = None,
                       record: dict | None = None, spectrograms: np.ndarray | None = None) -> None:
    """`.wav`: the clips one after another (GAP_SECONDS of silence between), `record` inside; `.npz`: float32
    `waves` (N×T), `sample_rate`, `labels` and the uint8 log-mel `spectrograms`, with `record` as JSON text."""
    path = Path(path)
    if path.suffix.lower() == ".wav":
        gap = np.zeros(int(GAP_SECONDS * sample_rate), np.float32)
        parts = [p for w in waves for p in (w, gap)][:-1]
        write_wav(path, np.concatenate(parts), sample_rate, record)
    elif path.suffix.lower() == ".npz":
        extra = {"labels": labels.astype(np.int64)} if labels is not None else {}
        if spectrograms is not None:
            extra["spectrograms"] = spectrograms[..., 0] if spectrograms.shape[-1] == 1 else spectrograms
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, waves=waves.astype(np.float32), sample_rate=np.int64(sample_rate),
                                provenance=np.array(json.dumps(record or {}, sort_keys=True)), **extra)
    else:
        raise DataError(f"audio output {path} must end in .wav or .npz (or .png for the spectrogram grid)")


def write_wavs(waves: np.ndarray, directory: Path, sample_rate: int, record: dict | None = None) -> None:
    """One WAV per clip, 00000.wav, 00001.wav, ... (each with the provenance record)."""
    for i, w in enumerate(waves):
        write_wav(Path(directory) / f"{i:05d}.wav", w, sample_rate, record)


def spectrogram_view(images: np.ndarray) -> np.ndarray:
    """Log-mel images (row 0 = lowest band) flipped for display: low frequencies at the bottom."""
    return np.ascontiguousarray(images[:, ::-1])

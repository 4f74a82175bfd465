"""Audio: the mel front end and Griffin-Lim on synthetic tones, WAV files, the spoken-digit generator, IS/mIS,
and a tiny audio train-and-sample run through the command line."""

import json
import math
import shutil
import struct

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli

from latentdiff.codecs.mel import (
    MelConfig,
    MelFrontEnd,
    hz_to_mel,
    mel_filters,
    mel_to_hz,
    spectral_convergence,
    uint8_to_waves,
    waves_to_uint8,
)
from latentdiff.data import spoken_digits as sd
from latentdiff.errors import DataError
from latentdiff.evaluation.audio_features import inception_score
from latentdiff.utils.audio import read_wav, save_audio_samples, wav_bytes, write_wav

SR = 16_000


def tone(freq: float, amp: float = 0.5, n: int = SR) -> torch.Tensor:
    return amp * torch.sin(2 * math.pi * freq * torch.arange(n) / SR)


def peak_hz(wave) -> float:
    wave = torch.as_tensor(wave).double()
    spec = torch.fft.rfft(wave * torch.hann_window(len(wave), dtype=torch.float64)).abs()
    return float(spec.argmax()) * SR / len(wave)


# --- mel scale and filters --------------------------------------------------------------------------


def test_slaney_mel_scale_constants_and_inverse():
    assert float(hz_to_mel(1000.0)) == pytest.approx(15.0)          # linear part: 200/3 Hz per mel
    assert float(hz_to_mel(500.0)) == pytest.approx(7.5)
    assert float(hz_to_mel(6400.0)) == pytest.approx(42.0)          # 27 mels per factor 6.4 above 1 kHz
    f = torch.tensor([0.0, 100.0, 999.0, 1000.0, 3000.0, 8000.0])
    assert torch.allclose(mel_to_hz(hz_to_mel(f)), f.double(), atol=1e-6)


def test_filters_are_area_normalised_triangles_in_order():
    w = mel_filters(SR, 1024, 64, 20.0, 8000.0).double()
    bins = torch.linspace(0, SR / 2, 513, dtype=torch.float64)
    centres = (w * bins).sum(1) / w.sum(1)
    assert bool((centres[1:] > centres[:-1]).all())                  # low bands first
    area = w.sum(1) * (bins[1] - bins[0])                            # ≈ 1/2 · base · height = 1 (Slaney norm)
    assert float((area[8:] - 1).abs().max()) < 0.05
    assert float(w.min()) >= 0


@pytest.mark.parametrize("freq", [300.0, 1000.0, 2500.0, 6000.0])
def test_a_tone_lands_in_its_mel_band_and_the_stft_is_amplitude_scaled(freq):
    front = MelFrontEnd(MelConfig())
    spec = front.stft(tone(freq, amp=0.8)[None]).abs()              # 1×F×N
    peak = float(spec[0, :, 32].max())                               # a sine of amplitude A peaks at A/2, less
    assert 0.4 * 0.84 < peak <= 0.4 * 1.01                           # Hann's scalloping loss (≤ 1.42 dB) off-bin
    img = front.wave_to_image(tone(freq)[None])                      # 1×1×64×64
    band = int(img[0, 0, :, 32].argmax())
    edges = mel_to_hz(torch.linspace(float(hz_to_mel(20.0)), float(hz_to_mel(8000.0)), 66))
    assert float(edges[band]) < freq < float(edges[band + 2])        # inside the loudest triangle


def test_louder_is_brighter_by_the_db_map():
    cfg = MelConfig()
    front = MelFrontEnd(cfg)
    a, b = (front.wave_to_image(tone(1000, amp)[None])[0, 0, :, 32].max() for amp in (0.05, 0.5))
    # +20 dB is 20 / (db_max - db_min) * 2 of the [-1, 1] range
    assert float(b - a) == pytest.approx(20 / (cfg.db_max - cfg.db_min) * 2, abs=0.01)


# --- Griffin-Lim ------------------------------------------------------------------------------------


def test_griffin_lim_converges_and_momentum_helps():
    front = MelFrontEnd(MelConfig())
    target = front.stft((tone(440) + tone(1320, 0.2))[None]).abs()

    def sc(iters, momentum):
        wave = front.griffin_lim(target, SR, iters=iters, momentum=momentum,
                                 generator=torch.Generator().manual_seed(0))
        return spectral_convergence(target, wave, front)

    plain = [sc(i, 0.0) for i in (0, 4, 16)]
    assert plain[0] > plain[1] > plain[2]                            # the error falls with iterations
    assert sc(16, 0.99) < plain[2]                                   # fast Griffin-Lim beats the original


@pytest.mark.parametrize("freq", [250.0, 880.0, 3000.0])
def test_tone_frequency_survives_mel_and_griffin_lim(freq):
    cfg = MelConfig(griffin_lim_iters=16)
    images = waves_to_uint8(tone(freq)[None].numpy(), cfg)           # the data path: uint8 log-mel
    wave = uint8_to_waves(images, cfg)[0]
    assert wave.shape == (SR,)
    assert abs(peak_hz(wave[1000:-1000]) - freq) < 0.04 * freq + 20


def test_mel_inversion_is_nonnegative_and_consistent():
    front = MelFrontEnd(MelConfig())
    mag = front.stft(tone(700)[None]).abs()[..., :64]
    mel = front.filters @ mag
    est = front.mel_to_magnitude(mel)
    assert float(est.min()) >= 0
    assert float((front.filters @ est - mel).norm() / mel.norm()) < 0.05


# --- WAV files --------------------------------------------------------------------------------------


def test_wav_round_trip_with_provenance(tmp_path):
    wave = tone(440).numpy()
    write_wav(tmp_path / "a.wav", wave, SR, {"seed": 3, "labels": [7]})
    back, rate, record = read_wav(tmp_path / "a.wav")
    assert rate == SR and record == {"seed": 3, "labels": [7]}
    assert np.abs(back - wave).max() < 1.0 / 16000
    import wave as stdlib_wave  # an ordinary reader skips the LIST chunk
    with stdlib_wave.open(str(tmp_path / "a.wav")) as w:
        assert (w.getframerate(), w.getnchannels(), w.getnframes()) == (SR, 1, SR)


def test_wav_reader_takes_stereo_24_bit_and_refuses_garbage(tmp_path):
    left = np.array([0.5, -0.25, 0.0], np.float64)
    pcm = b"".join(int(round(v * (1 << 23))).to_bytes(3, "little", signed=True) * 2 for v in left)
    fmt = struct.pack("<HHIIHH", 1, 2, 8000, 8000 * 6, 6, 24)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(pcm)) + pcm
    (tmp_path / "s.wav").write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    x, rate, _ = read_wav(tmp_path / "s.wav")
    assert rate == 8000 and np.allclose(x, left, atol=1e-6)
    (tmp_path / "bad.wav").write_bytes(b"not a wav at all")
    with pytest.raises(DataError, match="not a WAV file"):
        read_wav(tmp_path / "bad.wav")
    (tmp_path / "trunc.wav").write_bytes(wav_bytes(left, 8000)[:30])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_wav(tmp_path / "trunc.wav")


def test_many_clips_to_one_wav_or_an_npz(tmp_path):
    waves = np.stack([tone(300).numpy(), tone(600).numpy()])
    save_audio_samples(waves, tmp_path / "x.wav", SR, record={"n": 2})
    back, _, record = read_wav(tmp_path / "x.wav")
    assert len(back) == 2 * SR + SR // 4 and record == {"n": 2}
    save_audio_samples(waves, tmp_path / "x.npz", SR, labels=np.array([1, 2]), record={"n": 2})
    with np.load(tmp_path / "x.npz") as z:
        assert z["waves"].shape == (2, SR) and int(z["sample_rate"]) == SR and list(z["labels"]) == [1, 2]
        assert json.loads(str(z["provenance"])) == {"n": 2}


# --- the spoken-digit generator ---------------------------------------------------------------------


def test_jobs_are_a_function_of_the_seed_and_test_voices_are_held_out():
    a, b, c = sd.make_jobs(200, 1), sd.make_jobs(200, 1), sd.make_jobs(200, 2)
    assert a == b and a != c
    assert [j.digit for j in a[:12]] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    test_voices = {j.voice for j in a if j.variant in sd.TEST_VARIANTS}
    train_voices = {j.voice for j in a if j.variant not in sd.TEST_VARIANTS}
    assert test_voices and train_voices and not test_voices & train_voices


def test_place_trims_positions_and_scales():
    word = np.concatenate([np.zeros(3000), np.sin(np.arange(4000) * 0.3), np.zeros(5000)]).astype(np.float32)
    early, late = sd.place(word, 0.0, 0.5), sd.place(word, 1.0, 0.5)
    assert early.shape == late.shape == (sd.CLIP_SAMPLES,)
    assert np.abs(early).max() == pytest.approx(0.5)
    assert np.flatnonzero(early)[0] < 200 and np.flatnonzero(late)[-1] > sd.CLIP_SAMPLES - 200


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_generator_is_deterministic_whatever_the_worker_count(tmp_path):
    one = sd.generate(tmp_path / "a", n=20, seed=5, workers=1)
    two = sd.generate(tmp_path / "b", n=20, seed=5, workers=2)
    for split in ("train", "test"):
        assert (one / f"{split}.npz").read_bytes() == (two / f"{split}.npz").read_bytes()
    waves, _ = sd.load_waves(one, "train")
    assert waves.shape[1] == sd.CLIP_SAMPLES and 0.1 < np.abs(waves).max() <= 1


def test_missing_espeak_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setattr(sd.shutil, "which", lambda name: None)
    code, _, err = run_cli("download", "spoken-digits", "--dest", tmp_path, "--no-progress")
    assert_one_line_error(code, err, "espeak-ng is not installed")


# --- IS and modified IS ---------------------------------------------------------------------------------


def test_inception_scores_on_known_cases():
    confident = np.eye(10)[np.arange(100) % 10] * 50                  # certain and balanced: IS = K
    assert inception_score(confident)[0] == pytest.approx(10.0, rel=1e-3)
    logits = np.random.default_rng(0).normal(size=(30, 4)) * 2        # mIS against its double sum, term by term
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    kl = [(p[i] * (np.log(p[i]) - np.log(p[j]))).sum() for i in range(30) for j in range(30)]
    assert inception_score(logits)[1] == pytest.approx(np.exp(np.mean(kl)), rel=1e-6)
    assert inception_score(np.zeros((50, 10))) == pytest.approx((1.0, 1.0))  # no information
    one_class = np.eye(10)[np.zeros(40, int)] * 50                     # certain but always the same class
    assert inception_score(one_class) == pytest.approx((1.0, 1.0), abs=1e-3)


# --- a tiny audio model end to end --------------------------------------------------------------------


def test_tiny_audio_train_and_sample(tmp_path):
    for label, freq in (("low", 400.0), ("high", 2000.0)):
        (tmp_path / "wavs" / label).mkdir(parents=True)
        for i in range(4):
            write_wav(tmp_path / "wavs" / label / f"{i}.wav", tone(freq * (1 + 0.02 * i), 0.3).numpy(), SR)
    run = tmp_path / "run"
    common = ["--preset", "tiny", "--run-dir", run, "--data", tmp_path / "wavs", "--no-progress",
              "--set", "modality=audio"]
    assert run_cli("train-autoencoder", *common)[0] == 0
    assert run_cli("train", *common)[0] == 0
    model = run
    code, _, err = run_cli("sample", "--model", model, "--n", 2, "--class", 1, "--out", tmp_path / "s.wav",
                             "--save-individual", tmp_path / "each", "--spectrograms", tmp_path / "s.png",
                             "--griffin-lim-iters", 2, "--no-progress")
    assert code == 0, err
    wave, rate, record = read_wav(tmp_path / "s.wav")
    assert rate == SR and len(wave) == 2 * SR + SR // 4
    assert record["labels"] == 1 and record["griffin_lim_iters"] == 2 and record["synthetic"] is True
    assert sorted(p.name for p in (tmp_path / "each").iterdir()) == ["00000.wav", "00001.wav"]
    assert (tmp_path / "s.png").stat().st_size > 0
    code, _, err = run_cli("sample", "--model", model, "--n", 1, "--out", tmp_path / "s.txt")
    assert_one_line_error(code, err)
    # editing carries over: audio-to-audio at a strength, and inpainting a time span (the rest is kept exactly)
    clip = tmp_path / "each" / "00000.wav"
    code, _, err = run_cli("edit", clip, "--model", model, "--strength", 0.5, "--steps", 2, "--out",
                           tmp_path / "e.wav")
    assert code == 0, err
    assert read_wav(tmp_path / "e.wav")[2]["strength"] == 0.5
    code, _, err = run_cli("inpaint", clip, "--model", model, "--span", "0.25,0.5", "--steps", 2, "--out",
                           tmp_path / "i.png")
    assert code == 0, err
    from PIL import Image

    from latentdiff.cli.inputs import load_sound
    from latentdiff.pipeline import LatentDiffusion

    original = load_sound(clip, LatentDiffusion.load(model))[0][0, :, :, 0]         # n_mels × frames
    result = np.asarray(Image.open(tmp_path / "i.png"))[::-1]                      # back to row 0 = low band
    frames = np.arange(64) * 250 / SR
    keep = (frames < 0.25) | (frames >= 0.5)
    assert np.array_equal(result[:, keep], original[:, keep])
    code, _, err = run_cli("inpaint", clip, "--model", model, "--span", "0.5,2", "--out", tmp_path / "j.wav")
    assert_one_line_error(code, err, "--span")


def test_lsd_and_mel_l1_measure_a_known_gain():
    from latentdiff.evaluation.audio_features import log_spectral_distance, mel_l1

    front = MelFrontEnd(MelConfig())
    noise = 1e-2 * torch.randn(1, SR, generator=torch.Generator().manual_seed(0))
    x = (tone(500, 0.05) + tone(1500, 0.02))[None] + noise
    assert log_spectral_distance(x, x, front) == 0 and mel_l1(x, x, front) == 0
    assert log_spectral_distance(x, 2 * x, front, floor_db=-300) == pytest.approx(20 * math.log10(2), rel=1e-3)
    assert log_spectral_distance(0 * x, 0 * x + 1e-9, front) == 0                  # below the floor: silence
    assert mel_l1(x, 2 * x, front) == pytest.approx(20 * math.log10(2), rel=0.02)


def test_shipped_audio_model_and_classifier_load():
    from latentdiff.evaluation.features import get_extractor
    from latentdiff.pipeline import LatentDiffusion

    pipe = LatentDiffusion.load("pretrained:spoken-digits")
    assert pipe.cfg.modality == "audio" and pipe.image_shape == (1, 64, 64) and pipe.num_classes == 10
    images, labels = pipe.generate(2, labels=[3, 7], steps=2, seed=0)
    assert images.shape == (2, 64, 64, 1) and list(labels) == [3, 7]
    clf = get_extractor("spoken-digit-classifier")
    assert clf.meta["test_accuracy"] >= 0.97 and clf.predict(images).shape == (2,)

"""Reconstruction quality of the mel codec on held-out voices: mel L1 (dB), log-spectral distance (dB) and the digit
classifier's accuracy on the reconstructed audio, for (a) Griffin-Lim alone (log-mel -> waveform) and (b) the whole
codec (log-mel -> autoencoder -> log-mel -> Griffin-Lim), against the original clips.

    python scripts/eval_audio_codec.py --model pretrained:spoken-digits --n 500 [--iters 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from latentdiff.codecs.mel import MelFrontEnd, uint8_to_waves, waves_to_uint8
from latentdiff.data.spoken_digits import load_waves
from latentdiff.evaluation.audio_features import log_spectral_distance, mel_l1
from latentdiff.evaluation.evaluate import reconstruct
from latentdiff.evaluation.features import get_extractor
from latentdiff.pipeline import LatentDiffusion


def scores(ref: np.ndarray, est: np.ndarray, labels: np.ndarray, front, clf) -> dict:
    r, e = torch.as_tensor(ref), torch.as_tensor(est)
    acc = float((clf.predict(waves_to_uint8(est, front.cfg)) == labels).mean())
    return {"mel_l1_db": round(mel_l1(r, e, front), 3), "lsd_db": round(log_spectral_distance(r, e, front), 3),
            "classifier_accuracy": round(acc, 4)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pretrained:spoken-digits")
    p.add_argument("--data-dir")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--iters", type=int, help="Griffin-Lim iterations (default: the model's)")
    p.add_argument("--classifier", help="digit-classifier weights (default: the shipped asset)")
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(1)

    pipe = LatentDiffusion.load(args.model)
    front = MelFrontEnd(pipe.cfg.mel)
    clf = get_extractor("spoken-digit-classifier", weights=args.classifier)
    waves, labels = load_waves(args.data_dir, "test")
    idx = np.random.default_rng(0).permutation(len(waves))[:args.n]  # a fixed mix of voices and digits
    waves, labels = waves[idx], labels[idx]
    images = waves_to_uint8(waves, front.cfg)
    out = {"n": len(waves), "griffin_lim_iters": args.iters or front.cfg.griffin_lim_iters, "model": args.model,
           "original": {"classifier_accuracy": round(float((clf.predict(images) == labels).mean()), 4)}}
    t0 = time.perf_counter()
    out["griffin_lim"] = scores(waves, uint8_to_waves(images, front.cfg, args.iters), labels, front, clf)
    t1 = time.perf_counter()
    recon = reconstruct(pipe.autoencoder, images, "cpu")
    out["codec"] = scores(waves, uint8_to_waves(recon, front.cfg, args.iters), labels, front, clf)
    out["codec"]["mel_image_l1_db"] = round(float(np.abs(recon.astype(float) - images).mean())
                                            * (front.cfg.db_max - front.cfg.db_min) / 255, 3)
    out["seconds_per_clip_griffin_lim"] = round((t1 - t0) / len(waves), 4)
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()

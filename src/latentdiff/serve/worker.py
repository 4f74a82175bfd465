"""The worker: one thread per device, taking jobs (or batches of compatible generate jobs) off the queue,
running them with per-step progress and cancellation, and writing their images.

Cancellation: the pipeline calls back after every sampler step, and the callback raises
:class:`Cancelled` when a job of the running batch was cancelled, so a job stops within one step. The
other jobs of an interrupted batch go back to the front of the queue.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
from pathlib import Path

import numpy as np
import torch

from latentdiff.errors import LatentDiffError
from latentdiff.pipeline.batch import batch_key, generate_batch
from latentdiff.serve.jobs import Job, JobQueue
from latentdiff.serve.schema import JobSpec
from latentdiff.pipeline.provenance import generation_record, write_output
from latentdiff.pipeline.watermark import WatermarkKey
from latentdiff.utils.images import to_pil, to_uint8

log = logging.getLogger(__name__)
PREVIEWS = 5  # previews of x̂0 per job (plus the last step)


class Cancelled(Exception):
    """Raised from the per-step callback to stop a batch in which a job was cancelled."""


NOT_FROM_NOISE = ("noise mark not applied: inpainting draws fresh noise at every step, and frames between inverted "
                  "images reproduce those images' own noise; the decoder mark is")


def save_image(img: np.ndarray, path, pipe, model: str, record: dict, watermark: WatermarkKey | None,
               sign: bool = True, audio: bool = False, noise_mark: bool = True) -> Path | None:
    """THE one place a served image is written: atomically, through the provenance writer (the record in the
    PNG, a C2PA signature when the `provenance` extra is installed), like every CLI output. `watermark`: the key
    it was made with (its marks are in the pixels already); `noise_mark`: False for inpainting and for an
    interpolation between images, which carry the decoder mark only.
    With `audio` (an audio model's log-mel image) the PNG is the spectrogram with low frequencies at the
    bottom, and a WAV (Griffin-Lim) with the same record is written beside it; returns the WAV's path."""
    note = None if noise_mark else NOT_FROM_NOISE
    extra = {"griffin_lim_iters": pipe.cfg.mel.griffin_lim_iters} if audio else {}
    full = generation_record(pipe, model, record, watermark, sign=sign, watermark_note=note, noise_mark=noise_mark,
                             **extra)
    write_output(path, img[::-1] if audio else img, full, sign=sign)
    if not audio:
        return None
    from latentdiff.codecs.mel import uint8_to_waves
    from latentdiff.utils.audio import write_wav

    wav = Path(path).with_suffix(".wav")
    wave = uint8_to_waves(img[None], pipe.cfg.mel, seed=record.get("seed") or 0)[0]
    write_wav(wav, wave, pipe.cfg.mel.sample_rate, full)
    return wav


def preview_png(pipe, x0_hat: torch.Tensor, flip: bool = False) -> str:
    """A normalised latent estimate (1, c, h, w) -> base64 PNG of its decoding (`flip`: upside down, as an
    audio model's spectrograms are shown)."""
    with torch.no_grad():
        img = to_uint8(pipe.autoencoder.from_latent(x0_hat.float().nan_to_num()).clamp(-1, 1))[0]
    buf = io.BytesIO()
    to_pil(np.ascontiguousarray(img[::-1]) if flip else img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def spec_key(spec: JobSpec):
    return batch_key(spec.request) if spec.kind == "generate" else None


class Worker(threading.Thread):
    def __init__(self, queue: JobQueue, models: dict, *, batching: bool = True, max_batch_images: int = 64,
                 watermark: WatermarkKey | None = None):
        super().__init__(name="latentdiff-worker", daemon=True)
        self.watermark = watermark  # the deployment's key: generate jobs start from keyed z_T
        self.queue = queue
        self.models = models
        self.batching = batching
        self.max_batch_images = max_batch_images
        self.stopping = threading.Event()
        self.batches: list[int] = []  # jobs per sampler call (for the load tests)

    def stop(self):
        self.stopping.set()

    def run(self):
        key = spec_key if self.batching else (lambda spec: None)
        while not self.stopping.is_set():
            jobs = self.queue.take(key, self.max_batch_images)
            if jobs:
                self.batches.append(len(jobs))
                self.run_batch(jobs)

    def run_batch(self, jobs: list[Job]) -> None:
        pipe = self.models[jobs[0].model]
        callback = self._callback(pipe, jobs)
        try:
            results = self._execute(pipe, jobs, callback)
        except Cancelled:
            self.queue.requeue([j for j in jobs if not j.cancel.is_set()])
            for job in jobs:
                if job.cancel.is_set():
                    self.queue.finish(job, "cancelled")
            return
        except LatentDiffError as e:
            for job in jobs:
                self.queue.finish(job, "failed", str(e))
            return
        except Exception as e:  # a bug: logged with its traceback, reported to the client without one
            log.exception("job %s failed", jobs[0].id)
            for job in jobs:
                self.queue.finish(job, "failed", f"internal error ({type(e).__name__}); see the server log")
            return
        for job, images in zip(jobs, results):
            self._write(job, images)

    def _write(self, job: Job, images: np.ndarray) -> None:
        names, sounds = [], []
        pipe = self.models[job.model]
        audio = job.kind == "generate" and pipe.cfg.modality == "audio"
        try:
            for i, img in enumerate(images):
                name = f"{job.id}-{i:03d}.png"
                wav = save_image(img, self.queue.store.images_dir / name, pipe, job.model, job.record, self.watermark,
                                 audio=audio, noise_mark=self._keyed(job))
                names.append(name)
                if wav is not None:
                    sounds.append(wav.name)
        except LatentDiffError as e:  # e.g. the disk is full: the written images stay listed
            self.queue.finish(job, "failed", str(e), names, sounds)
            return
        self.queue.finish(job, "done", images=names, audio=sounds)

    @staticmethod
    def _keyed(job: Job) -> bool:
        """Every job adds keyed noise except inpainting (RePaint) and an interpolation between two images (those
        carry the decoder mark only)."""
        return job.kind not in ("inpaint", "interpolate") or "seeds" in job.spec.options

    def _callback(self, pipe, jobs: list[Job]):
        rows = np.cumsum([0] + [j.spec.request.n if j.kind == "generate" else 1 for j in jobs])
        flip = jobs[0].kind == "generate" and pipe.cfg.modality == "audio"  # as save_image writes them

        def callback(i: int, n: int, x0_hat: torch.Tensor):
            # A stopping server puts its running jobs back as queued: the next start reports them as interrupted.
            if self.stopping.is_set() or any(j.cancel.is_set() for j in jobs):
                raise Cancelled
            every = max(1, n // PREVIEWS)
            for job, row in zip(jobs, rows[:-1]):
                job.step, job.total = i + 1, n
                if i == 0 or (i + 1) % every == 0 or i + 1 == n:
                    job.preview = preview_png(pipe, x0_hat[row:row + 1], flip)
                job.version += 1

        return callback

    def _execute(self, pipe, jobs: list[Job], callback) -> list[np.ndarray]:
        """Each job's uint8 images."""
        from latentdiff.pipeline import control, inpaint

        spec = jobs[0].spec
        req, opt, key = spec.request, spec.options, self.watermark
        if spec.kind == "generate":
            if len(jobs) > 1 or batch_key(req) is not None:
                return generate_batch(pipe, [j.spec.request for j in jobs], callback, watermark=key)
            return [pipe.generate(req, callback=lambda s, i, n, x0: callback(i, n, x0), watermark=key)[0]]
        if spec.kind == "edit":
            return [control.img2img(pipe, spec.images, opt["strength"], req, callback=callback, watermark=key)]
        if spec.kind == "inpaint":
            return [inpaint.inpaint(pipe, spec.images, spec.mask, req, resample=opt["resample"], callback=callback,
                                    watermark=key)]
        if spec.kind == "combine":
            return [control.combine(pipe, spec.images, opt["weights"], opt["strength"], req, callback=callback,
                                    watermark=key)]
        if "seeds" in opt:
            a, b = opt["seeds"]
            return [control.interpolate_seeds(pipe, a, b, opt["frames"], request=req, callback=callback,
                                              watermark=key)]
        one = req.replace(n=1, guidance=1.0, labels=None if req.labels is None else req.labels[0])
        ends = [control.invert(pipe, spec.images[k:k + 1], one) for k in (0, 1)]
        return [control.interpolate_noise(pipe, *ends, opt["frames"], request=req, callback=callback, watermark=key)]

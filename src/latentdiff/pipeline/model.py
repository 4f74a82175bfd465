"""LatentDiffusion: the codec, the denoiser and the config of one model, and generation from a SampleRequest.

The data flow of generation is one straight line: request -> noise z_T -> sampler(guidance(denoiser, Cond))
-> z_0 -> codec.from_latent -> uint8 images. The model directory format lives in ``directory.py``; where
and how the networks run (device, bf16, torch.compile) in ``runtime.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from latentdiff.codecs.autoencoder import Autoencoder
from latentdiff.diffusion.cond import Cond
from latentdiff.diffusion.denoiser import Denoiser, DenoiserFn
from latentdiff.diffusion.schedule import NoiseSchedule
from latentdiff.errors import ConfigError, ModelError
from latentdiff.guidance.cfg import classifier_free
from latentdiff.guidance.gradient import classifier_guidance
from latentdiff.models.unet import UNet
from latentdiff.pipeline import directory as store
from latentdiff.pipeline.config import Config, uses_bf16
from latentdiff.pipeline.decoder_mark import embed, message, nets_for
from latentdiff.pipeline.memory import check_memory
from latentdiff.pipeline.request import ModelDefaults, SampleRequest
from latentdiff.pipeline.runtime import COMPILE_MODES, CompiledNet, under_bf16_autocast
from latentdiff.pipeline.watermark import WatermarkKey, keyed_noise
from latentdiff.sampling.samplers import sample
from latentdiff.utils.images import to_uint8


def build_schedule(cfg: Config) -> NoiseSchedule:
    d = cfg.diffusion
    return NoiseSchedule.create(d.schedule, d.num_train_steps, d.beta_start, d.beta_end, d.zero_terminal_snr)


class LatentDiffusion:
    def __init__(self, cfg: Config, autoencoder: Autoencoder, denoiser: Denoiser, class_names: tuple[str, ...] = ()):
        self.cfg = cfg
        self.autoencoder = autoencoder
        self.denoiser = denoiser
        self.class_names = tuple(class_names)
        self._compiled: dict[str, Denoiser] = {}  # compile mode -> Denoiser sharing the weights
        self.directory: Path | None = None  # where it was loaded from (for its optional classifier)
        self.classifier = None  # a noise-aware classifier for classifier guidance, see load_classifier
        self._text_encoder = None  # loaded on first use (the frozen encoder takes seconds to load)

    @classmethod
    def build(cls, cfg: Config, image_size: tuple[int, int], class_names=()) -> "LatentDiffusion":
        ae = Autoencoder(cfg.autoencoder, image_size)
        den = Denoiser(UNet(cfg.unet), build_schedule(cfg), cfg.diffusion.prediction, cfg.unet.num_classes)
        return cls(cfg, ae, den, class_names)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def num_classes(self) -> int:
        return self.cfg.unet.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.cfg.autoencoder.image_channels, *self.autoencoder.image_size)

    def to(self, device) -> "LatentDiffusion":
        self.autoencoder.to(device)
        self.denoiser.to(device)
        return self

    def eval(self) -> "LatentDiffusion":
        self.autoencoder.eval()
        self.denoiser.eval()
        return self

    # --- saving and loading (the format: directory.py) ---------------------------------------------

    def save(self, directory: str | Path, card: str | None = None, dtype: torch.dtype = torch.float32, extra=None,
             autoencoder_meta: dict | None = None) -> Path:
        return store.write_model(directory, self.cfg, self.autoencoder, self.denoiser.net, self.class_names,
                                     card=card, dtype=dtype, extra=extra, autoencoder_meta=autoencoder_meta)

    @classmethod
    def load(cls, model: str | Path, device: str | torch.device = "cpu") -> "LatentDiffusion":
        """Load a model directory, or `pretrained:NAME` for a model shipped with the package."""
        directory, cfg, image_size, class_names = store.check_model_directory(model)
        pipe = cls.build(cfg, image_size, class_names)
        store.load_weights(directory, pipe.autoencoder, pipe.denoiser.net)
        pipe.directory = directory
        return pipe.to(device).eval()

    def load_classifier(self, path: str | Path | None = None):
        """Load the noise-aware classifier for classifier guidance (default: MODEL_DIR/classifier.safetensors)."""
        from latentdiff.models.classifier import CLASSIFIER_FILE, check_compatible, load_classifier

        if path is None:
            if self.directory is None or not (self.directory / CLASSIFIER_FILE).is_file():
                where = self.directory or "this model"
                raise ModelError(f"{where} has no {CLASSIFIER_FILE} for classifier guidance; train one with "
                                 "`latentdiff train-classifier --model MODEL [--out PATH]`")
            path = self.directory / CLASSIFIER_FILE
        elif not Path(path).is_file():
            raise ModelError(f"classifier file not found: {path}")
        net, meta = load_classifier(path, self.device)
        check_compatible(meta, path, latent_shape=self.autoencoder.latent_shape,
                         num_train_steps=self.denoiser.schedule.num_steps,
                         latent_stats=self.autoencoder.latent_stats())
        self.classifier = net
        return net

    # --- requests ----------------------------------------------------------------------------------

    def defaults(self, classifier_scale: float = 0.0) -> ModelDefaults:
        """This model's defaults and limits for :meth:`SampleRequest.resolve` (loads the classifier when
        classifier guidance is asked for, since its classes bound the labels)."""
        clf_classes = 0
        if classifier_scale and classifier_scale > 0:
            clf = self.classifier if self.classifier is not None else self.load_classifier()
            clf_classes = clf.num_classes
        s = self.cfg.sample
        return ModelDefaults(s.sampler, s.steps, s.guidance, self.denoiser.schedule.num_steps, self.num_classes,
                             clf_classes, text=self.has_text)

    # --- text ----------------------------------------------------------------------------------------

    @property
    def has_text(self) -> bool:
        return self.cfg.text.encoder != "none"

    def text_encoder(self):
        """The model's text encoder (config.json's ``text`` section), loaded once and cached."""
        if self._text_encoder is None:
            from latentdiff.models.text import TextEncoder

            self._text_encoder = TextEncoder(self.cfg.text, self.device)
        return self._text_encoder

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, mask) of each prompt; each distinct prompt is encoded once. Also fixes the null condition
        (the empty prompt) of the denoiser."""
        enc = self.text_encoder()
        if self.denoiser.null_text is None:
            self.denoiser.null_text = enc([""])
            self._compiled.clear()  # compiled copies were made without it
        unique = sorted(set(prompts))
        context, mask = enc(unique)
        index = torch.tensor([unique.index(p) for p in prompts], device=context.device)
        return context[index], mask[index]

    def condition(self, labels: torch.Tensor | None, prompts: list[str] | None) -> Cond | None:
        """The Cond of a batch: its class labels (on a class-conditional model) and prompts (on a text model,
        where no prompts means the empty prompt); None for an unconditional model."""
        labels = labels if self.num_classes else None
        if not self.has_text:
            return Cond(labels=labels) if labels is not None else None
        if prompts is None and labels is None:
            raise ConfigError("a text model's condition needs the prompts (or the labels) of the batch")
        n = len(prompts) if prompts is not None else len(labels)
        context, mask = self.encode_prompts(prompts if prompts is not None else [""] * n)
        return Cond(labels=labels, context=context, context_mask=mask)

    def request(self, request: SampleRequest | int | None = None, **fields) -> SampleRequest:
        """A resolved request: an existing one (fields override it), or one built from `fields`."""
        if isinstance(request, SampleRequest):
            request = request.replace(**fields) if fields else request
        else:
            request = SampleRequest.build(**({"n": request} if request is not None else {}), **fields)
        if request.resolved:
            return request
        return request.resolve(self.defaults(request.classifier_scale))

    def guided_denoiser(self, request: SampleRequest, labels: torch.Tensor | None,
                        prompts: list[str] | None = None) -> DenoiserFn:
        """The denoiser a sampler runs for `request`, for a batch with class `labels` (or None) and `prompts`
        (or None): classifier-free guidance when the denoiser is conditional (away from the negative prompt
        when there is one), classifier guidance on top, bf16 autocast if asked."""
        cond = self.condition(labels, prompts)
        null = None
        if cond is not None and request.negative_prompt is not None:
            null = self.denoiser.null_cond(cond.batch_size, cond.device)
            context, mask = self.encode_prompts([request.negative_prompt] * cond.batch_size)
            null = Cond(labels=null.labels, context=context, context_mask=mask)
        denoiser = self.compiled_denoiser(request.compile) if request.compile else self.denoiser
        fn = classifier_free(denoiser, cond, request.guidance, null) if cond is not None else denoiser.bind(None)
        if request.classifier_scale > 0:
            clf = self.classifier if self.classifier is not None else self.load_classifier()
            fn = classifier_guidance(fn, clf, Cond(labels=labels), request.classifier_scale, self.denoiser.schedule)
        if uses_bf16(request.precision, self.device):
            fn = under_bf16_autocast(fn, self.device.type)
        return fn

    @torch.no_grad()
    def generate(self, request: SampleRequest | int | None = None, *, progress: Callable[[int], None] | None = None,
                 callback: Callable[[int, int, int, torch.Tensor], None] | None = None,
                 watermark: WatermarkKey | None = None, **fields) -> tuple[np.ndarray, np.ndarray | None]:
        """Generate images: uint8 (n, H, W, C) and the labels used (None if unconditional).

        ``generate(SampleRequest(...))`` or ``generate(16, labels=[8] * 16, guidance=3.0, seed=0)`` (the fields
        of :class:`SampleRequest`). The same resolved request gives the same images. The sampler's own
        arithmetic and the decoder always run in float32; `progress(b)` is called after each batch, and
        `callback(start, step, steps, x0_hat)` after every sampler step of the batch whose first sample is
        `start` (x0_hat: the normalised latent estimate; an exception raised there stops generation at once).
        `watermark`: a :class:`WatermarkKey` puts the invisible mark into z_T and, where decoder-mark nets ship for
        the image size, the key's message into the decoded images (opt-in here; the CLI and
        :func:`latentdiff.pipeline.provenance.write_output` callers pass the installation's key).
        """
        req = self.request(request, **fields)
        device = self.device
        self.check_memory(req, min(req.batch_size, req.n))
        gen = torch.Generator(device=device).manual_seed(req.seed)
        options = {"eta": req.eta} if req.sampler == "ddim" else {}
        labels = req.label_tensor(device)
        prompts = req.prompts() if self.has_text else None
        out = []
        for start in range(0, req.n, req.batch_size):
            b = min(req.batch_size, req.n - start)
            noise = self.initial_noise(b, gen, watermark)
            fn = self.guided_denoiser(req, labels[start:start + b] if labels is not None else None,
                                      prompts[start:start + b] if prompts is not None else None)
            step = (lambda i, n, x0, s=start: callback(s, i, n, x0)) if callback else None
            z0 = sample(fn, noise, self.denoiser.schedule, sampler=req.sampler, steps=req.steps, spacing=req.spacing,
                        generator=gen, callback=step, **options)
            out.append(self.decode(z0, req, watermark))
            if progress:
                progress(b)
        return np.concatenate(out), (labels.cpu().numpy() if labels is not None else None)

    def check_memory(self, request: SampleRequest, batch: int) -> None:
        """Refuse in one line a batch of `request` that would not fit in the device's memory (``memory.py``)."""
        guided = bool(self.num_classes) and request.labels is not None and request.guidance != 1.0
        check_memory(self.cfg, self.autoencoder.image_size, batch, guided, self.device)

    def initial_noise(self, batch: int, generator: torch.Generator, watermark: WatermarkKey | None = None
                      ) -> torch.Tensor:
        """z_T ~ N(0, I) for `batch` samples, drawn from `generator` (the one seam where the start of sampling
        is chosen); with a `watermark` key its signs carry the key (still exactly N(0, I), see watermark.py)."""
        noise = torch.randn((batch, *self.autoencoder.latent_shape), generator=generator, device=self.device)
        return keyed_noise(noise, watermark) if watermark is not None else noise

    def decode(self, z0: torch.Tensor, request: SampleRequest | None = None, watermark: WatermarkKey | None = None
               ) -> np.ndarray:
        """Normalised latents -> uint8 images N×H×W×C; a non-finite result is an error naming the likely cause,
        never an image of garbage. With a `watermark` key the decoder mark (``decoder_mark.py``) carries the key's
        message, where nets ship for this image size."""
        images = self.autoencoder.from_latent(z0)
        if not bool(torch.isfinite(images).all()):
            scales = (f" (guidance {request.guidance:g}, classifier scale {request.classifier_scale:g})"
                      if request is not None else "")
            raise ModelError(f"sampling produced non-finite values (NaN or inf){scales}: the guidance scales are "
                             "probably too large for this model, so lower them; if it persists, the model's "
                             "weights or latent statistics are broken")
        nets = nets_for(self.image_shape) if watermark is not None else None
        if nets is not None:
            images = embed(nets, images, message(watermark, int(nets.meta["bits"])))
        return to_uint8(images)

    def compiled_denoiser(self, mode: bool | str = True) -> Denoiser:
        """A Denoiser sharing this one's weights whose U-Net runs through ``torch.compile`` (cached per mode)."""
        mode = "default" if mode is True else mode
        if mode not in COMPILE_MODES:
            raise ConfigError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
        if mode not in self._compiled:
            den = self.denoiser
            self._compiled[mode] = den.with_net(CompiledNet(den.net, mode))
        return self._compiled[mode]

"""SampleRequest: every knob of one generation, resolved against a model's defaults and validated once.

The CLI, the Python API, the control operations, the evaluation and the HTTP API all build one;
:meth:`SampleRequest.to_dict` is the provenance record written into every output. No other module
checks sampler names, step ranges, guidance bounds or class labels.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from latentdiff.errors import ConfigError
from latentdiff.pipeline.config import MAX_SEED, PRECISIONS
from latentdiff.pipeline.runtime import COMPILE_MODES
from latentdiff.sampling.grids import check_grid
from latentdiff.sampling.samplers import check_sampler

MAX_IMAGES = 1_000_000
MAX_BATCH = 65_536
# Guidance scales beyond these give non-finite or saturated images on every model we know; in practice
# classifier-free guidance is used up to ~20 and classifier guidance up to ~30.
MAX_GUIDANCE = 100.0
MAX_CLASSIFIER_SCALE = 1000.0
MAX_PROMPT_CHARS = 1000  # longer prompts are cut to the encoder's max_tokens anyway


@dataclass(frozen=True)
class ModelDefaults:
    """What a request is resolved against: the model's default sampling settings and its limits."""

    sampler: str
    steps: int
    guidance: float
    num_train_steps: int
    num_classes: int                    # the denoiser's classes (0: unconditional)
    classifier_classes: int = 0         # the noise-aware classifier's, when classifier guidance is asked for
    text: bool = False                  # whether the model takes prompts


@dataclass(frozen=True)
class SampleRequest:
    """One generation. `None` fields take the model's defaults in :meth:`resolve`."""

    n: int = 1                              # how many images
    labels: tuple[int, ...] | None = None   # one class per image (an int means every image); None: unconditional
    prompt: tuple[str, ...] | None = None   # one prompt per image (a str means every image); None: the empty prompt
    negative_prompt: str | None = None      # guide away from this prompt instead of the empty one (needs guidance)
    guidance: float | None = None           # classifier-free guidance scale; 1 = none, 0 = unconditional
    classifier_scale: float = 0.0           # classifier guidance scale with the model's noise-aware classifier
    sampler: str | None = None              # a name in sampling.samplers.SAMPLERS
    steps: int | None = None                # length of the timestep grid
    spacing: str | None = None              # a name in sampling.grids.ALL_SPACINGS (default: trailing)
    eta: float = 0.0                        # DDIM stochasticity η in [0, 1] (ddim only)
    seed: int = 0                           # same request and seed, same images
    precision: str = "auto"                 # network arithmetic: auto (bf16 on CUDA), bf16 or fp32
    batch_size: int = 256                   # images per network batch (and per decode)
    compile: str | None = None              # torch.compile mode for the U-Net, or None for eager
    resolved: bool = field(default=False, compare=False, repr=False)

    @classmethod
    def build(cls, n: int = 1, **fields) -> "SampleRequest":
        """A request from keyword arguments; `labels` may be an int, a sequence or an array; `compile=True`
        means the "default" mode."""
        if fields.get("compile") is True:
            fields["compile"] = "default"
        elif fields.get("compile") is False:
            fields["compile"] = None
        if isinstance(fields.get("prompt"), (list, np.ndarray)):
            fields["prompt"] = tuple(fields["prompt"])
        unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
        return cls(n=n, **fields)

    def replace(self, **changes) -> "SampleRequest":
        return dataclasses.replace(self, resolved=False, **changes)

    def resolve(self, defaults: ModelDefaults) -> "SampleRequest":
        """Fill the defaults and check every field; the result is what runs and what is recorded."""
        n = _integer(self.n, "n", 1, MAX_IMAGES)
        sampler = check_sampler(defaults.sampler if self.sampler is None else self.sampler)
        spacing = "trailing" if self.spacing is None else self.spacing
        steps = defaults.steps if self.steps is None else self.steps
        steps = check_grid(defaults.num_train_steps, int(steps) if isinstance(steps, np.integer) else steps, spacing)
        guidance = _number(defaults.guidance if self.guidance is None else self.guidance, "guidance", MAX_GUIDANCE)
        classifier_scale = _number(self.classifier_scale, "classifier scale", MAX_CLASSIFIER_SCALE)
        eta = _number(self.eta, "eta", 1.0)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ConfigError(f"unknown compile mode {self.compile!r}; choose one of {', '.join(COMPILE_MODES)}")
        labels = self._resolve_labels(n, classifier_scale, defaults)
        prompt, negative = self._resolve_prompts(n, defaults)
        return dataclasses.replace(
            self, n=n, labels=labels, prompt=prompt, negative_prompt=negative, guidance=guidance, classifier_scale=classifier_scale, sampler=sampler,
            steps=steps, spacing=spacing, eta=eta, seed=_integer(self.seed, "seed", 0, MAX_SEED),
            batch_size=_integer(self.batch_size, "batch size", 1, MAX_BATCH), resolved=True)

    def _resolve_prompts(self, n: int, defaults: ModelDefaults) -> tuple[tuple[str, ...] | None, str | None]:
        if self.prompt is None and self.negative_prompt is None:
            return None, None
        if not defaults.text:
            raise ConfigError("this model takes no text: --prompt and --negative-prompt cannot be used")
        prompts = self.prompt
        if prompts is not None:
            prompts = (prompts,) * n if isinstance(prompts, str) else tuple(prompts)
            if len(prompts) != n:
                raise ConfigError(f"got {len(prompts)} prompts for {n} images")
        for p in (*(prompts or ()), self.negative_prompt):
            if p is not None and not isinstance(p, str):
                raise ConfigError(f"a prompt must be a string, got {p!r}")
            if p is not None and (len(p) > MAX_PROMPT_CHARS or "\x00" in p):
                raise ConfigError(f"a prompt must be at most {MAX_PROMPT_CHARS} characters without NUL characters")
        return prompts, self.negative_prompt

    def prompts(self) -> list[str]:
        """One prompt per image; the empty prompt (the null condition) when none was given."""
        return list(self.prompt) if self.prompt is not None else [""] * self.n

    def _resolve_labels(self, n: int, classifier_scale: float, defaults: ModelDefaults) -> tuple[int, ...] | None:
        if self.labels is None:
            if classifier_scale > 0:
                raise ConfigError("classifier guidance needs the classes to guide towards (labels / --class)")
            return None
        # An unconditional denoiser takes no labels; with classifier guidance its classifier does.
        num_classes = defaults.num_classes or (defaults.classifier_classes if classifier_scale > 0 else 0)
        if num_classes == 0:
            raise ConfigError("this model is unconditional: --class cannot be used")
        if classifier_scale > 0 and defaults.num_classes and defaults.classifier_classes != defaults.num_classes:
            raise ConfigError(f"the classifier knows {defaults.classifier_classes} classes but the model "
                              f"{defaults.num_classes}")
        labels = class_indices(self.labels, num_classes)
        if labels.ndim == 0:
            labels = labels.expand(n)
        if labels.ndim != 1 or len(labels) != n:
            raise ConfigError(f"got {labels.numel()} labels for {n} images")
        return tuple(int(v) for v in labels)

    def label_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The resolved labels as a (n,) long tensor, or None."""
        return None if self.labels is None else torch.tensor(self.labels, dtype=torch.long, device=device)

    def to_dict(self) -> dict:
        """The provenance record: every field as JSON-ready values (labels compacted to one int when all equal)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "resolved"}
        if self.labels is not None:
            d["labels"] = self.labels[0] if len(set(self.labels)) == 1 else list(self.labels)
        if self.prompt is not None:
            d["prompt"] = self.prompt[0] if len(set(self.prompt)) == 1 else list(self.prompt)
        for key in ("prompt", "negative_prompt"):  # class-only records stay as they were
            if d[key] is None:
                del d[key]
        return d


def class_indices(labels, num_classes: int) -> torch.Tensor:
    """`labels` as a long tensor of class indices in 0…num_classes-1. Arrays and lists are range-checked
    before the conversion, so a value beyond int64 (a uint64 from NumPy) is an error, not a wrap-around."""
    if not isinstance(labels, torch.Tensor):
        arr = np.asarray(labels)
        if arr.size and arr.dtype.kind not in "iu":
            raise ConfigError(f"class labels must be integers, got {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ConfigError(f"class must be between 0 and {num_classes - 1}")
        labels = arr.astype(np.int64)
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConfigError(f"class must be between 0 and {num_classes - 1}")
    return labels


def _integer(value, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return int(value)


def _number(value, name: str, high: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not (math.isfinite(value) and 0 <= value <= high):
        raise ConfigError(f"{name} must be a finite number between 0 and {high:g}, got {value:g}")
    return value

"""Feature extractors for distribution metrics, pluggable by name.

* ``fashion-mnist-classifier`` (default for 28×28 grayscale): a small CNN trained on Fashion-MNIST
  (``scripts/train_classifier.py``), shipped in ``assets/``. Features are its 128-d penultimate
  activations; its logits score the class accuracy of conditional samples.
* ``emoji-classifier`` (for 64×64 RGB emoji): a small CNN trained on the emoji training split
  (``scripts/train_emoji_eval_models.py``), shipped in ``assets/``; 128-d features, emoji categories.
* ``spoken-digit-classifier`` (audio models): a small CNN on 64×64 log-mel images of the spoken digits
  (``scripts/train_audio_classifier.py``, audio_features.py), shipped in ``assets/``: the SC09 protocol.
* ``inception``: Inception-v3 in the layout of the standard FID network (pytorch-fid's
  ``FIDInceptionA/C/E`` blocks, 2048-d pool3 features). Its weights are never downloaded: the user
  supplies the file (e.g. pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``, or the same
  tensors as .safetensors), so "FID" here is only the standard FID when that file is the standard one.

``get_extractor(name, weights=..., device=...)`` returns an :class:`Extractor` whose
``features(images)`` maps uint8 ``N×H×W[×C]`` (or float in [0, 1]) images to an ``N×D`` float32 array.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from latentdiff.errors import ConfigError, DataError, ModelError
from latentdiff.evaluation.audio_features import (
    DIGIT_CLASSIFIER_ARCH_VERSION,
    DIGIT_CLASSIFIER_ASSET,
    MEL_SHAPE,
    DigitClassifier,
)
from latentdiff.evaluation.inception import FIDInceptionV3
from latentdiff.evaluation.metrics import check_images
from latentdiff.utils.state import load_into, load_state

__all__ = ["CLASSIFIER_ARCH_VERSION", "CLASSIFIER_ASSET", "EXTRACTORS", "ClassifierExtractor", "EmojiClassifierExtractor", "Extractor",
           "FIDInceptionV3", "FashionMNISTClassifier", "InceptionExtractor", "get_extractor",
           "weights_digest"]

CLASSIFIER_ASSET = "fashion_mnist_classifier.safetensors"
CLASSIFIER_ARCH_VERSION = 1  # bump when FashionMNISTClassifier's layers change; the asset's header records it


# ----------------------------------------------------------------------------- the Fashion-MNIST classifier


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class FashionMNISTClassifier(nn.Module):
    """Architecture v1: 3 conv blocks (BatchNorm + ReLU + 2×2 max-pool) -> 128-d features -> 10 logits.

    Input: N×1×28×28 in [-1, 1]. Small on purpose (≈0.3 M parameters, ≈8 M MACs per image) so that
    training on a CPU takes minutes and extracting features for 10k images takes seconds.
    """

    def __init__(self, num_classes: int = 10, feature_dim: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(1, 32), nn.MaxPool2d(2),     # 32×14×14
            *_conv_bn(32, 64), nn.MaxPool2d(2),    # 64×7×7
            *_conv_bn(64, 128), nn.MaxPool2d(2),   # 128×3×3
        )
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(128 * 3 * 3, feature_dim, bias=False),
                                   nn.BatchNorm1d(feature_dim), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(0.3)  # between features and head: regularises without touching the features
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.body(x))  # N×128

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))  # N×10 logits


# ----------------------------------------------------------------------------- extractors


def _images_nchw(images, name: str = "images") -> torch.Tensor:
    """Validated images (see metrics.check_images) as float32 N×C×H×W in [0, 1]."""
    x = check_images(images, name)  # N×H×W×C float32 in [0, 1]
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)  # N×C×H×W


def weights_digest(net: nn.Module) -> str:
    """SHA-256 of a network's current parameters and buffers (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes of any dtype, bf16 included
    return h.hexdigest()


class Extractor:
    """Maps image batches to N×D features; :meth:`cache_key` identifies the network + weights (for caches)."""

    name: str = ""
    dim: int = 0
    key: str = ""  # set by extractors built from a weight file; empty means "derive it from the weights"
    max_batch: int = 1 << 16  # caps batch_size where activations are large (Inception at 299×299)

    def __init__(self, net: nn.Module, device):
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:  # x: B×C×H×W in [0, 1] on device
        raise NotImplementedError

    def cache_key(self) -> str:
        """``key`` when set, else the class and a digest of the network's current weights.

        Reference features are cached under this key, so two extractors must never share one: an empty
        key once let a second user-supplied extractor reuse the first one's reference features.
        """
        if self.key:
            return self.key
        net = getattr(self, "net", None)
        if not isinstance(net, nn.Module):
            raise ConfigError(f"extractor {type(self).__qualname__} has an empty `key` and no `net` to derive one "
                              "from; set `key` to a string that identifies its network and weights")
        return f"{type(self).__module__}.{type(self).__qualname__}:{weights_digest(net)}"

    def check_size(self, images) -> None:
        """Raise DataError when this extractor cannot take images of this size."""

    @torch.no_grad()
    def _batches(self, images, batch_size: int, fn) -> np.ndarray:
        if int(batch_size) != batch_size or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.check_size(images)
        x = _images_nchw(images)
        b = min(int(batch_size), self.max_batch)
        out = [fn(x[i:i + b].to(self.device)).float().cpu() for i in range(0, len(x), b)]
        return torch.cat(out).numpy()

    def features(self, images, batch_size: int = 256) -> np.ndarray:
        """Features of a batch of images (uint8 N×H×W[×C], or float in [0, 1]): float32 N×D."""
        return self._batches(images, batch_size, self._forward)

    def predict(self, images, batch_size: int = 256) -> np.ndarray:
        raise ConfigError(f"the {self.name} extractor has no classifier head; use fashion-mnist-classifier")


def _weights_path(weights: str | Path | None, asset: str) -> Path:
    """The user's weight file, or the one shipped in the package's assets (a plain file in an installed package)."""
    if weights is not None:
        return Path(weights).expanduser()
    with resources.as_file(resources.files("latentdiff") / "assets" / asset) as path:
        return Path(path)


class ClassifierExtractor(Extractor):
    name = "fashion-mnist-classifier"
    dim = 128

    def __init__(self, weights: str | Path | None = None, device="cpu"):
        self.weights_path = _weights_path(weights, CLASSIFIER_ASSET)
        tensors, meta = load_state(self.weights_path)
        self.key = f"{self.name}:{_file_id(self.weights_path)}"
        if meta.get("architecture_version") != CLASSIFIER_ARCH_VERSION:
            raise ModelError(f"{self.weights_path} holds classifier architecture version "
                             f"{meta.get('architecture_version')!r}, this latentdiff expects "
                             f"{CLASSIFIER_ARCH_VERSION}; retrain it with scripts/train_classifier.py")
        net = FashionMNISTClassifier()
        _load_into(net, tensors, self.weights_path)
        self.meta = meta
        super().__init__(net, device)

    def check_size(self, images) -> None:
        shape = tuple(np.shape(images))[1:]
        if shape not in ((28, 28), (28, 28, 1)):
            raise DataError(f"the fashion-mnist-classifier extractor takes 28×28 grayscale images, got "
                            f"{'×'.join(map(str, shape))}; use --extractor inception for other sizes")

    def _forward(self, x):
        return self.net.features(x * 2 - 1)

    def logits(self, images, batch_size: int = 256) -> np.ndarray:
        return self._batches(images, batch_size, lambda x: self.net(x * 2 - 1))

    def predict(self, images, batch_size: int = 256) -> np.ndarray:
        """Predicted class index per image (int64 N)."""
        return self.logits(images, batch_size).argmax(axis=1).astype(np.int64)


class InceptionExtractor(Extractor):
    name = "inception"
    dim = 2048
    max_batch = 32  # ~1.5 GB of activations at 299×299

    def __init__(self, weights: str | Path | None = None, device="cpu", *, _random_init: bool = False):
        if _random_init:  # tests only: exercises the code path without a weight file
            net, self.key = FIDInceptionV3(), "inception:random"
        else:
            if weights is None:
                raise ConfigError("the inception extractor needs a weight file: pass --inception-weights PATH "
                                  "(pytorch-fid's pt_inception-2015-12-05-6726825d.pth, or those tensors as "
                                  ".safetensors); latentdiff never downloads weights")
            path = Path(weights).expanduser()
            tensors = _read_weights(path)  # before building the net, so a bad file fails fast
            with torch.device("meta"):  # no random init of 22 M parameters that are overwritten anyway
                net = FIDInceptionV3()
            net = net.to_empty(device="cpu")
            _load_into(net, tensors, path, ignore=("fc.", "AuxLogits."))
            self.key = f"{self.name}:{_file_id(path)}"
        super().__init__(net, device)

    def _forward(self, x):
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grayscale -> 3 identical channels
        elif x.shape[1] != 3:
            raise DataError(f"the inception extractor takes grayscale or RGB images, got {x.shape[1]} channels")
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(x * 2 - 1)


def _file_id(path: Path) -> str:
    """Identifies a weight file's version for the feature caches (path, size, modification time)."""
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a torch.save'd state dict (loaded with weights_only=True)."""
    if not path.is_file():
        raise ModelError(f"inception weights file not found: {path}")
    if path.suffix == ".safetensors":
        return load_state(path)[0]
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    # torch.load's unpickler raises types of its own choosing for corrupt or code-carrying files (and naming
    # pickle.UnpicklingError would import pickle, which tests/test_safety.py forbids): every one becomes ModelError.
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot read inception weights {path}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise ModelError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return obj


def _load_into(net: nn.Module, tensors: dict[str, torch.Tensor], path: Path, ignore: tuple[str, ...] = ()) -> None:
    """Strict load that names the file and the first mismatches; BatchNorm step counters are optional, and
    tensors under the `ignore` prefixes (heads this extractor does not use) are dropped."""
    tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    tensors = {k: v for k, v in tensors.items() if not k.startswith(ignore)}
    for k, v in net.state_dict().items():
        if k.endswith("num_batches_tracked") and k not in tensors:
            tensors[k] = torch.zeros((), dtype=v.dtype)
    load_into(net, tensors, path, f"the {type(net).__name__} network")


class EmojiClassifierExtractor(Extractor):
    """The shipped emoji classifier (:mod:`latentdiff.evaluation.emoji_nets`): 128-d features of RGB images of
    any size (resized to 32×32); ``predict`` gives the emoji category (index into the data set's categories)."""

    name = "emoji-classifier"
    dim = 128

    def __init__(self, weights: str | Path | None = None, device="cpu"):
        from latentdiff.evaluation.text_to_image import CLASSIFIER_ASSET as EMOJI_ASSET
        from latentdiff.evaluation.text_to_image import EmojiJudges

        ref = resources.files("latentdiff") / "assets" / EMOJI_ASSET
        with resources.as_file(ref) as default:
            self.weights_path = Path(weights or default).expanduser()
            judges = EmojiJudges.load(classifier_path=self.weights_path)
        self.key = f"{self.name}:{_file_id(self.weights_path)}"
        super().__init__(judges.classifier, device)

    def check_size(self, images) -> None:
        shape = tuple(np.shape(images))[1:]
        if len(shape) != 3 or shape[2] != 3 or min(shape[:2]) < 8:
            raise DataError(f"the emoji-classifier extractor takes RGB images (N×H×W×3, at least 8×8), got "
                            f"{'×'.join(map(str, shape))}")

    def _forward(self, x):
        return self.net.features(x * 2 - 1)

    def predict(self, images, batch_size: int = 256) -> np.ndarray:
        return self._batches(images, batch_size, lambda x: self.net(x * 2 - 1)[0]).argmax(1).astype(np.int64)


class DigitExtractor(Extractor):
    """The spoken-digit classifier (audio_features.py) on 64×64 log-mel images: 128-d features, 10 logits."""

    name = "spoken-digit-classifier"
    dim = 128

    def __init__(self, weights: str | Path | None = None, device="cpu"):
        self.weights_path = _weights_path(weights, DIGIT_CLASSIFIER_ASSET)
        if not self.weights_path.is_file():
            raise ModelError(f"spoken-digit classifier weights not found: {self.weights_path}; train them with "
                             "scripts/train_audio_classifier.py")
        tensors, meta = load_state(self.weights_path)
        if meta.get("architecture_version") != DIGIT_CLASSIFIER_ARCH_VERSION:
            raise ModelError(f"{self.weights_path} holds digit-classifier architecture version "
                             f"{meta.get('architecture_version')!r}, expected {DIGIT_CLASSIFIER_ARCH_VERSION}")
        self.key = f"{self.name}:{_file_id(self.weights_path)}"
        net = DigitClassifier()
        _load_into(net, {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, self.weights_path)
        self.meta = meta
        super().__init__(net, device)

    def check_size(self, images) -> None:
        shape = tuple(np.shape(images))[1:]
        if shape not in (MEL_SHAPE, (*MEL_SHAPE, 1)):
            raise DataError(f"the spoken-digit classifier takes 64×64 log-mel images (1 channel), got "
                            f"{'×'.join(map(str, shape))}")

    def _forward(self, x):
        return self.net.features(x * 2 - 1)

    def logits(self, images, batch_size: int = 256) -> np.ndarray:
        return self._batches(images, batch_size, lambda x: self.net(x * 2 - 1))

    def predict(self, images, batch_size: int = 256) -> np.ndarray:
        return self.logits(images, batch_size).argmax(axis=1).astype(np.int64)


EXTRACTORS = {"fashion-mnist-classifier": ClassifierExtractor, "inception": InceptionExtractor,
              "emoji-classifier": EmojiClassifierExtractor, "spoken-digit-classifier": DigitExtractor}


def get_extractor(name: str, *, weights: str | Path | None = None, device="cpu") -> Extractor:
    """The extractor called ``name`` (see :data:`EXTRACTORS`), with an optional weight file."""
    if name not in EXTRACTORS:
        raise ConfigError(f"unknown feature extractor {name!r}; choose one of {', '.join(EXTRACTORS)}")
    return EXTRACTORS[name](weights=weights, device=device)

"""Feature extractors: the shipped Fashion-MNIST classifier, the FID-layout Inception-v3, weight-file errors."""

import warnings
from importlib import resources

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from latentdiff.data import load_dataset
from latentdiff.errors import ConfigError, DataError, ModelError
from latentdiff.evaluation.features import (
    CLASSIFIER_ARCH_VERSION,
    CLASSIFIER_ASSET,
    FashionMNISTClassifier,
    FIDInceptionV3,
    InceptionExtractor,
    get_extractor,
)
from latentdiff.evaluation.metrics import classification_accuracy, fd_from_features
from latentdiff.utils.state import save_state


@pytest.fixture(scope="module")
def classifier():
    return get_extractor("fashion-mnist-classifier")


@pytest.fixture(scope="module")
def bundled_test():
    return load_dataset("bundled", "test")


def test_shipped_classifier_is_accurate_small_and_documented(classifier, bundled_test):
    acc = classification_accuracy(classifier.predict(bundled_test.images), bundled_test.labels)
    assert acc >= 0.90, acc
    meta = classifier.meta
    assert meta["architecture_version"] == CLASSIFIER_ARCH_VERSION
    assert meta["test_accuracy"] >= 0.92 and meta["epochs"] >= 1 and meta["train_images"] == 60_000
    asset = resources.files("latentdiff") / "assets" / CLASSIFIER_ASSET
    assert asset.is_file() and len(asset.read_bytes()) < 2_000_000


def test_classifier_features_shape_dtype_and_input_forms(classifier, bundled_test):
    x = bundled_test.images[:20]  # uint8 N×H×W×1
    f = classifier.features(x, batch_size=7)
    assert f.shape == (20, 128) and f.dtype == np.float32 and np.isfinite(f).all()
    assert f.std() > 0
    np.testing.assert_allclose(classifier.features(x), f, atol=1e-5)  # eval mode: batching changes nothing
    np.testing.assert_allclose(classifier.features(x[..., 0]), f, atol=1e-5)  # N×H×W
    np.testing.assert_allclose(classifier.features(x / 255.0), f, atol=1e-5)  # float in [0, 1]
    np.testing.assert_allclose(classifier.features(torch.from_numpy(x)), f, atol=1e-5)
    assert classifier.predict(x).dtype == np.int64 and classifier.predict(x).shape == (20,)


def test_classifier_rejects_other_image_sizes(classifier):
    with pytest.raises(DataError, match="28×28 grayscale"):
        classifier.features(np.zeros((3, 32, 32), np.uint8))
    with pytest.raises(DataError, match="28×28 grayscale"):
        classifier.features(np.zeros((3, 28, 28, 3), np.uint8))


def test_unknown_extractor_lists_the_names():
    with pytest.raises(ConfigError, match="fashion-mnist-classifier, inception"):
        get_extractor("vgg")


def test_classifier_weight_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "none.safetensors"
    with pytest.raises(ModelError, match="none.safetensors"):
        get_extractor("fashion-mnist-classifier", weights=missing)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelError, match="garbage.safetensors"):
        get_extractor("fashion-mnist-classifier", weights=garbage)
    net = FashionMNISTClassifier()
    partial = {k: v for k, v in net.state_dict().items() if not k.startswith("head.")}
    save_state(tmp_path / "partial.safetensors", partial, {"architecture_version": CLASSIFIER_ARCH_VERSION})
    with pytest.raises(ModelError, match=r"partial.safetensors does not match .*missing \(head.weight"):
        get_extractor("fashion-mnist-classifier", weights=tmp_path / "partial.safetensors")
    save_state(tmp_path / "v0.safetensors", net.state_dict(), {"architecture_version": 0})
    with pytest.raises(ModelError, match="architecture version 0"):
        get_extractor("fashion-mnist-classifier", weights=tmp_path / "v0.safetensors")


# ----------------------------------------------------------------------------- Inception


@pytest.fixture(scope="module")
def inception_state():
    """Random tensors in the network's layout (built on the meta device: no slow initialisation)."""
    with torch.device("meta"):
        net = FIDInceptionV3()
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else torch.zeros((), dtype=v.dtype)
            for k, v in net.state_dict().items()}


def test_inception_layout_matches_torchvision_names_and_size(inception_state):
    # torchvision's Inception3 has 27,161,264 parameters; minus fc (2048×1000 + 1000) and AuxLogits
    # (3,326,696) leaves the 21,785,568 of the pool3 feature network.
    params = {k: v for k, v in inception_state.items()
              if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert sum(v.numel() for v in params.values()) == 21_785_568
    for key, shape in [("Conv2d_1a_3x3.conv.weight", (32, 3, 3, 3)),
                       ("Mixed_5b.branch_pool.conv.weight", (32, 192, 1, 1)),
                       ("Mixed_6e.branch7x7dbl_5.conv.weight", (192, 192, 1, 7)),
                       ("Mixed_7c.branch3x3dbl_3b.bn.running_var", (384,))]:
        assert tuple(inception_state[key].shape) == shape, key


def test_inception_needs_a_weight_file():
    with pytest.raises(ConfigError, match="--inception-weights"):
        get_extractor("inception")


def test_inception_loads_pth_and_safetensors(inception_state, tmp_path):
    # pytorch-fid's file also holds the 1008-way `fc` layer, which feature extraction ignores.
    full = {**inception_state, "fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}
    torch.save(full, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in inception_state.items() if "num_batches" not in k},
              str(tmp_path / "w.safetensors"))
    for name in ("w.pth", "w.safetensors"):
        ext = get_extractor("inception", weights=tmp_path / name)
        loaded = ext.net.state_dict()
        for key, value in inception_state.items():
            assert torch.equal(loaded[key], value), (name, key)
        assert ext.dim == 2048 and ext.key.startswith("inception:")


def test_inception_bad_weight_files_raise_model_error(inception_state, tmp_path):
    with pytest.raises(ModelError, match="not found: .*nope.pth"):
        get_extractor("inception", weights=tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="junk.pth"):
        get_extractor("inception", weights=tmp_path / "junk.pth")
    wrong = dict(inception_state)
    wrong["Mixed_5b.branch1x1.conv.weight"] = torch.zeros(1, 1, 1, 1)
    del wrong["Mixed_7c.branch_pool.bn.bias"]
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ModelError, match=r"wrong.pth does not match.*missing \(Mixed_7c.branch_pool.bn.bias.*"
                                         r"Mixed_5b.branch1x1.conv.weight is 1×1×1×1 but .* builds 64×192×1×1"):
        get_extractor("inception", weights=tmp_path / "wrong.pth")
    torch.save({"x": 1}, tmp_path / "notstate.pth")
    with pytest.raises(ModelError, match="notstate.pth does not hold a state dict"):
        get_extractor("inception", weights=tmp_path / "notstate.pth")


@pytest.mark.slow
def test_inception_random_weights_features_and_fd():
    torch.manual_seed(0)
    ext = InceptionExtractor(_random_init=True)
    for m in ext.net.modules():  # scale-preserving init, so features are not all ~0 after 90 layers
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    images = load_dataset("bundled", "test", limit=4).images  # 4×28×28×1
    f = ext.features(images, batch_size=2)
    assert f.shape == (4, 2048) and f.dtype == np.float32 and np.isfinite(f).all() and f.std() > 1e-3
    rgb = ext.features(np.repeat(images[:2], 3, axis=3))  # grayscale is repeated to 3 channels
    np.testing.assert_allclose(rgb, f[:2], rtol=1e-4, atol=1e-5 * np.abs(f).max())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 4 samples of 2048-d features: rank-deficient covariance, expected
        same = fd_from_features(f, f)
        other = fd_from_features(f[:2], f[2:])
    scale = float((f.astype(np.float64) ** 2).sum(axis=1).mean())
    assert same <= 1e-6 * scale and other > 1e-3 * scale

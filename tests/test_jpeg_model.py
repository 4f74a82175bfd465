"""The differentiable JPEG model (training/jpeg_model.py) against Pillow's real encoder, and its gradient."""

import numpy as np
import pytest
import torch

from latentdiff.data.emoji import load_emoji
from latentdiff.training.jpeg_model import (
    CHROMA_TABLE,
    LUMA_TABLE,
    dct_matrix,
    jpeg_model,
    quant_table,
    soft_round,
)
from latentdiff.training.marknet import jpeg_tensor
from latentdiff.utils.images import jpeg_roundtrip


def pil_jpeg(images: np.ndarray, quality: int) -> np.ndarray:
    return jpeg_roundtrip(images, quality).astype(np.float64)


def test_quant_tables_follow_libjpeg_scaling():
    assert quant_table(LUMA_TABLE, 50).flatten().tolist() == list(LUMA_TABLE)  # quality 50: the table itself
    assert quant_table(CHROMA_TABLE, 100).eq(1).all()
    q75 = quant_table(LUMA_TABLE, 75)  # scale 50 %, rounded half up: 16 -> 8, 11 -> 6 (5.5 + 0.5)
    assert q75[0, 0] == 8 and q75[0, 1] == 6 and q75[7, 7] == 50
    assert quant_table(LUMA_TABLE, 1).max() == 255  # baseline clamp
    with pytest.raises(ValueError, match="1..100"):
        quant_table(LUMA_TABLE, 0)


def test_dct_matrix_is_orthonormal_and_its_first_row_is_the_mean():
    d = dct_matrix().double()
    assert torch.allclose(d @ d.T, torch.eye(8, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(d[0], torch.full((8,), 8 ** -0.5, dtype=torch.float64))
    assert d[1, 0] > 0 > d[1, 7]  # the first AC basis falls from left to right


@pytest.mark.parametrize("quality", [50, 75, 95])
@pytest.mark.parametrize("channels,size", [(3, 64), (1, 28), (3, 28)])
def test_model_reproduces_pillow_jpeg(quality, channels, size):
    images = load_emoji("heldout", bundled=True).images[:24, :size, :size, :channels].copy()
    real = pil_jpeg(images, quality)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double()
    model = jpeg_model(x, quality).round().clamp(0, 255).permute(0, 2, 3, 1).numpy()
    own_error = np.abs(real - images).mean()
    # Measured: the model is within 0.15-0.3 levels (grey) and 0.6-1.6 (colour) of Pillow, where JPEG itself
    # moves pixels by 0.5-7 levels. An index or table error moves the model as far from Pillow as JPEG is.
    assert np.abs(model - real).mean() < 0.3 * own_error
    assert np.abs(model - real).mean() < np.abs(model - images).mean()


def test_soft_round_is_near_round_with_zero_gradient_at_integers():
    u = torch.tensor([-1.0, 0.2, 2.5 - 1e-6, 3.0], requires_grad=True)
    v = soft_round(u)
    assert torch.allclose(v, torch.round(u), atol=0.126)
    v.sum().backward()
    assert u.grad[0] == 0 and u.grad[3] == 0 and u.grad[2] > 0.7


def test_jpeg_tensor_is_real_jpeg_forward_and_model_gradient_backward():
    images = load_emoji("heldout", bundled=True).images[:4]
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1).requires_grad_()
    y = jpeg_tensor(x, 75)
    real = pil_jpeg(images, 75)
    assert np.array_equal(np.round((y.detach().permute(0, 2, 3, 1).numpy() + 1) * 127.5), real)
    # a pixel checkerboard is the highest DCT frequency: quantised away at quality 75 (and averaged out of the
    # chroma), so little gradient passes to it. A flat offset (the DC term) passes 3·E[(u − round u)²] ≈ 1/4 of
    # the identity's (measured 0.21 per pixel; the checkerboard 0.014, 1/15 of that).
    checker = (torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2 * 2.0 - 1
    g_hi = torch.autograd.grad((y * checker).sum(), x, retain_graph=True)[0]
    g_dc = torch.autograd.grad(y.sum(), x)[0]
    assert 0.1 < g_dc.mean() < 0.4
    assert (g_hi * checker).sum().abs() < 0.15 * g_dc.sum().abs()
    x_id = x.detach().requires_grad_()
    g_id = torch.autograd.grad((jpeg_tensor(x_id, 75, "identity") * checker).sum(), x_id)[0]
    assert torch.equal(g_id, checker.expand_as(g_id))  # the identity gradient, as before

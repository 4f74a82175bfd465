"""latentdiff's image decoder as a diffusers model, built from diffusers' own blocks (a custom component).

Copied into an exported folder as vae/latentdiff_decoder.py by ``latentdiff export diffusers``. It is not an
AutoencoderKL because latentdiff's layout differs: GroupNorm groups are gcd(32, width) per layer (AutoencoderKL has
one count), there is no mid block, and upsampling reaches each exact size (odd image sizes). ``decode(latents)``
takes *unnormalised* latents (``denormalize`` the diffusion model's latents first: z / latent_scale + latent_shift
per channel, the per-channel form of AutoencoderKL's scaling_factor) and returns images in [-1, 1] (not clamped).
"""

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn


def _groups(channels):
    return math.gcd(32, channels)


def _resnet(cin, cout):
    return ResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=None, groups=_groups(cin),
                         groups_out=_groups(cout), eps=1e-6)


class LatentDiffDecoder(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, latent_channels=4, image_channels=1, widths=(96, 48, 24), num_res_blocks=1,
                 attention_heads=0, sizes=((14, 14), (28, 28)), latent_shift=(0.0,) * 4, latent_scale=(1.0,) * 4):
        super().__init__()
        w = list(widths)  # coarse to fine
        self.conv_in = nn.Conv2d(latent_channels, w[0], 3, padding=1)
        self.mid_attn = None
        if attention_heads:
            self.mid_attn = Attention(w[0], heads=attention_heads, dim_head=w[0] // attention_heads, bias=True,
                                      norm_num_groups=_groups(w[0]), eps=1e-6, residual_connection=True,
                                      upcast_softmax=True, _from_deprecated_attn_block=True)
        self.up_blocks = nn.ModuleList()
        for i in range(len(w)):
            block = nn.Module()
            block.resnets = nn.ModuleList([_resnet(w[max(i - 1, 0)] if j == 0 else w[i], w[i])
                                           for j in range(num_res_blocks + 1)])
            if i < len(w) - 1:
                block.upsamplers = nn.ModuleList([Upsample2D(w[i], use_conv=True)])
            self.up_blocks.append(block)
        self.conv_norm_out = nn.GroupNorm(_groups(w[-1]), w[-1], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(w[-1], image_channels, 3, padding=1)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """The diffusion model's normalised latents -> the decoder's latents, per channel."""
        shift = torch.tensor(self.config.latent_shift, dtype=z.dtype, device=z.device).reshape(1, -1, 1, 1)
        scale = torch.tensor(self.config.latent_scale, dtype=z.dtype, device=z.device).reshape(1, -1, 1, 1)
        return z / scale + shift

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        if self.mid_attn is not None:
            h = self.mid_attn(h)
        for i, block in enumerate(self.up_blocks):
            for resnet in block.resnets:
                h = resnet(h, None)
            if hasattr(block, "upsamplers"):
                h = block.upsamplers[0](h, output_size=tuple(self.config.sizes[i]))
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(z)

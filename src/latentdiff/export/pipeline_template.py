"""A class-conditional latent diffusion pipeline for a folder written by ``latentdiff export diffusers``.

    pipe = DiffusionPipeline.from_pretrained(FOLDER, custom_pipeline=FOLDER, trust_remote_code=True)
    images = pipe(class_labels=[3, 3], guidance_scale=2.0, num_inference_steps=50, generator=g).images

Components: unet (UNet2DModel with num_class_embeds = K + 1: labels 0…K-1 and the null label K), scheduler
(DDIMScheduler reproducing latentdiff's schedule and parameterisation), vae (latentdiff's decoder; a custom
component). Classifier-free guidance (Ho & Salimans 2022): out = out(null) + w · (out(y) - out(null)).
"""

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.models.upsampling import Upsample2D


def _skip_sizes(sample_size, levels):
    """Latent sizes per level: each stride-2 conv gives ceil(n / 2)."""
    sizes = [tuple(sample_size)]
    for _ in range(levels - 1):
        sizes.append(tuple((n + 1) // 2 for n in sizes[-1]))
    return sizes


def fit_upsamplers(unet):
    """UNet2DModel.forward passes no output size to its upsamplers, so a latent size that is not a multiple of
    2^(levels-1) (7×7 for 28×28 images and factor 4) breaks the skip concatenation. Give each Upsample2D the size
    of the skip it meets, as latentdiff's U-Net does. Harmless where the sizes are even."""
    sizes = _skip_sizes(unet.config.sample_size, len(unet.config.block_out_channels))
    ups = [m for block in unet.up_blocks for m in block.modules() if isinstance(m, Upsample2D)]
    for i, up in enumerate(ups):  # up block i runs at level L-1-i and upsamples to level L-2-i
        target = sizes[len(sizes) - 2 - i]

        def hook(module, args, kwargs, target=target):
            kwargs["output_size"] = target
            return args, kwargs

        up.register_forward_pre_hook(hook, with_kwargs=True)


class LatentDiffClassPipeline(DiffusionPipeline):
    def __init__(self, unet, scheduler, vae, class_names=None, default_guidance=1.0, default_steps=50):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)
        self.register_to_config(class_names=list(class_names or []), default_guidance=default_guidance,
                                default_steps=default_steps)
        if isinstance(unet.config.sample_size, int):
            unet.register_to_config(sample_size=[unet.config.sample_size] * 2)
        fit_upsamplers(unet)

    def _labels(self, class_labels, n):
        names = list(self.config.class_names)
        if class_labels is None:
            return None
        if isinstance(class_labels, (int, str)):
            class_labels = [class_labels] * n
        ids = [names.index(c) if isinstance(c, str) else int(c) for c in class_labels]
        if any(not 0 <= i < len(names) for i in ids):
            raise ValueError(f"class labels must be in 0…{len(names) - 1} or one of {names}")
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def __call__(self, class_labels=None, num_images=1, guidance_scale=None, num_inference_steps=None,
                 generator=None, latents=None, output_type="pil", return_dict=True):
        guidance = self.config.default_guidance if guidance_scale is None else float(guidance_scale)
        steps = num_inference_steps or self.config.default_steps
        n = len(class_labels) if isinstance(class_labels, (list, tuple)) else num_images
        labels = self._labels(class_labels, n)
        null = None  # an unconditional U-Net takes no labels; a conditional one takes the null label K
        if self.unet.config.num_class_embeds:
            null = torch.full((n,), self.unet.config.num_class_embeds - 1, dtype=torch.long, device=self.device)
        c = self.unet.config.in_channels
        h, w = self.unet.config.sample_size
        if latents is None:
            latents = torch.randn((n, c, h, w), generator=generator, device="cpu").to(self.device)
        x = latents * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            if labels is None or guidance == 0.0:
                out = self.unet(x, t, class_labels=null).sample
            elif guidance == 1.0:
                out = self.unet(x, t, class_labels=labels).sample
            else:
                both = self.unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample
                cond, uncond = both.chunk(2)
                out = uncond + guidance * (cond - uncond)
            x = self.scheduler.step(out, t, x).prev_sample
        image = self.vae.decode(self.vae.denormalize(x))
        image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()  # N×H×W×C in [0, 1]
        if output_type == "pil":
            image = self.numpy_to_pil(image)
        elif output_type != "np":
            raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        return ImagePipelineOutput(images=image) if return_dict else (image,)


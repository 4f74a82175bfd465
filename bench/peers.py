"""The peers, each trained by the harness's own loop over the same tensors with its library's standard recipe.

* ``diffusers``: ``UNet2DModel`` + ``DDPMScheduler`` with the recipe of diffusers' unconditional
  image-generation training example (``train_unconditional.py``): AdamW lr 1e-4, betas (0.95, 0.999),
  weight decay 1e-6, eps 1e-8, 500 warm-up steps then cosine decay to 0, gradient clipping 1.0,
  ε-prediction MSE, linear β schedule with T = 1000, ``EMAModel`` with warm-up (inv_gamma 1,
  power 3/4, max decay 0.9999). Sampled with ``DDIMPipeline`` (``DDIMScheduler`` built from the
  training scheduler's config, η = 0).
* ``ddpm`` (lucidrains' denoising-diffusion-pytorch): ``Unet`` + ``GaussianDiffusion`` with the
  library's defaults (v-prediction, sigmoid β schedule, T = 1000) and its ``Trainer`` recipe from the
  README: Adam lr 8e-5, betas (0.9, 0.99), gradient clipping 1.0, ``ema_pytorch.EMA`` decay 0.995
  updated every 10 steps. ``sampling_timesteps`` < T selects its DDIM sampler (η = 0).

Both work in pixel space on 28×28 images (no padding: with three resolution levels 28 -> 14 -> 7 both
U-Nets fit 28×28 as is). The cosine decay of diffusers' recipe runs over the wall-clock budget, as
latentdiff's does, because the number of steps a budget allows is not known in advance.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.metadata
import importlib.util
import io
import sys
import types

import numpy as np
import torch
import torch.nn.functional as F
from common import autocast, count_flops, lr_budget, to_uint8_01, train_for

PEERS = ("diffusers", "ddpm")


def available(name: str) -> str | None:
    """None when the peer can run here, else why not (one line)."""
    module = {"diffusers": "diffusers", "ddpm": "denoising_diffusion_pytorch"}[name]
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed (bash bench/install_peers.sh)"
    try:
        _import_peer(name)
    except ImportError as e:
        return f"{module} cannot be imported: {e}"
    return None


@contextlib.contextmanager
def _torchvision_stand_in():
    """denoising-diffusion-pytorch runs ``from torchvision import transforms as T, utils`` at import time for
    its ``Dataset`` (``T.Compose`` ...) and ``Trainer`` (``utils.save_image``); neither is used here,
    and ``Unet``/``GaussianDiffusion`` never touch torchvision. When torchvision is absent, this puts a
    stand-in module with exactly those two names into ``sys.modules`` for the duration of the import
    only; any attribute use on them raises, so a code path that did need torchvision fails loudly."""
    if importlib.util.find_spec("torchvision") is not None:
        yield
        return

    class _Absent(types.ModuleType):
        def __getattr__(self, attr):
            raise ImportError(f"torchvision is not installed; the benchmark's stand-in {self.__name__} has no "
                              f"{attr!r} (only the Unet/GaussianDiffusion path is supported)")

    names = ("torchvision", "torchvision.transforms", "torchvision.utils")
    root = types.ModuleType("torchvision")
    root.transforms, root.utils = _Absent("torchvision.transforms"), _Absent("torchvision.utils")
    stand_ins = {"torchvision": root, "torchvision.transforms": root.transforms, "torchvision.utils": root.utils}
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for name in names:
            if sys.modules.get(name) is stand_ins[name]:
                del sys.modules[name]


def _import_peer(name: str):
    if name == "diffusers":
        import diffusers
        from diffusers.training_utils import EMAModel  # noqa: F401  (fail early if the training helpers are missing)
        return diffusers
    with _torchvision_stand_in():
        import denoising_diffusion_pytorch
    return denoising_diffusion_pytorch


def _version(module: str) -> str:
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return "?"


class _PeerRun:
    kind = "peer"

    def __init__(self, name: str, x: torch.Tensor, device: torch.device, *, size: str, batch: int, sample_steps: int,
                 seed: int = 0):
        self.name, self.x, self.device, self.size = name, x, device, size  # x: N×1×H×W in [-1, 1], on device
        self.batch, self.sample_steps, self.seed = batch, sample_steps, seed
        self.snapshots = []

    def _fit(self, step_fn, loss_fn, budget, snapshot_at, snapshot) -> dict:
        torch.manual_seed(self.seed)
        stats = train_for(step_fn, budget, self.batch, self.device, snapshot_at=snapshot_at, snapshot=snapshot)
        self.snapshots = stats.snapshots
        flops = count_flops(lambda: loss_fn().backward())
        return {"seconds": stats.seconds, "steps": stats.steps, "images": stats.images,
                "train_images_per_s": stats.images_per_s, "flops_per_step": flops,
                "params": {"denoiser": sum(p.numel() for p in self.model.parameters())}}

    def _batch(self, gen):
        return self.x[torch.randint(len(self.x), (self.batch,), generator=gen, device=self.device)]


class DiffusersRun(_PeerRun):
    def __init__(self, *args, **kw):
        super().__init__("diffusers", *args, **kw)
        _import_peer("diffusers")
        from diffusers import DDPMScheduler, UNet2DModel

        torch.manual_seed(self.seed)
        h = self.x.shape[-1]
        attn = {"down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")}
        # the example's 6-level (128, 128, 256, 256, 512, 512) net with attention at the second-coarsest level,
        # cut to 3 levels for 28×28 (full: widths halved; small: quartered, one layer per block)
        arch = {"full": {"layers_per_block": 2, "block_out_channels": (64, 128, 256), **attn},
                "small": {"layers_per_block": 1, "block_out_channels": (32, 64, 128), "norm_num_groups": 16, **attn},
                "tiny": {"layers_per_block": 1, "block_out_channels": (16, 32), "norm_num_groups": 8,
                         "down_block_types": ("DownBlock2D", "DownBlock2D"),
                         "up_block_types": ("UpBlock2D", "UpBlock2D")}}[self.size]
        self.arch = arch
        self.model = UNet2DModel(sample_size=h, in_channels=self.x.shape[1], out_channels=self.x.shape[1],
                                 **arch).to(self.device)
        self.scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")

    def describe(self) -> dict:
        return {"library": f"diffusers {_version('diffusers')}",
                "recipe": "train_unconditional.py: AdamW lr 1e-4 betas (0.95, 0.999) wd 1e-6, 500 warm-up steps + "
                          "cosine, clip 1.0, EMAModel (warm-up, power 3/4, max 0.9999), ε-prediction, linear β",
                "model": f"UNet2DModel {self.arch['block_out_channels']}, {self.arch['layers_per_block']} layers/block",
                "space": "pixels 28×28", "conditional": False, "sampler": f"DDIMPipeline {self.sample_steps} steps"}

    def train(self, budget: float, snapshot_at=()) -> dict:
        from diffusers import UNet2DModel
        from diffusers.training_utils import EMAModel

        model, sched, dev = self.model.train(), self.scheduler, self.device
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
        self.ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75,
                            model_cls=UNet2DModel, model_config=model.config)
        self.ema.to(dev)
        gen = torch.Generator(device=dev).manual_seed(self.seed)

        def loss_fn():
            clean = self._batch(gen)
            noise = torch.randn(clean.shape, generator=gen, device=dev)
            t = torch.randint(sched.config.num_train_timesteps, (len(clean),), generator=gen, device=dev)
            with autocast(dev):
                out = model(sched.add_noise(clean, noise, t), t).sample
            return F.mse_loss(out.float(), noise)

        def step(s, progress):
            for group in opt.param_groups:
                group["lr"] = lr_budget(s, progress, 1e-4, 500, 0.0)
            loss = loss_fn()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            self.ema.step(model.parameters())

        out = self._fit(step, loss_fn, budget, snapshot_at, lambda: [p.detach().clone() for p in self.ema.shadow_params])
        opt.zero_grad(set_to_none=True)
        self.final = [p.detach().clone() for p in self.ema.shadow_params]
        self.sample_net = copy.deepcopy(model).eval().requires_grad_(False)
        return out

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0, state=None):
        from diffusers import DDIMPipeline, DDIMScheduler

        for p, v in zip(self.sample_net.parameters(), self.final if state is None else state):
            p.copy_(v)
        pipe = DDIMPipeline(unet=self.sample_net, scheduler=DDIMScheduler.from_config(self.scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        gen = torch.Generator().manual_seed(seed)
        out = []
        for start in range(0, n, 256):
            b = min(256, n - start)
            images = pipe(batch_size=b, generator=gen, eta=0.0, num_inference_steps=self.sample_steps,
                          output_type="np").images  # b×H×W×C float in [0, 1]
            out.append(np.clip(np.round(images * 255), 0, 255).astype(np.uint8))
        return np.concatenate(out), None


class LucidrainsRun(_PeerRun):
    def __init__(self, *args, **kw):
        super().__init__("ddpm", *args, **kw)
        ddp = _import_peer("ddpm")
        torch.manual_seed(self.seed)
        # README: Unet(dim=64, dim_mults=(1, 2, 4, 8)); three levels fit 28×28 (28 -> 14 -> 7)
        self.arch = {"full": {"dim": 64, "dim_mults": (1, 2, 4)}, "small": {"dim": 32, "dim_mults": (1, 2, 4)},
                     "tiny": {"dim": 16, "dim_mults": (1, 2), "attn_dim_head": 8, "attn_heads": 2}}[self.size]
        unet = ddp.Unet(channels=self.x.shape[1], flash_attn=self.device.type == "cuda", **self.arch)
        self.model = ddp.GaussianDiffusion(unet, image_size=self.x.shape[-1], timesteps=1000,
                                           sampling_timesteps=self.sample_steps).to(self.device)
        self.x01 = (self.x + 1) / 2  # GaussianDiffusion takes [0, 1] images (auto_normalize)

    def describe(self) -> dict:
        return {"library": f"denoising-diffusion-pytorch {_version('denoising-diffusion-pytorch')}",
                "recipe": "README Trainer: Adam lr 8e-5 betas (0.9, 0.99), clip 1.0, EMA 0.995 every 10 steps; "
                          "GaussianDiffusion defaults (v-prediction, sigmoid β, T = 1000)",
                "model": "Unet " + ", ".join(f"{k} {v}" for k, v in self.arch.items()),
                "space": "pixels 28×28", "conditional": False, "sampler": f"DDIM {self.sample_steps} steps"}

    def train(self, budget: float, snapshot_at=()) -> dict:
        from ema_pytorch import EMA

        model, dev = self.model.train(), self.device
        opt = torch.optim.Adam(model.parameters(), lr=8e-5, betas=(0.9, 0.99))
        self.ema = EMA(model, beta=0.995, update_every=10).to(dev)
        gen = torch.Generator(device=dev).manual_seed(self.seed)

        def loss_fn():
            with autocast(dev):
                return model(self.x01[torch.randint(len(self.x01), (self.batch,), generator=gen, device=dev)]).float()

        def step(s, progress):
            loss_fn().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            self.ema.update()

        out = self._fit(step, loss_fn, budget, snapshot_at,
                        lambda: {k: v.detach().clone() for k, v in self.ema.ema_model.state_dict().items()})
        opt.zero_grad(set_to_none=True)
        self.final = {k: v.detach().clone() for k, v in self.ema.ema_model.state_dict().items()}
        self.sample_net = copy.deepcopy(self.ema.ema_model).eval().requires_grad_(False)
        return out

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0, state=None):
        self.sample_net.load_state_dict(self.final if state is None else state)
        torch.manual_seed(seed)  # its samplers draw from the global generator
        out = []
        with contextlib.redirect_stderr(io.StringIO()):  # its sampling loop always shows a tqdm bar
            for start in range(0, n, 256):
                out.append(to_uint8_01(self.sample_net.sample(batch_size=min(256, n - start))))
        return np.concatenate(out), None


RUNS = {"diffusers": DiffusersRun, "ddpm": LucidrainsRun}

#!/usr/bin/env bash
# Install what bench/run.py needs beside latentdiff: matplotlib (plots) and the two peers, at versions that
# work here, WITHOUT letting pip touch torch or pull torchvision (the CPU torch already installed stays):
#   - diffusers: its dependencies are pure Python and torch-free, so a normal install is safe;
#   - denoising-diffusion-pytorch declares torch, torchvision, accelerate and pytorch-fid: it is installed with
#     --no-deps plus only what its Unet/GaussianDiffusion import path needs (einops, ema-pytorch, accelerate,
#     and accelerate's psutil); torchvision is replaced at import time by a stand-in inside bench/peers.py.
# Idempotent: rerunning changes nothing once the pins are installed.
#   bash bench/install_peers.sh
set -euo pipefail
PY=${PYTHON:-python3}
torch_before=$($PY -c "import torch; print(torch.__version__)" 2>/dev/null || echo none)

$PY -m pip install -q "matplotlib==3.11.2" "diffusers==0.42.1" "einops==0.8.2"
$PY -m pip install -q --no-deps "denoising-diffusion-pytorch==2.3.4" "ema-pytorch==0.8.3" "accelerate==1.15.0"
$PY -m pip install -q "psutil==7.2.2"

torch_after=$($PY -c "import torch; print(torch.__version__)" 2>/dev/null || echo none)
if [ "$torch_before" != "$torch_after" ]; then
  echo "install_peers.sh: torch changed from $torch_before to $torch_after; this must not happen" >&2
  exit 1
fi
echo "bench peers installed (torch $torch_after untouched)"

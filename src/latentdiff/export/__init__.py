"""Portable inference: ONNX export + an ONNX Runtime pipeline (extra `onnx`), and a diffusers folder (extra `export`).

The optional libraries are imported inside the functions, so importing this package needs none of them.
"""

from latentdiff.export.diffusers import export_diffusers
from latentdiff.export.onnx import check_parity, export_onnx
from latentdiff.export.runtime import load_onnx

__all__ = ["check_parity", "export_diffusers", "export_onnx", "load_onnx"]

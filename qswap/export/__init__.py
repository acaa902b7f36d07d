"""Deployment: exported graphs that carry qswap's own quantization grids (ONNX QDQ)."""
from qswap.export.onnx import export_encoder, load_session, run_encoder

__all__ = ["export_encoder", "load_session", "run_encoder"]

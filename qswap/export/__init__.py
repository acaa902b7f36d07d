"""Deployment: exported graphs that carry qswap's own quantization grids (ONNX QDQ).

``export_model`` writes a deploy directory (``qswap export --onnx``); ``qswap.export.runtime``
decodes with it in onnxruntime (it imports fairseq); ``qswap.export.onnx_audit.audit_export``
is the deploy audit (``qswap audit DIR --onnx``)."""
from qswap.export.onnx import export_encoder, load_session, run_encoder
from qswap.export.package import export_model, read_manifest

__all__ = ["export_encoder", "export_model", "load_session", "read_manifest", "run_encoder"]

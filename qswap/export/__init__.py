"""Deployment: exported graphs that carry qswap's own quantization grids (ONNX QDQ).

``export_model`` writes a deploy directory (``qswap export --onnx``): an S2T transformer or
conformer as encoder, cross_kv and decoder_step graphs, a wav2vec 2.0 CTC model as one graph;
``qswap.export.runtime`` decodes with it in onnxruntime (it imports fairseq);
``qswap.export.onnx_audit.audit_export`` is the deploy audit (``qswap audit DIR --onnx``)."""
from qswap.export.onnx import export_encoder, load_session, run_encoder
from qswap.export.package import export_model, read_manifest
from qswap.export.wav2vec2 import export_ctc, run_ctc

__all__ = ["export_ctc", "export_encoder", "export_model", "load_session", "read_manifest", "run_ctc",
           "run_encoder"]

"""tools/onnx_bench.py's profile of an exported encoder (onnxruntime's profiler, kernel time per
op type of the optimized graph) and tools/deploy_doc.py's rendering of it."""
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("fairseq")
pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "tests" / "export"))
import deploy_doc  # noqa: E402
import onnx_bench  # noqa: E402
from export_testkit import calibrated, padded_batch  # noqa: E402

from qswap.export.onnx import export_encoder  # noqa: E402
from qswap.models import build_s2t_transformer  # noqa: E402


def test_profile_counts_each_op_of_the_optimized_graph_and_renders(tmp_path):
    net = padded_batch(2, 60, seed=3)
    path = export_encoder(calibrated(build_s2t_transformer()), tmp_path / "encoder.onnx", net)
    profile = onnx_bench.op_times(path, net, threads=1, prefix=tmp_path / "int8", runs=2)
    ops = profile["ops"]
    # onnxruntime's fusions, not the exported ops: the linear layers run as QGemm, no MatMul stays float
    assert ops["QGemm"]["nodes"] == 12 and "MatMul" not in ops and "Gemm" not in ops
    assert all(op["nodes"] > 0 and op["ms"] >= 0 for op in ops.values())
    assert profile["kernel_ms"] == pytest.approx(sum(op["ms"] for op in ops.values()))
    assert 0 < profile["kernel_ms"] <= profile["wall_ms"] and profile["runs"] == 2
    stored = json.loads(json.dumps({"threads": 1, "profile": {"ort_int8": profile, "ort_fp32": profile}},
                                   sort_keys=True))  # as docs/deploy.json holds it: ops sorted by name
    lines = deploy_doc.time_lines(stored)
    assert lines[0] == "### Where the encoder time goes"
    rows = [line.split(" | ")[0][2:] for line in lines if line.startswith("| ")][1:]  # after the header
    assert rows[0] == max(ops, key=lambda k: ops[k]["ms"])  # the slowest op first
    assert "QGemm" in rows
    assert any(line.startswith("| all kernels | ") for line in lines)

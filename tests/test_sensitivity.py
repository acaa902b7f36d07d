import json

import pytest
import torch

import qswap
from qswap.cli import main
from qswap.errors import CalibrationError
from qswap.models import build_s2t_transformer, s2t_net_input
from qswap.sensitivity import SensitivityReport, SiteResult, plot


def _tiny():
    return build_s2t_transformer(encoder_layers=1, decoder_layers=1, encoder_embed_dim=32,
                                 encoder_ffn_embed_dim=64, decoder_ffn_embed_dim=64, conv_channels=32)


@pytest.fixture(scope="module")
def report():
    batch = s2t_net_input(batch=2, frames=32, num_tokens=5)
    return qswap.sensitivity(_tiny(), "w4a8", [batch])


def test_ranking_orders_by_gain_then_by_delta_wer():
    sites = [SiteResult("a", "weight", 4, "g", 30, 20, 0.5), SiteResult("b", "activation", 8, "g", 25, 22, 2.5),
             SiteResult("c", "weight", 4, "g", 40, 19, -0.1)]
    r = SensitivityReport("w4a8", "sqnr", 19.5, sites)
    assert [s.site for s in r.ranked()] == ["b", "a", "c"]
    sites[0].delta_wer, sites[1].delta_wer = 3.0, 1.0
    assert [s.site for s in SensitivityReport("w4a8", "wer", 19.5, sites).ranked()][:2] == ["a", "b"]


def test_every_site_is_probed_both_ways(report):
    qmodel = qswap.convert(_tiny(), "w4a8")
    n_quantizers = len({id(m) for m in qmodel.modules() if isinstance(m, qswap.FakeQuantize)})
    assert len(report.sites) == n_quantizers
    for s in report.sites:
        assert s.gain_db == pytest.approx(s.all_but_sqnr - report.full_sqnr)
        assert s.alone_sqnr >= report.full_sqnr - 1.0  # one site alone hurts less than all of them
    kinds = {s.kind for s in report.sites}
    assert kinds == {"weight", "activation"}
    assert any("softmax_in" in s.site for s in report.sites) and any("residual" in s.site for s in report.sites)


def test_plot_and_json_are_written(report, tmp_path):
    plot(report, str(tmp_path / "s.png"))
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(report.to_dict())


def test_bad_metric_and_no_batches_are_typed_errors():
    with pytest.raises(CalibrationError, match="metric"):
        qswap.sensitivity(_tiny(), "w4a8", [s2t_net_input()], metric="bleu")
    with pytest.raises(CalibrationError, match="at least one batch"):
        qswap.sensitivity(_tiny(), "w4a8", [])
    with pytest.raises(CalibrationError, match="evaluate"):
        qswap.sensitivity(_tiny(), "w4a8", [s2t_net_input()], metric="wer")


def test_sensitivity_cli_on_a_fairseq_checkpoint(float_checkpoint, tmp_path):
    _, data, ckpt = float_checkpoint
    out = tmp_path / "sens.json"
    assert main(["sensitivity", str(ckpt), "--data", str(data), "--recipe", "w4a8", "--calib-batches", "1",
                 "--json", str(out), "--plot", str(tmp_path / "sens.svg"), "--max-sentences", "4"]) == 0
    sites = json.loads(out.read_text())["sites"]
    gains = [s["gain_db"] for s in sites]
    assert gains == sorted(gains, reverse=True) and len(sites) > 20
    assert (tmp_path / "sens.svg").read_text().lstrip().startswith("<?xml")

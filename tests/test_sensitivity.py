import json
import math
import sys

import pytest
import torch
from torch import nn

import qswap
from qswap.cli import main
from qswap.cli.render import json_text
from qswap.errors import CalibrationError
from qswap.models import build_s2t_transformer, s2t_net_input
from qswap.sensitivity import SensitivityReport, SiteResult, output_sqnr, plot


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


def test_sensitivity_cli_on_a_fairseq_checkpoint(float_checkpoint, tmp_path, capsys):
    _, data, ckpt = float_checkpoint
    out = tmp_path / "sens.json"
    assert main(["sensitivity", str(ckpt), "--data", str(data), "--subset", "test", "--batches", "50",
                 "--recipe", "w4a8", "--calib-batches", "1", "--json", str(out), "--plot",
                 str(tmp_path / "sens.svg"), "--max-sentences", "4"]) == 0
    written = json.loads(out.read_text())
    sites = written["sites"]
    gains = [s["gain_db"] for s in sites]
    assert gains == sorted(gains, reverse=True) and len(sites) > 20
    # the batches asked and used are recorded, and fewer than asked is said (it had been neither)
    used = written["settings"]["batches_used"]
    assert written["settings"] == {"subset": "test", "batches": 50, "batches_used": used, "calib_subset": "train",
                                   "calib_batches": 1, "calib_batches_used": 1, "max_sentences": 4, "metric": "sqnr"}
    assert 1 <= used < 50
    assert f"--batches 50: test makes {used} batch(es) of up to 4 utterances, so the SQNR uses {used}" in \
        capsys.readouterr().err
    assert (tmp_path / "sens.svg").read_text().lstrip().startswith("<?xml")


class _Fixed(nn.Module):
    """A "model" whose output is the given tensor, whatever the input."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x):
        return self.out.clone()


def test_a_quantized_output_that_breaks_scores_minus_inf_not_better():
    ref = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    close = torch.tensor([[1.0, 2.0, 3.0, 4.1]])
    broken = torch.tensor([[1.0, float("nan"), 3.0, 4.0]])  # NaN where the float model is finite
    batch = [{"x": None}]
    assert math.isfinite(output_sqnr([ref], _Fixed(close), batch))
    assert output_sqnr([ref], _Fixed(broken), batch) == float("-inf")
    assert output_sqnr([ref], _Fixed(torch.tensor([[1.0, 2.0, float("inf"), 4.0]])), batch) == float("-inf")


def test_where_the_reference_is_not_finite_the_element_is_left_out():
    ref = torch.tensor([[1.0, float("nan"), 3.0]])
    got = torch.tensor([[1.0, float("nan"), 3.0]])
    assert output_sqnr([ref], _Fixed(got), [{"x": None}]) > 200  # equal where it is defined


def _broken_report():
    sites = [SiteResult("encoder.layers.0.fc1.weight_quant", "weight", 4, "encoder.layers.0", 20.0, 25.0, 5.0),
             SiteResult("encoder.layers.0.fc2.input_quant", "activation", 8, "encoder.layers.0",
                        float("-inf"), 30.0, float("inf")),
             SiteResult("decoder.layers.0.fc1.input_quant", "activation", 8, "decoder.layers.0",
                        float("-inf"), float("-inf"), float("nan"))]
    return SensitivityReport("w4a8", "sqnr", float("-inf"), sites)


def test_json_of_a_broken_site_is_valid_json_with_null():
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    data = json.loads(json_text(_broken_report().to_dict()), parse_constant=refuse)
    assert data["full_sqnr"] is None
    by_site = {s["site"]: s for s in data["sites"]}
    assert by_site["encoder.layers.0.fc2.input_quant"]["alone_sqnr"] is None
    assert by_site["encoder.layers.0.fc1.weight_quant"]["gain_db"] == 5.0


@pytest.mark.parametrize("suffix, magic", [("png", b"\x89PNG\r\n\x1a\n"), ("svg", b"<?xml")])
def test_plot_draws_infinite_gains_and_leaves_the_backend_alone(tmp_path, monkeypatch, suffix, magic):
    import matplotlib

    def no_switch(*args, **kwargs):
        raise AssertionError("plot must not switch the process's matplotlib backend")

    backend = matplotlib.rcParams._get_backend_or_none()
    monkeypatch.setattr(matplotlib, "use", no_switch)
    plot(_broken_report(), str(tmp_path / f"s.{suffix}"))
    assert (tmp_path / f"s.{suffix}").read_bytes().lstrip()[:len(magic)] == magic
    assert matplotlib.rcParams._get_backend_or_none() == backend
    assert [p.name for p in tmp_path.iterdir()] == [f"s.{suffix}"]  # written atomically: no temp left


def test_plot_without_matplotlib_fails_before_the_run(tmp_path, monkeypatch, capsys):
    """The check comes first: the checkpoint (missing here) is never loaded."""
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # import fails
    assert main(["sensitivity", str(tmp_path / "missing.pt"), "--data", str(tmp_path),
                 "--plot", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err
    assert "pip install matplotlib" in err and "missing.pt" not in err


def test_sensitivity_cli_renders_and_writes_a_broken_site(float_checkpoint, tmp_path, monkeypatch, capsys):
    """-inf / nan numbers go through the table, the JSON (as null) and the plot without a crash."""
    sens = sys.modules["qswap.sensitivity"]  # the module: qswap.sensitivity is the function
    _, data, ckpt = float_checkpoint
    monkeypatch.setattr(sens, "sensitivity", lambda *args, **kwargs: _broken_report())
    out = tmp_path / "sens.json"
    assert main(["sensitivity", str(ckpt), "--data", str(data), "--calib-batches", "1", "--max-sentences", "4",
                 "--json", str(out), "--plot", str(tmp_path / "sens.png")]) == 0
    assert "-inf" in capsys.readouterr().out
    assert json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(c))["full_sqnr"] is None
    assert (tmp_path / "sens.png").exists()


def test_gain_of_a_site_is_a_number_when_outputs_break():
    from qswap.sensitivity import _gain

    inf = float("inf")
    assert _gain(-inf, -inf) == 0.0 and _gain(inf, inf) == 0.0
    assert _gain(20.0, -inf) == inf  # this site alone breaks the output
    assert _gain(12.5, 11.0) == pytest.approx(1.5)


def test_a_recipe_with_a_data_transform_is_probed_with_the_calibration_batches():
    """SmoothQuant folds statistics of the calibration batches: sensitivity converts with them
    (as ``qswap eval`` does) and probes the transformed model's sites."""
    recipe = {"version": 1, "name": "w4a8_sq", "transforms": [{"smoothquant": {"alpha": 0.5}}],
              "defaults": {"weight": {"bits": 4}, "activation": {"bits": 8}}}
    batch, calib = s2t_net_input(batch=2, frames=32, num_tokens=5), s2t_net_input(batch=2, frames=40, num_tokens=5, seed=1)
    result = qswap.sensitivity(_tiny(), recipe, [batch], calib_batches=[calib])
    assert result.recipe == "w4a8_sq" and result.sites
    assert all(math.isfinite(s.alone_sqnr) for s in result.sites)


def test_a_wav2vec2_model_with_a_weight_normed_conv_is_probed():
    """wav2vec 2.0's positional convolution is weight-normed: its ``weight`` is not a leaf, which a
    plain deepcopy refuses; the probe copies the float model as ``convert`` does."""
    pytest.importorskip("fairseq")
    from qswap.models import build_wav2vec2_ctc, wav2vec2_net_input

    report = qswap.sensitivity(build_wav2vec2_ctc(), "w8a8", [wav2vec2_net_input()])
    assert report.sites and all(math.isfinite(s.gain_db) or s.gain_db == -math.inf for s in report.sites)


@pytest.mark.parametrize("name", ["s.pdf", "s.jpg", "s", "s.png.txt"])
def test_plot_refuses_a_format_it_does_not_write(tmp_path, name):
    """plot writes PNG or SVG: s.pdf had been a PNG named .pdf."""
    from qswap.errors import OutputError

    with pytest.raises(OutputError, match=r"written as \.png or \.svg"):
        plot(_broken_report(), str(tmp_path / name))
    assert list(tmp_path.iterdir()) == []


def test_plot_takes_an_upper_case_extension(tmp_path):
    plot(_broken_report(), str(tmp_path / "s.SVG"))
    assert (tmp_path / "s.SVG").read_bytes().lstrip().startswith(b"<?xml")


def test_a_recipe_that_quantizes_nothing_is_refused_with_a_recipe_to_pick():
    """sensitivity(model, "fp32") said "convert it first (qswap.convert(model, recipe))", advice for
    a model that was never converted; the recipe is what to change."""
    from qswap.models import build_s2t_transformer, s2t_net_input

    x = s2t_net_input()
    with pytest.raises(CalibrationError, match="recipe fp32 quantizes nothing in this model.*pick one"):
        qswap.sensitivity(build_s2t_transformer(), "fp32", [x])


@pytest.mark.parametrize("top_k", [-2, 0, True, 2.5, "3"])
def test_a_top_k_that_is_no_positive_count_is_refused(top_k):
    """-2 had measured all sites but the last two, 0 none, True one, 2.5 a raw TypeError."""
    with pytest.raises(CalibrationError, match=f"top_k is how many sites metric='wer' decodes, .* got {top_k!r}"):
        qswap.sensitivity(_tiny(), "w4a8", [s2t_net_input()], metric="wer", evaluate=lambda m: 0.0, top_k=top_k)


def test_an_all_zero_reference_matched_exactly_is_no_noise_not_broken():
    """signal / max(noise, 1e-30) was 0 / 1e-30: -inf dB, the score of a broken model, for the
    float model against itself."""
    zeros = torch.zeros(1, 4)
    batch = [{"x": None}]
    assert output_sqnr([zeros], _Fixed(zeros), batch) == float("inf")
    assert output_sqnr([zeros], _Fixed(torch.tensor([[0.0, 0.1, 0.0, 0.0]])), batch) == float("-inf")


@pytest.mark.parametrize("value", [float("nan"), None, "3"])
def test_an_evaluate_that_returns_no_finite_wer_is_a_calibration_error(value):
    """NaN had ranked NaN WER differences; None had been a raw TypeError."""
    batch = s2t_net_input(batch=1, frames=24, num_tokens=4)
    with pytest.raises(CalibrationError, match="evaluate\\(model\\) must return a finite WER"):
        qswap.sensitivity(_tiny(), "w4a8", [batch], metric="wer", evaluate=lambda m: value, top_k=1)


def _noise_at_padding(reference: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``reference`` with a large error wherever ``real`` (broadcast to it) is False."""
    return torch.where(real.expand_as(reference), reference, reference + 100.0)


def test_the_output_sqnr_reads_only_the_positions_a_decode_reads():
    """A CTC model's padded frames are never decoded: scored, they had decided the ranking (on a
    wav2vec 2.0 batch, most of a LayerNorm input's output noise)."""
    from qswap.models import build_wav2vec2_ctc, wav2vec2_net_input
    from qswap.sensitivity import output_positions, output_sqnr

    model, net = build_wav2vec2_ctc().eval(), wav2vec2_net_input(3, 4000, seed=0)
    with torch.no_grad():
        out, real = output_positions(model, net)
    assert real is not None and not bool(real.all()) and bool(real.any())
    assert output_sqnr([_noise_at_padding(out, real)], model, [net]) > 200  # float rounding only
    assert output_sqnr([out + 1.0], model, [net]) < 40  # an error at decoded positions still counts

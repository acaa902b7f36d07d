"""tools/integer_sites.py: each integer op of a real fairseq model (pre-norm s2t_transformer,
small) on the fake-quant codes of its inputs, against its reader's fake-quant codes. Under
``simulate: integer`` no site differs; every site of the encoder and decoder is counted."""
import importlib.util
import warnings
from pathlib import Path

import pytest

pytest.importorskip("fairseq")

import qswap  # noqa: E402
from qswap.models import build_s2t_transformer, s2t_net_input  # noqa: E402
from qswap.recipe import with_simulate  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("integer_sites", REPO / "tools" / "integer_sites.py")
integer_sites = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(integer_sites)


@pytest.mark.parametrize("recipe", ["w8a8", "w4a8"])
def test_no_site_differs_under_integer_simulation(recipe):
    net_input = s2t_net_input()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = qswap.convert(build_s2t_transformer(encoder_normalize_before=True, decoder_normalize_before=True, seed=0),
                          with_simulate(recipe, "integer"))
        qswap.calibrate(q, [net_input])
    tally = integer_sites.Tally()
    integer_sites.encoder_sites(q, net_input, tally)
    integer_sites.decoder_sites(q, net_input, tally)
    assert {"softmax", "attention scores q k^T (requant)", "subsample GLU0", "fc2", "decoder LayerNorm",
            "output projection (onto the logits grid)"} <= set(tally.rows)
    assert all(outputs > 0 for outputs, _, _ in tally.rows.values())
    assert {site: different for site, (_, different, _) in tally.rows.items() if different} == {}
    assert "| softmax |" in tally.render("title")

"""qswap.integration.cost: MACs and BOPs of one forward, weighted by the operands' quantizer widths."""
import warnings

import pytest

pytest.importorskip("fairseq")

import qswap  # noqa: E402
from helpers import recipe_with  # noqa: E402
from qswap.integration.cost import measure  # noqa: E402
from qswap.models import build_s2t_transformer, s2t_net_input  # noqa: E402


@pytest.mark.parametrize("simulate", ["float", "integer"])
def test_every_mac_of_w8a8_weighs_8_by_8_bits_whatever_the_simulation(simulate):
    """``simulate: integer`` runs its GEMMs on codes it derives from the quantizers' outputs; the
    count still reads the quantizers' widths (it runs the float insides)."""
    net_input = s2t_net_input()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = qswap.convert(build_s2t_transformer(seed=0), recipe_with("w8a8", simulate))
        qswap.calibrate(q, [net_input])
    cost = measure(q, lambda m: m(**net_input), audio_seconds=1.0)
    assert cost.macs > 0 and cost.bops == pytest.approx(64 * cost.macs)
    assert all(m.simulate == simulate for m in q.modules() if hasattr(m, "simulate"))  # restored


def test_the_float_model_counts_32_bit_operands():
    net_input = s2t_net_input()
    model = build_s2t_transformer(seed=0).eval()
    cost = measure(model, lambda m: m(**net_input), audio_seconds=2.0)
    assert cost.bops == pytest.approx(32 * 32 * cost.macs)
    assert cost.macs > 0 and cost.macs_per_second == pytest.approx(cost.macs / 2.0)

import pytest
import torch

from qswap.quant.fake_quantize import FakeQuantize
from qswap.quant.spec import QuantSpec
from qswap.quant.switch import enabled_only


def _frozen(seed):
    fq = FakeQuantize(QuantSpec(bits=4))
    fq(torch.randn(64, generator=torch.Generator().manual_seed(seed)))
    fq.freeze()
    return fq


def test_only_the_kept_quantizers_quantize_inside_the_block():
    a, b, c = (_frozen(s) for s in range(3))
    x = torch.linspace(-1, 1, 101)
    with enabled_only([a, b, c], keep=[b]):
        assert [q.enabled for q in (a, b, c)] == [False, True, False]
        torch.testing.assert_close(a(x), x)  # float passes through
        assert not torch.equal(b(x), x)  # 4-bit grid changes values
    assert [q.enabled for q in (a, b, c)] == [True, True, True]


def test_previous_flags_come_back_even_when_the_probe_raises():
    a, b = _frozen(0), _frozen(1)
    b.enabled = False  # someone else's probe state survives ours
    with pytest.raises(RuntimeError, match="probe failed"):
        with enabled_only([a, b], keep=[b]):
            raise RuntimeError("probe failed")
    assert (a.enabled, b.enabled) == (True, False)


def test_a_weight_site_switched_off_is_float_in_the_integer_simulation():
    """Under ``simulate: integer`` a linear keeps its integer form (built with its weights on their
    grid) between calls. The sensitivity probe "every site but this one" switched a weight site
    off after that form was kept, and the form was read anyway: 114 of the shipped model's 117
    weight sites showed a gain of exactly 0 dB. ``switch`` marks the grid written, so the form is
    rebuilt: the output moves as far as with no form kept, and back when the site comes back."""
    pytest.importorskip("fairseq")
    import qswap
    from qswap.models import build_s2t_transformer, s2t_net_input
    from qswap.recipe import with_simulate

    qmodel = qswap.convert(build_s2t_transformer(seed=0), with_simulate("w4a8", "integer")).eval()
    net_input = s2t_net_input(seed=1)
    qswap.calibrate(qmodel, [net_input])
    fc1 = qmodel.encoder.transformer_layers[0].fc1
    everything = [q for _, q in qmodel.named_modules() if isinstance(q, FakeQuantize)]

    def out():
        with torch.no_grad():
            return qmodel(**net_input)[0]

    quantized = out()  # every site on: fc1's integer form is kept
    with enabled_only(everything, keep=[q for q in everything if q is not fc1.weight_quant]):
        switched = out()
    for slot in [s for s in vars(fc1) if s.startswith("_integer")]:
        del fc1.__dict__[slot]
    fc1.weight_quant.enabled = False
    fresh = out()  # the same probe with no form kept
    fc1.weight_quant.enabled = True
    assert not torch.equal(switched, quantized)
    torch.testing.assert_close(switched, fresh, rtol=0, atol=0)
    assert torch.equal(out(), quantized)
    assert fc1.weight_quant.kind == "weight"


def test_assigning_enabled_marks_the_grid_written_as_switch_does():
    """A user's own probe writes ``q.enabled = False``: the grid tensors' versions move, so a
    form kept with the site on (stamped with them) is rebuilt; an unchanged flag moves nothing,
    and the flag stays a plain bool the quantizer's call reads."""
    q = _frozen(0)
    before = (q.scale._version, q.zero_point._version)
    q.enabled = True  # unchanged
    assert (q.scale._version, q.zero_point._version) == before
    q.enabled = 0
    assert q.enabled is False and q.__dict__["enabled"] is False
    assert q.scale._version > before[0] and q.zero_point._version > before[1]
    x = torch.linspace(-1, 1, 101)
    torch.testing.assert_close(q(x), x)
    q.enabled = True
    assert not torch.equal(q(x), x)


def _kept_form_follows(recipe, change, restore):
    """fc1 of a small S2T transformer (``recipe`` under ``simulate: integer``, calibrated) keeps its
    integer form; after ``change(fc1.weight_quant)`` the output moves, and is the output of the same
    model with no form kept; after ``restore(...)`` it is the first output again."""
    pytest.importorskip("fairseq")
    import qswap
    from qswap.models import build_s2t_transformer, s2t_net_input
    from qswap.recipe import with_simulate

    qmodel = qswap.convert(build_s2t_transformer(seed=0), with_simulate(recipe, "integer")).eval()
    net_input = s2t_net_input(seed=1)
    qswap.calibrate(qmodel, [net_input])
    fc1 = qmodel.encoder.transformer_layers[0].fc1

    def out():
        with torch.no_grad():
            return qmodel(**net_input)[0]

    quantized = out()  # fc1's integer form is kept
    assert any(s.startswith("_integer") for s in vars(fc1))
    change(fc1.weight_quant)
    changed = out()
    for slot in [s for s in vars(fc1) if s.startswith("_integer")]:
        del fc1.__dict__[slot]
    fresh = out()  # no form kept
    restore(fc1.weight_quant)
    assert not torch.equal(changed, quantized)
    torch.testing.assert_close(changed, fresh, rtol=0, atol=0)
    assert torch.equal(out(), quantized)


def test_a_weight_site_assigned_off_is_float_in_the_integer_simulation():
    """The probe of the test above written with plain assignments: no kept form is read stale."""
    _kept_form_follows("w4a8", lambda q: setattr(q, "enabled", False), lambda q: setattr(q, "enabled", True))


def test_a_new_spec_marks_the_grid_written_and_an_equal_one_does_not():
    """``qswap.search`` re-grids a weight by assigning its quantizer a new spec: the grid tensors'
    versions move as for ``enabled`` (kept forms are stamped with them); an equal spec moves nothing."""
    q = _frozen(0)
    before = (q.scale._version, q.zero_point._version)
    q.spec = q.spec.replace()  # equal
    assert (q.scale._version, q.zero_point._version) == before
    q.spec = q.spec.replace(bits=3)
    assert q.scale._version > before[0] and q.zero_point._version > before[1]


def test_a_weight_respecified_is_read_at_its_new_width_in_the_integer_simulation():
    """Under ``simulate: integer`` fc1 keeps its integer form, built from its 8-bit weight codes.
    Its weight quantizer given a 4-bit spec, the next forward reads the 4-bit codes: the output of
    a model with no form kept, and the 8-bit output again when the spec comes back."""
    eight = []

    def to_four(q):
        eight.append(q.spec)
        q.spec = q.spec.replace(bits=4)
    _kept_form_follows("w8a8", to_four, lambda q: setattr(q, "spec", eight[0]))

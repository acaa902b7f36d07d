import copy

import pytest
import torch

from helpers import on_grid
from qswap.errors import CalibrationError
from qswap.quant.fake_quantize import FakeQuantize
from qswap.quant.spec import QuantSpec


@pytest.mark.parametrize("observer", ["minmax", "moving_average", "percentile", "mse"])
def test_activation_quantizer_observes_then_freezes(observer):
    fq = FakeQuantize(QuantSpec(bits=8, symmetric=False, observer=observer))
    for seed in range(3):
        fq(torch.randn(32, 16, generator=torch.Generator().manual_seed(seed)))
    fq.freeze()
    scale = fq.scale.clone()
    y = fq(torch.randn(32, 16) * 100)  # frozen: the grid does not follow the new range
    torch.testing.assert_close(fq.scale, scale)
    assert on_grid(y, fq.scale, fq.zero_point, fq.spec.qmin, fq.spec.qmax)
    assert int(fq.observer.num_batches) == 3


def test_percentile_and_mse_clip_outliers_that_minmax_keeps():
    x = torch.cat([torch.randn(10000), torch.tensor([80.0])])
    scales = {}
    for observer in ("minmax", "percentile", "mse"):
        fq = FakeQuantize(QuantSpec(bits=8, observer=observer))
        fq(x)
        scales[observer] = float(fq.scale)
    assert scales["percentile"] < scales["minmax"] / 4
    assert scales["mse"] < scales["minmax"]


def test_frozen_quantizer_without_grid_is_a_typed_error():
    fq = FakeQuantize(QuantSpec())
    with pytest.raises(CalibrationError, match="no data"):
        fq.freeze()
    fq.frozen.fill_(True)
    with pytest.raises(CalibrationError, match="calibrate"):
        fq(torch.randn(3))


def test_nan_input_is_a_typed_error():
    fq = FakeQuantize(QuantSpec())
    with pytest.raises(CalibrationError, match="NaN"):
        fq(torch.tensor([1.0, float("nan")]))


def test_weight_quantizer_follows_the_weight_and_caches_in_eval():
    w = torch.nn.Parameter(torch.randn(8, 4))
    fq = FakeQuantize(QuantSpec(bits=4, granularity="per_channel"), kind="weight").eval()
    with torch.no_grad():
        first = fq(w)
        assert fq(w) is first  # cached while the weight is unchanged
        w.mul_(2)  # an optimizer step or a loaded state_dict bumps the version
        second = fq(w)
    assert second is not first
    torch.testing.assert_close(second, first * 2)
    assert on_grid(second, fq.scale, fq.zero_point, -8, 7, axis=0)


def test_lsq_scale_is_learnable():
    fq = FakeQuantize(QuantSpec(bits=4, learnable=True))
    x = torch.randn(64)
    fq(x)
    fq.freeze()
    assert isinstance(fq.scale, torch.nn.Parameter)
    fq.train()
    loss = (fq(x) - x * 0.5).pow(2).sum()
    loss.backward()
    assert fq.scale.grad is not None and torch.isfinite(fq.scale.grad).all()


def test_an_optimizer_step_past_zero_leaves_the_learned_scale_positive():
    # Adam moves a scale by about its learning rate whatever the gradient: a small scale crosses
    # zero, and a negative scale has no integer form (no fixed-point multiplier)
    spec = QuantSpec(bits=4, symmetric=True, narrow_range=True, granularity="per_channel", axis=0, learnable=True)
    fq = FakeQuantize(spec)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    fq(x)
    fq.freeze()
    fq.train()
    with torch.no_grad():
        fq.scale[1] = 1e-4
    opt = torch.optim.Adam([fq.scale], lr=1e-3)
    fq(x).sum().backward()  # dL/ds of channel 1 > 0 or < 0: force the sign of the step below
    fq.scale.grad = torch.zeros_like(fq.scale)
    fq.scale.grad[1] = 1.0
    opt.step()
    assert float(fq.scale.detach()[1]) < 0  # the step crossed zero
    crossed = fq.scale.detach().clone()
    y = fq(x)  # the next training call projects before it rounds: |s|
    assert (fq.scale > 0).all()
    torch.testing.assert_close(fq.scale.detach(), crossed.abs())
    y.sum().backward()  # autograd kept the projected scale
    assert torch.isfinite(fq.scale.grad).all()
    assert on_grid(y.detach(), fq.scale.detach(), fq.zero_point, -7, 7, axis=0)
    with torch.no_grad():
        fq.scale[2] = -fq.scale[2]  # the last step before evaluation crossed zero
    fq.eval()  # evaluation (and fairseq's save after validation) sees the projected scale
    assert (fq.scale > 0).all()


def test_a_weight_quantizer_refuses_a_learnable_spec():
    """A weight's grid is re-derived from the weight at every training step: a learned weight
    scale was accepted and never trained."""
    from qswap.errors import SpecError
    with pytest.raises(SpecError, match="LSQ learns activation grids; a weight grid follows its weight"):
        FakeQuantize(QuantSpec(bits=4, learnable=True), kind="weight")


def test_keep_scale_positive_leaves_a_positive_scale_and_a_buffer_alone():
    fq = FakeQuantize(QuantSpec(bits=4, learnable=True))
    fq(torch.randn(64))
    fq.freeze()
    version = fq.scale._version
    assert not fq.keep_scale_positive() and fq.scale._version == version  # nothing to write
    fixed = FakeQuantize(QuantSpec(bits=4))
    fixed(torch.randn(64))
    assert not fixed.keep_scale_positive()


def test_state_dict_round_trip_restores_grid_and_frozen_flag():
    fq = FakeQuantize(QuantSpec(bits=8, granularity="per_channel", axis=1))
    fq(torch.randn(5, 6))
    fq.freeze()
    fresh = FakeQuantize(QuantSpec(bits=8, granularity="per_channel", axis=1))
    fresh.load_state_dict(fq.state_dict())
    x = torch.randn(5, 6)
    assert bool(fresh.frozen)
    torch.testing.assert_close(fresh(x), fq(x))


def test_deepcopy_drops_the_weight_cache():
    w = torch.nn.Parameter(torch.randn(4, 4))
    fq = FakeQuantize(QuantSpec(), kind="weight").eval()
    with torch.no_grad():
        fq(w)
    assert copy.deepcopy(fq)._cached is None


def test_weight_grid_follows_in_place_data_updates_after_a_training_forward():
    w = torch.nn.Parameter(torch.randn(8, 4))
    fq = FakeQuantize(QuantSpec(bits=8), kind="weight")
    fq.eval()
    with torch.no_grad():
        before = fq(w).clone()
    w.data.mul_(2)  # what fairseq's CPU Adam does: no version bump
    fq.train()
    fq(w)  # a training step re-derives the grid
    fq.eval()
    with torch.no_grad():
        torch.testing.assert_close(fq(w), before * 2)


def test_learned_activation_scale_written_through_data_is_used_at_the_next_inference():
    """A QAT step of a learned (LSQ) activation scale with fairseq's Adam, which writes it through
    ``.data`` (no version bump): the next inference call uses the new grid, not the one it kept
    before the training forward."""
    fq = FakeQuantize(QuantSpec(bits=4, symmetric=False, learnable=True))
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fq(x)
    fq.freeze()
    fq.eval()
    with torch.no_grad():
        fq(x)  # the frozen grid kept
    fq.train()
    fq(x.clone().requires_grad_()).square().sum().backward()
    fq.scale.data.mul_(0.75)  # the optimizer's write
    fq.eval()
    with torch.no_grad():
        expected = torch.fake_quantize_per_tensor_affine(x, float(fq.scale), int(fq.zero_point),
                                                         fq.spec.qmin, fq.spec.qmax)
        assert torch.equal(fq(x), expected)


@pytest.mark.parametrize("kind", ["weight", "activation"])
def test_a_new_spec_drops_the_grid_kept_for_the_old_one(kind):
    """``qswap.search`` re-grids quantizers by replacing their spec, which changes no tensor."""
    fq = FakeQuantize(QuantSpec(bits=8, symmetric=kind == "weight"), kind=kind).eval()
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if kind == "activation":
            fq(x)
            fq.freeze()
        high = fq(x)
        fq.spec = fq.observer.spec = fq.spec.replace(bits=2)
        low = fq(x)
    assert len(torch.unique(low)) <= 4 < len(torch.unique(high))


SCALAR_SPECS = [QuantSpec(bits=8, symmetric=False, observer="moving_average"),
                QuantSpec(bits=8, observer="minmax"), QuantSpec(bits=4, narrow_range=True, observer="minmax"),
                QuantSpec(bits=8, signed=False, observer="minmax"),
                QuantSpec(bits=16, symmetric=False, observer="moving_average", momentum=0.3),
                QuantSpec(bits=4, symmetric=False, observer="minmax", learnable=True)]  # LSQ: a Parameter scale


@pytest.mark.parametrize("spec", SCALAR_SPECS, ids=lambda s: f"{s.short()}-{s.observer}")
def test_calibration_on_python_numbers_matches_the_tensor_arithmetic(spec):
    """A calibrating per-tensor quantizer keeps its range and grid as float32 scalars
    (observe_scalar + choose_qparams_scalar); bit for bit what the 0-d tensor ops compute."""
    from qswap.quant.observers import make_observer
    from qswap.quant.primitives import choose_qparams

    g = torch.Generator().manual_seed(3)
    fq, reference = FakeQuantize(spec), make_observer(spec)
    for i in range(6):
        x = torch.randn(64, 17, generator=g) * (0.1 + 3 * i) + (i - 2) * 0.7
        if i == 3:
            x = x.abs() + 0.01  # all positive: the grid must still hold 0
        out = fq(x)
        reference(x)  # the tensor path: Observer.forward on 0-d float32 tensors
        scale, zp = choose_qparams(reference.min_val, reference.max_val, spec)
        assert torch.equal(fq.observer.min_val, reference.min_val)
        assert torch.equal(fq.observer.max_val, reference.max_val)
        assert torch.equal(fq.scale, scale) and torch.equal(fq.zero_point, zp)
        assert torch.equal(out, torch.fake_quantize_per_tensor_affine(x, scale, zp, spec.qmin, spec.qmax))


def test_per_group_activation_quantizer_is_refused_with_the_fix():
    from qswap.errors import SpecError

    with pytest.raises(SpecError, match="axis -1"):
        FakeQuantize(QuantSpec(bits=8, granularity="per_group", group_size=4), kind="activation")
    FakeQuantize(QuantSpec(bits=4, granularity="per_group", group_size=4), kind="weight")  # weights may


def test_an_unknown_kind_is_a_typed_error_naming_the_kinds():
    from qswap.errors import SpecError

    with pytest.raises(SpecError, match="weight, activation.*'bias'"):
        FakeQuantize(QuantSpec(bits=8), kind="bias")


@pytest.mark.parametrize("spec", [QuantSpec(bits=8), QuantSpec(bits=8, symmetric=False),
                                  QuantSpec(bits=4, narrow_range=True)], ids=lambda s: s.short())
def test_a_frozen_quantizer_gives_the_kernel_bits_and_follows_a_written_grid(spec):
    """The frozen path (the grid read once per change) computes torch's fused kernel's bits, and a
    grid written in place afterwards (load_state_dict, copy_) is used from the next call on."""
    fq = FakeQuantize(spec)
    fq(torch.randn(64, 16))
    fq.freeze()
    x = torch.randn(5, 16) * 3
    for _ in range(2):
        with torch.no_grad():
            out = fq(x)
        expected = torch.fake_quantize_per_tensor_affine(x, fq.scale.reshape(()), fq.zero_point.reshape(()),
                                                         spec.qmin, spec.qmax)
        assert torch.equal(out.view(torch.int32), expected.view(torch.int32))
        fq.scale.mul_(0.5)  # a written grid


@pytest.mark.parametrize("spec", [QuantSpec(bits=8, symmetric=False),
                                  QuantSpec(bits=4, symmetric=False, granularity="per_channel", axis=-1),
                                  QuantSpec(bits=8, granularity="per_channel", axis=-1)])
def test_codes_and_values_are_the_quantizers_own_grid(spec):
    """``codes(out)`` reads the integer codes of an output of the quantizer (``quantize``'s
    codes), ``values(codes)`` gives the output back bit for bit; both are quantizer calls (a hook
    sees them). Float codes are refused."""
    from qswap.errors import SpecError
    fq = FakeQuantize(spec)
    x = torch.randn(5, 3, 16) * torch.linspace(0.1, 4, 16)
    fq(x)
    fq.freeze()
    out = fq(torch.randn(5, 3, 16) * 2)
    scale, zero_point = fq.scale, fq.zero_point
    if scale.numel() > 1:
        scale, zero_point = scale.reshape(1, 1, -1), zero_point.reshape(1, 1, -1)
    expected = torch.round(out / scale).to(torch.int32) + zero_point  # exact for values of the grid
    codes = fq.codes(out)
    assert codes.dtype == torch.int32 and torch.equal(codes, expected)
    assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
    assert torch.equal(fq.values(codes), out)
    seen = []
    handle = fq.register_forward_hook(lambda m, args, output: seen.append(output.dtype))
    fq.values(fq.codes(out))
    handle.remove()
    assert seen == [torch.int32, torch.float32]
    with pytest.raises(SpecError, match="integer codes"):
        fq.values(codes.float())


def test_consume_writes_into_a_handed_over_temporary_only_on_the_fast_path():
    from qswap.quant.fake_quantize import consume

    fq = FakeQuantize(QuantSpec(bits=8, symmetric=False))
    fq(torch.randn(32, 8) * 3)
    fq.freeze()
    x = torch.randn(16, 8) * 4
    expected = fq(x)
    for temp in (x.clone(), x.t().contiguous().t()):  # contiguous, or a permutation of a contiguous block
        out = fq.consume(temp)
        assert out.data_ptr() == temp.data_ptr() and torch.equal(out, expected)
    # everywhere else it is the call itself and leaves its argument as it was
    for case, make in {"gaps": lambda: torch.stack([x, x], dim=-1)[..., 0],
                       "autograd": lambda: x.clone().requires_grad_()}.items():
        temp = make()
        before = temp.detach().clone()
        out = fq.consume(temp)
        assert torch.equal(temp.detach(), before) and torch.equal(out.detach(), expected), case
    handle = fq.register_forward_hook(lambda module, args, output: None)  # watched (a hook, the audit)
    temp = x.clone()
    assert torch.equal(fq.consume(temp), expected) and torch.equal(temp, x)
    handle.remove()
    assert consume(torch.nn.Identity(), x) is x  # a site the recipe leaves in float


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("observer", ["minmax", "moving_average"])
def test_consume_while_calibrating_observes_and_rounds_in_place_as_the_call_does(relu, observer):
    """A calibrating quantizer (not frozen) given a temporary: it observes it, sets its grid and
    rounds it in place, with the values and the grids of the call itself (then a ReLU), batch
    after batch; a hook (the audit) puts it back on the call."""
    import torch.nn.functional as F

    spec = QuantSpec(bits=8, symmetric=False, observer=observer)
    consumer, caller = FakeQuantize(spec), FakeQuantize(spec)
    for i in range(5):
        x = torch.randn(64, 33) * (i + 1) - i  # ranges that widen and move
        expected = F.relu(caller(x)) if relu else caller(x)
        temp = x.clone()
        out = consumer.consume(temp, relu=relu)
        assert out.data_ptr() == temp.data_ptr()
        assert torch.equal(out.view(torch.int32), expected.view(torch.int32)), i
        assert torch.equal(consumer.scale, caller.scale) and torch.equal(consumer.zero_point, caller.zero_point)
        assert int(consumer.observer.num_batches) == i + 1
    handle = consumer.register_forward_hook(lambda module, args, output: None)
    temp = x.clone()
    consumer.consume(temp)
    handle.remove()
    assert torch.equal(temp, x)  # watched: the call itself, its argument left as it was


def test_consume_with_relu_gives_relu_of_the_quantizer_bit_for_bit():
    """``consume(x, relu=True)`` clamps the codes from max(lo, 0) in the quantizer's own pass: the
    bits of ``F.relu(fq(x))`` (ties, +-0, +-inf, NaN, both ends of the grid), in place on the fast
    path, and the call itself followed by a ReLU everywhere else."""
    import torch.nn.functional as F

    from qswap.quant.fake_quantize import consume

    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 3e38, -3e38, 1e-42, -1e-42])
    for spec, lo, hi in ((QuantSpec(bits=8, symmetric=False), -2.0, 5.0), (QuantSpec(bits=8, symmetric=True), -3.0, 3.0),
                         (QuantSpec(bits=4, symmetric=False), -0.5, 7.0), (QuantSpec(bits=8, symmetric=False), 0.0, 4.0)):
        fq = FakeQuantize(spec)
        fq(torch.tensor([lo, hi]))
        fq.freeze()
        scale = float(fq.scale)
        ties = (torch.arange(-300, 300, dtype=torch.float32) + 0.5) * scale
        x = torch.cat([torch.randn(4099) * 4, ties, special])
        expected = F.relu(fq(x))
        temp = x.clone()
        out = fq.consume(temp, relu=True)
        assert out.data_ptr() == temp.data_ptr()
        assert torch.equal(out.view(torch.int32), expected.view(torch.int32)), spec  # the bits, +0.0 and NaN included
        handle = fq.register_forward_hook(lambda module, args, output: None)  # off the fast path
        temp = x.clone()
        watched_out = consume(fq, temp, relu=True)
        handle.remove()
        assert torch.equal(temp.view(torch.int32), x.view(torch.int32))  # left as it was
        assert torch.equal(watched_out.view(torch.int32), expected.view(torch.int32))
    assert torch.equal(consume(torch.nn.Identity(), torch.tensor([-1.0, 2.0]), relu=True), torch.tensor([0.0, 2.0]))


def test_consume_twice_rounds_onto_both_grids_in_one_pass_only_on_both_fast_paths():
    """``consume_twice(first, x, second, relu)`` is ``second(relu(first(x)))`` bit for bit, written
    into ``x`` where both quantizers would round in place (and the kernel is built); else it is
    ``consume(first, x, relu)`` and says so (the caller calls ``second``)."""
    import torch.nn.functional as F

    from qswap.quant import fused
    from qswap.quant.fake_quantize import consume_twice

    first, second = FakeQuantize(QuantSpec(bits=8, symmetric=False)), FakeQuantize(QuantSpec(bits=8, symmetric=False))
    first(torch.tensor([-2.0, 5.0]))
    second(torch.tensor([0.0, 3.0]))
    first.freeze()
    second.freeze()
    x = torch.cat([torch.randn(5003) * 3, (torch.arange(-200, 200, dtype=torch.float32) + 0.5) * float(first.scale),
                   torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan")])])
    for relu in (False, True):
        one = F.relu(first(x)) if relu else first(x)
        expected = second(one)
        temp = x.clone()
        out, both = consume_twice(first, temp, second, relu)
        assert both == (fused.AVAILABLE and fused.TWICE)
        if both:
            assert out.data_ptr() == temp.data_ptr()
            assert torch.equal(out.view(torch.int32), expected.view(torch.int32))
        else:
            assert torch.equal(out.view(torch.int32), one.view(torch.int32))
    handle = second.register_forward_hook(lambda module, args, output: None)  # the reader watched
    temp = x.clone()
    out, both = consume_twice(first, temp, second, relu=True)
    handle.remove()
    assert not both and torch.equal(out.view(torch.int32), F.relu(first(x)).view(torch.int32))
    out, both = consume_twice(first, x.clone(), None, relu=True)  # no quantizer reads it next
    assert not both and torch.equal(out.view(torch.int32), F.relu(first(x)).view(torch.int32))
    temp = x.clone().requires_grad_()  # autograd: the calls themselves, nothing written in place
    out, both = consume_twice(first, temp, second)
    assert not both and torch.equal(temp.detach().view(torch.int32), x.view(torch.int32))


def test_relu_on_a_grid_without_zero_and_twice_with_a_reader_not_ready():
    """A grid whose codes do not reach zero (a zero point outside the codes: lo > 0 or hi < 0) takes
    the ReLU after the rounding, in place; ``consume_twice`` with such a first grid, or with a
    second quantizer still observing, rounds once and leaves the second to its own call."""
    import torch.nn.functional as F

    from qswap.quant.fake_quantize import consume_twice

    x = torch.cat([torch.randn(1001) * 3, torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan")])])
    for zero_point in (-5, 300):  # lo = 5 > 0; hi = 255 - 300 < 0
        fq = FakeQuantize(QuantSpec(bits=8, symmetric=False))
        fq(torch.tensor([-2.0, 5.0]))
        fq.freeze()
        fq.zero_point.fill_(zero_point)
        expected = F.relu(fq(x))
        temp = x.clone()
        out = fq.consume(temp, relu=True)
        assert out.data_ptr() == temp.data_ptr() and torch.equal(out.view(torch.int32), expected.view(torch.int32))
        second = FakeQuantize(QuantSpec(bits=8, symmetric=False))
        second(torch.tensor([0.0, 3.0]))
        second.freeze()
        out, both = consume_twice(fq, x.clone(), second, relu=True)
        assert not both and torch.equal(out.view(torch.int32), expected.view(torch.int32))
    first = FakeQuantize(QuantSpec(bits=8, symmetric=False))
    first(torch.tensor([-2.0, 5.0]))
    first.freeze()
    observing = FakeQuantize(QuantSpec(bits=8, symmetric=False))  # not frozen: it must see its input
    out, both = consume_twice(first, x.clone(), observing, relu=True)
    assert not both and not observing.initialized
    assert torch.equal(out.view(torch.int32), F.relu(first(x)).view(torch.int32))


@pytest.mark.parametrize("axis", [-1, 0])
def test_codes_and_values_of_a_per_group_weight_grid(axis):
    """codes()/values() reshaped a per-group (rows, G) scale table as a per-channel one: a raw
    RuntimeError. They now use the groups view quantize/dequantize use: the codes are
    ``quantize``'s, and their values the quantizer's output."""
    from qswap.errors import SpecError
    from qswap.quant.primitives import quantize
    spec = QuantSpec(bits=4, granularity="per_group", group_size=4, axis=axis)
    w = torch.randn(8, 12, generator=torch.Generator().manual_seed(0))
    fq = FakeQuantize(spec, kind="weight").eval()
    y = fq(w)
    codes = fq.codes(y)
    assert torch.equal(codes, quantize(w, fq.scale, fq.zero_point, spec).to(torch.int32))
    assert torch.equal(fq.values(codes), y)
    with pytest.raises(SpecError, match="per_group grid of shape"):
        fq.codes(torch.zeros(16, 12))


@pytest.mark.parametrize("spec", [QuantSpec(bits=8, symmetric=False, learnable=True),
                                  QuantSpec(bits=4, granularity="per_channel", axis=-1, learnable=True)],
                         ids=lambda s: s.short())
def test_an_lsq_training_forward_gives_the_evaluation_values_on_the_same_grid(spec):
    """The LSQ training forward rounded ``x / s`` (and its gradient-scaled scale was an ulp off
    for some s) where evaluation and the integer forms round ``x * float32(1 / s)``: near-tie
    inputs came out a step apart. Now the same values, with a gradient for the scale."""
    g = torch.Generator().manual_seed(0)
    fq = FakeQuantize(spec).eval()
    with torch.no_grad():
        fq(torch.randn(1000, 16, generator=g) * 3)
    fq.freeze()
    scale = fq.scale.detach()
    k = torch.arange(-8, 8, dtype=torch.float32)[:, None]
    ties = (k + 0.5) * scale + torch.zeros(16)  # half-steps, as earlier grid values times integers give
    x = torch.cat([ties, torch.randn(200_000, 16, generator=g) * 3])
    with torch.no_grad():
        evaluated = fq(x)
    fq.train()
    trained = fq(x)
    assert torch.equal(trained.detach(), evaluated)
    trained.sum().backward()
    assert fq.scale.grad is not None and torch.isfinite(fq.scale.grad).all()


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, symmetric=False, granularity="per_channel", axis=-1),
                                  QuantSpec(bits=8, granularity="per_channel", axis=-1)])
def test_a_frozen_per_channel_activation_quantizer_keeps_its_grid_ready(spec):
    """A frozen per-channel activation quantizer of the last axis keeps its grid prepared
    (``ChannelGrid``, one pass of the kernel per call where it is built) and gives the values of
    ``fake_quantize`` on its buffers bit for bit, a decoding step's rows, a batch and a permuted
    tensor alike; a written grid, a copy and an unfreeze are followed."""
    import copy

    from qswap.quant.primitives import fake_quantize

    fq = FakeQuantize(spec)
    fq(torch.randn(6, 5, 16) * torch.linspace(0.1, 4, 16))
    fq.freeze()
    fq.eval()
    for x in (torch.randn(5, 1, 16) * 3, torch.randn(7, 3, 16), torch.randn(3, 16, 7).transpose(1, 2)):
        with torch.no_grad():
            expected = fake_quantize(x, fq.scale, fq.zero_point, spec)
            assert torch.equal(fq(x).view(torch.int32), expected.view(torch.int32))
            assert fq._channels is not None  # the first call prepared it
            assert torch.equal(fq(x).view(torch.int32), expected.view(torch.int32))  # the prepared grid's call
    with torch.no_grad():
        x = torch.randn(4, 16) * 3
        fq.scale.mul_(0.5)  # a written grid
        assert torch.equal(fq(x), fake_quantize(x, fq.scale, fq.zero_point, spec))
        twin = copy.deepcopy(fq)
        assert twin._channels is None and torch.equal(twin(x), fq(x))
        fq.scale.data.mul_(0.5)  # through .data: no version bump; eval() again drops the kept grid
        fq.eval()
        assert torch.equal(fq(x), fake_quantize(x, fq.scale, fq.zero_point, spec))
        fq.unfreeze()
        y = fq(torch.randn(4, 16) * 50)  # observing again: a wider range, a new grid
        assert fq._fast_channels(x, fq._buffers, fq.scale) is None
        assert torch.equal(y, fake_quantize(y, fq.scale, fq.zero_point, spec))

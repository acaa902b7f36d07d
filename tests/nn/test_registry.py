import pytest
from torch import nn

import qswap
from qswap.errors import RegistryError
from qswap.nn import QuantModule
from qswap.nn.registry import REGISTRY, lookup, register, unregister

TORCH_CLASSES = [nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.LayerNorm, nn.GroupNorm,
                 nn.Softmax, nn.MultiheadAttention, nn.ReLU, nn.GELU, nn.GLU, nn.SiLU]


@pytest.mark.parametrize("cls", TORCH_CLASSES, ids=lambda c: c.__name__)
def test_torch_nn_classes_are_registered(cls):
    counterpart = lookup(cls)
    assert issubclass(counterpart, QuantModule) and counterpart.float_class is cls


class MyScale(nn.Module):
    def forward(self, x):
        return x * 2


def test_register_lookup_and_unregister_a_user_module():
    @qswap.register(MyScale)
    class QMyScale(QuantModule):
        @classmethod
        def from_float(cls, module, config):
            return cls()

    try:
        assert lookup(MyScale) is QMyScale
        model = qswap.convert(nn.Sequential(MyScale()), "w8a8")
        assert isinstance(model[0], QMyScale)
    finally:
        unregister(MyScale)
    assert MyScale not in REGISTRY


def test_duplicate_registration_is_an_error_naming_both_and_the_unregister_function():
    """The advice had said 'unregister it first', and ``qswap.unregister`` does not exist."""
    with pytest.raises(RegistryError, match=r"already registered to .*QLinear; to replace it with .*Other, "
                                            r"call qswap.nn.unregister\(Linear\) first"):
        @register(nn.Linear)
        class Other(QuantModule):
            @classmethod
            def from_float(cls, module, config):
                return cls()
    assert callable(qswap.nn.unregister)


class Counterpart(QuantModule):
    @classmethod
    def from_float(cls, module, config):
        return cls()


def test_a_bare_register_and_a_counterpart_without_from_float_are_refused():
    """``@qswap.register`` with no float class had rebound the counterpart's name to the inner
    decorator, registering nothing; a counterpart that inherits QuantModule's from_float had been
    accepted, to fail at convert time."""
    with pytest.raises(RegistryError, match=r"register\(\) takes the float class a counterpart replaces, got the "
                                            r"counterpart .*Counterpart .a QuantModule.: write @qswap.register"):
        register(Counterpart)

    class Float(nn.Module):
        pass

    class NoFromFloat(QuantModule):
        pass
    with pytest.raises(RegistryError, match="NoFromFloat must implement from_float.module, config."):
        register(Float)(NoFromFloat)
    assert Float not in qswap.nn.registry.REGISTRY


class NotQuant(nn.Module):
    def forward(self, x):
        return x


class OneArgument(QuantModule):
    @classmethod
    def from_float(cls, module):
        return cls()


@pytest.mark.parametrize("counterpart, message", [
    (NotQuant, r"counterpart of .*MyScale must be a subclass of qswap.QuantModule .*NotQuant"),
    (lambda module, config: module, r"must be a subclass of qswap.QuantModule .*function"),
    (OneArgument, r"OneArgument.from_float\(module\) must take \(module, config\)"),
])
def test_register_refuses_what_is_not_a_counterpart(counterpart, message):
    """Anything had been accepted; convert then failed with a raw AttributeError or TypeError."""
    try:
        with pytest.raises(RegistryError, match=message):
            register(MyScale)(counterpart)
        assert MyScale not in REGISTRY
    finally:
        REGISTRY.pop(MyScale, None)


def test_a_users_counterpart_of_a_fairseq_class_wins_over_qswaps_own():
    """A user's counterpart of a fairseq class registered before convert imports qswap's fairseq
    counterparts: that import (qswap's own registration) had failed on it, with advice to
    unregister it; qswap's own registration now leaves it in place."""
    pytest.importorskip("fairseq")
    from fairseq.modules.sinusoidal_positional_embedding import SinusoidalPositionalEmbedding

    from qswap.models import build_s2t_transformer
    from qswap.nn.fairseq.positional import QSinusoidalPositionalEmbedding

    class FloatPositions(QuantModule):
        @classmethod
        def from_float(cls, module, config):
            return module  # the user keeps positions float

    unregister(SinusoidalPositionalEmbedding)
    try:
        register(SinusoidalPositionalEmbedding)(FloatPositions)
        register(SinusoidalPositionalEmbedding)(QSinusoidalPositionalEmbedding)  # what importing qswap.nn.fairseq does
        assert lookup(SinusoidalPositionalEmbedding) is FloatPositions
        converted = qswap.convert(build_s2t_transformer(), "w8a8")
        assert type(converted.encoder.embed_positions) is SinusoidalPositionalEmbedding
    finally:
        REGISTRY[SinusoidalPositionalEmbedding] = QSinusoidalPositionalEmbedding


def test_missing_lookup_lists_what_is_registered():
    with pytest.raises(RegistryError, match=r"MyScale has no registered counterpart; registered: .*Linear"):
        lookup(MyScale)


def test_register_rejects_non_modules():
    with pytest.raises(RegistryError, match="nn.Module subclass"):
        register(int)

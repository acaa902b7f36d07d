"""The @serializable declarations: every integer form declares itself, a declaration must match
its constructor, and a class of one's own declares itself the same way and round trips."""
import importlib
import inspect
import pkgutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qswap
import qswap.nn
from qswap.errors import ExportError, RegistryError
from qswap.io.serializable import (ANY, INT, SERIALIZABLE, Choice, Codec, Either, List, Named, Obj, Opt,
                                   SpecMismatch, Tensor, serializable)
from qswap.quant.integer import Grid


def integer_forms():
    """Every nn.Module class named Integer* defined in qswap.nn (and its subpackages),
    qswap.integerize and qswap.quant."""
    pytest.importorskip("fairseq")
    modules = [qswap.integerize, importlib.import_module("qswap.quant.integer")]
    for package in (qswap.nn, importlib.import_module("qswap.nn.fairseq")):
        modules += [importlib.import_module(info.name)
                    for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    return sorted({cls for m in modules for _, cls in inspect.getmembers(m, inspect.isclass)
                   if cls.__name__.startswith("Integer") and issubclass(cls, nn.Module)
                   and cls.__module__ == m.__name__}, key=lambda c: c.__name__)


def test_every_integer_form_is_declared():
    forms = integer_forms()
    assert len(forms) >= 15
    undeclared = [c.__name__ for c in forms if SERIALIZABLE.get(c.__name__, None) is None
                  or SERIALIZABLE[c.__name__].cls is not c]
    assert not undeclared, f"declare these with @serializable (qswap.io.serializable): {undeclared}"


@pytest.fixture
def declared():
    """Names declared by a test, removed afterwards."""
    names = []
    yield names
    for name in names:
        SERIALIZABLE.pop(name, None)


def test_a_declaration_must_name_every_constructor_argument(declared):
    with pytest.raises(RegistryError, match="declares scale but its constructor takes scale, bias"):
        @serializable(scale=INT)
        class Partial(nn.Module):
            def __init__(self, scale, bias):
                super().__init__()


def test_a_field_needs_a_spec():
    with pytest.raises(RegistryError, match="need a field spec.*: scale"):
        serializable(scale=int)


def test_two_classes_cannot_share_a_name(declared):
    declared.append("IntegerLinear")
    saved = SERIALIZABLE["IntegerLinear"]
    try:
        with pytest.raises(RegistryError, match="already declared"):
            @serializable(x=INT)
            class IntegerLinear(nn.Module):
                def __init__(self, x):
                    super().__init__()
    finally:
        SERIALIZABLE["IntegerLinear"] = saved
        declared.clear()


def test_a_class_of_ones_own_declares_itself_and_round_trips_inside_a_chain(declared, tmp_path):
    from qswap.export.integer_format import write_integer_model
    from qswap.export.integer_load import load_integer_model
    from qswap.integerize import IntegerModel

    @serializable(shift=INT, offsets=Opt(Tensor("int32")), mode=Choice("floor", "nearest"))
    class IntegerShiftRight(nn.Module):
        def __init__(self, shift, offsets, mode):
            super().__init__()
            self.shift, self.mode = shift, mode
            self.register_buffer("offsets", offsets)

        def forward(self, codes):
            return (codes.to(torch.int32) + self.offsets) >> self.shift

    declared.append("IntegerShiftRight")
    model = IntegerModel(Grid(0.5, 0, -128, 127), [IntegerShiftRight(2, torch.arange(4, dtype=torch.int32), "floor")],
                         ["shift"])
    write_integer_model(model, tmp_path)
    loaded = load_integer_model(tmp_path).model
    x = torch.tensor([[1.0, -3.0, 20.0, 60.0]])
    codes = loaded.forward_codes(loaded.quantize_input(x))
    assert codes.dtype == torch.int32 and torch.equal(codes, model.forward_codes(model.quantize_input(x)))
    assert type(loaded.layers[0]) is IntegerShiftRight and loaded.layers[0].mode == "floor"


def test_an_undeclared_module_is_an_export_error_naming_its_path(tmp_path):
    from qswap.export.integer_format import write_integer_model
    from qswap.integerize import IntegerModel

    model = IntegerModel(None, [nn.Identity()], ["identity"])
    with pytest.raises(ExportError, match=r"model\.layers\.0: Identity is not declared @serializable"):
        write_integer_model(model, tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_declared_field_the_object_does_not_keep_is_named(declared, tmp_path):
    from qswap.export.integer_format import write_integer_model

    @serializable(depth=INT)
    class IntegerForgetful(nn.Module):
        def __init__(self, depth):
            super().__init__()

    declared.append("IntegerForgetful")
    with pytest.raises(ExportError, match=r"model\.depth: IntegerForgetful declares depth but keeps no attribute"):
        write_integer_model(IntegerForgetful(3), tmp_path)


class Tensors(Codec):
    def __init__(self):
        self.store = {}

    def put(self, key, tensor):
        self.store[key] = tensor

    def take(self, key, where):
        return self.store.pop(key)


@pytest.mark.parametrize("spec,value", [
    (Either(INT, Tensor("int64")), 7),
    (Either(INT, Tensor("int64")), torch.tensor([1, 2])),
    (List(INT, tuple_=True), (2, 3)),
    (Named({"conv1d": F.conv1d, "conv2d": F.conv2d}), F.conv2d),
    (Opt(Obj("Grid")), None),
    (ANY, Grid(0.25, 3, 0, 255)),
])
def test_specs_round_trip(spec, value):
    codec = Tensors()
    back = spec.decode(spec.encode(value, "v", codec), "v", codec)
    if isinstance(value, torch.Tensor):
        assert torch.equal(back, value) and back.dtype == value.dtype
    else:
        assert back == value and type(back) is type(value)


@pytest.mark.parametrize("spec,value,match", [
    (INT, 1.5, "expected an integer, got float"),
    (INT, True, "expected an integer, got bool"),
    (Tensor("int8"), torch.zeros(2), "expected a tensor of int8, got a float32 tensor"),
    (Named({"conv1d": F.conv1d}), F.linear, "is none of conv1d"),
    (Either(INT, Tensor("int64")), "x", "fits none of its alternatives"),
    (List(INT), 3, "expected a list"),
])
def test_specs_refuse_what_they_do_not_declare(spec, value, match):
    with pytest.raises(SpecMismatch, match=match):
        spec.encode(value, "v", Tensors())

"""Bad exported integer models: each gives a LoadError whose kind and message say what is wrong
(missing, truncated, corrupted, wrong version, hand-edited JSON)."""
import hashlib
import json
import shutil

import pytest
import torch

import qswap
from qswap.errors import ExportError, LoadError, QswapError
from qswap.export.integer_format import FORMAT_VERSION, JSON_FILE, model_digest, tensor_path, write_integer_model
from qswap.export.integer_load import load_integer_model


@pytest.fixture(scope="module")
def exported(qmodel, tmp_path_factory):
    root = tmp_path_factory.mktemp("integer_export")
    write_integer_model(qswap.integerize(qmodel), root)
    return root


@pytest.fixture
def copy(exported, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(exported, out)
    return out


def load_meta(d):
    return json.loads((d / JSON_FILE).read_text())


def save_meta(d, meta, rehash=True):
    """Write ``meta``; ``rehash``: with the sha256 of its model entry made afresh, as a hand-made file
    would be (so that the checks behind the hash are what a test reaches)."""
    if rehash and isinstance(meta.get("model"), dict):
        meta["model_sha256"] = model_digest(meta["model"], meta["tensor_file"]["sha256"])
    (d / JSON_FILE).write_text(json.dumps(meta))


def out_proj(meta):
    """The JSON args of the decoder's output projection (an IntegerLinear)."""
    return meta["model"]["args"]["decoder"]["args"]["output_projection"]["args"]


def replace_tensor_file(d, blob):
    """A new tensor file with its size and hash written into the JSON, as a hand-made file would be."""
    save_meta(d, new_tensor_file(d, blob))


def new_tensor_file(d, blob):
    """``blob`` written as the tensor file; the JSON's description with its size and hash (not saved)."""
    tensor_path(d).write_bytes(blob)
    meta = load_meta(d)
    meta["tensor_file"].update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    return meta


def attention(meta):
    return meta["model"]["args"]["encoder"]["args"]["layers"][0]["args"]["attn"]["args"]


def fails(d, kind, match):
    with pytest.raises(LoadError, match=match) as info:
        load_integer_model(d)
    assert info.value.kind == kind and isinstance(info.value, (ExportError, QswapError))
    return info.value


# -- the files: missing, truncated, corrupted ----------------------------------------------------------

def test_missing_json(tmp_path):
    fails(tmp_path / "nothing" / JSON_FILE, "missing", "does not exist")


def test_missing_tensor_file(copy):
    tensors = tensor_path(copy)
    tensors.unlink()
    fails(copy, "missing", f"{tensors.name} does not exist")


def test_truncated_json(copy):
    text = (copy / JSON_FILE).read_text()
    (copy / JSON_FILE).write_text(text[: len(text) // 2])
    fails(copy, "truncated", "truncated JSON")


def test_truncated_tensor_file(copy):
    blob = tensor_path(copy).read_bytes()
    tensor_path(copy).write_bytes(blob[: len(blob) - 100])
    fails(copy, "truncated", f"is truncated: {len(blob) - 100} bytes of the {len(blob)}")


def test_a_changed_byte_fails_the_hash(copy):
    blob = bytearray(tensor_path(copy).read_bytes())
    blob[len(blob) // 2] ^= 0x01
    tensor_path(copy).write_bytes(bytes(blob))
    fails(copy, "corrupted", "corrupted: its sha256 is")


def test_appended_bytes(copy):
    with open(tensor_path(copy), "ab") as f:
        f.write(b"\0" * 8)
    fails(copy, "corrupted", "has .* bytes, model.json records")


def test_an_unreadable_tensor_file_with_a_matching_hash(copy):
    replace_tensor_file(copy, b"not safetensors at all")
    fails(copy, "corrupted", "not a readable safetensors file")


# -- format and version ----------------------------------------------------------------------------------

def test_a_newer_format_version(copy):
    meta = load_meta(copy)
    meta["format_version"] = FORMAT_VERSION + 1
    save_meta(copy, meta)
    fails(copy, "version", f"format version {FORMAT_VERSION + 1} .* this qswap reads version {FORMAT_VERSION}")


def test_another_format(copy):
    save_meta(copy, {"format": "something-else"})
    fails(copy, "edited", "not a qswap integer model")


# -- hand-edited JSON ------------------------------------------------------------------------------------

def _unknown_class(meta):
    meta["model"]["args"]["decoder"]["args"]["output_projection"]["class"] = "os.system"


def _missing_tensor(meta):
    out_proj(meta)["weight"]["tensor"] = "model.nowhere"


def _wrong_dtype(meta):
    out_proj(meta)["weight"]["dtype"] = "int16"


def _disallowed_dtype(meta):
    out_proj(meta)["weight"]["dtype"] = "float32"


def _wrong_shape(meta):
    out_proj(meta)["weight"]["shape"][0] += 1


def _string_for_int(meta):
    attention(meta)["num_heads"] = "4"


def _bool_for_int(meta):
    out_proj(meta)["zero_point_in"] = True


def _float_for_int(meta):
    out_proj(meta)["zero_point_in"] = 0.0


def _zero_point_in_off_any_grid(meta):
    out_proj(meta)["zero_point_in"] = 10 ** 12  # had decoded garbage (its arithmetic wraps)


def _missing_field(meta):
    del out_proj(meta)["bias"]


def _extra_field(meta):
    out_proj(meta)["scale_hint"] = 1


def _bad_choice(meta):
    attention(meta)["core"]["args"]["scores"]["args"]["rounding"] = "stochastic"


def _extra_top_level(meta):
    meta["comment"] = "added by hand"


def _bad_tensor_name(meta):
    meta["tensor_file"]["name"] = "../model.safetensors"


def _float_steps(meta):
    meta["float_steps"]["softmax"] = "float softmax"


def _tensor_entry_shape(meta):
    out_proj(meta)["weight"] = [1, 2, 3]


def _first(meta, cls):
    """The JSON args of the first ``cls`` object in the model description."""
    stack = [meta["model"]]
    while stack:
        node = stack.pop(0)
        if isinstance(node, dict):
            if node.get("class") == cls:
                return node["args"]
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    raise AssertionError(f"no {cls} in the model")


# values out of the ranges the integer arithmetic is defined for, the hash made afresh (a file
# edited by hand): refused at load by the objects' own checks (they decoded to wrong transcripts,
# or raised ZeroDivisionError / ValueError when decoding)
def _no_heads(meta):
    attention(meta)["num_heads"] = 0


def _zero_scale(meta):
    _first(meta, "Grid")["scale"] = 0.0


def _zero_point_off_the_codes(meta):
    grid = _first(meta, "Grid")
    grid["zero_point"] = grid["qmax"] + 1


def _add_shift(meta):
    _first(meta, "AddParams")["left_shift"] = 40


def _softmax_multiplier(meta):
    _first(meta, "SoftmaxParams")["out_mult"] = -1


def _negative_epsilon(meta):
    _first(meta, "LayerNormParams")["eps_int"] = -5


def _sqrt_bits(meta):
    _first(meta, "LayerNormParams")["sqrt_bits"] = 40


def _padding_idx_off_the_tokens(meta):
    meta["model"]["args"]["decoder"]["args"]["padding_idx"] = 1000000  # fairseq's raw AssertionError at decoding


def _negative_encoder_padding_idx(meta):
    meta["model"]["args"]["encoder"]["args"]["padding_idx"] = -1


def _entry_shift(meta):
    meta["model"]["args"]["encoder"]["args"]["stream_bits"] = -1  # had decoded at 97.8 % WER, no error


def _embed_zero_point(meta):
    meta["model"]["args"]["encoder"]["args"]["embed_zero_point"] = 2 ** 40


def _conv_groups(meta):
    _first(meta, "IntegerConv")["groups"] = 0  # had loaded, and the first forward raised torch's RuntimeError


def _conv_stride(meta):
    _first(meta, "IntegerConv")["stride"] = [-1]


def _subsampler_layers(meta):
    _first(meta, "IntegerConv1dSubsampler")["n_layers"] += 1


def _glu_qmin(meta):
    _first(meta, "GluParams")["qmin"] = 2 ** 40  # had raised torch's IndexError at the first forward


def _conv_codes_beyond_the_glu(meta):
    _first(meta, "IntegerConv")["requant"]["args"]["qmax"] += 1000


EDITS = [
    (_glu_qmin, "gate table covers one input code each from qmin"),
    (_conv_codes_beyond_the_glu, "which its GLU's gate table .* does not cover"),
    (_entry_shift, "entry shift must be 0 to 30 bits, got -1"),
    (_embed_zero_point, "embed zero point must be a code of at most 16 bits"),
    (_conv_groups, "groups must divide its .* output channels, got 0"),
    (_conv_stride, "stride and dilation are 1 or more"),
    (_subsampler_layers, "needs as many convolutions and GLUs"),
    (_padding_idx_off_the_tokens, "padding_idx 1000000 is no token index of the"),
    (_negative_encoder_padding_idx, "padding_idx -1 is no token index"),
    (_no_heads, "head count divides its width"),
    (_zero_scale, "finite scale above 0"),
    (_zero_point_off_the_codes, "qmin <= zero point <= qmax"),
    (_add_shift, "shifts its operands left by 12 to 26 bits"),
    (_softmax_multiplier, "output multiplier is 1 to"),
    (_negative_epsilon, "integer epsilon is 0 or more"),
    (_sqrt_bits, "sqrt_bits is 0 to"),
    (_unknown_class, "unknown class 'os.system'"),
    (_missing_tensor, "tensor 'model.nowhere' is not in the tensor file"),
    (_wrong_dtype, "is int8 .* in the tensor file, but the JSON says int16"),
    (_disallowed_dtype, "dtype 'float32' is not allowed here"),
    (_wrong_shape, r"is int8 \[(\d+), 64\] in the tensor file, but the JSON says int8 \[(?!\1\])\d+, 64\]"),
    (_string_for_int, "num_heads: expected an integer, got str"),
    (_bool_for_int, "zero_point_in: expected an integer, got bool"),
    (_float_for_int, "zero_point_in: expected an integer, got float"),
    (_zero_point_in_off_any_grid, "input zero point is a code of its input grid .* got 1000000000000"),
    (_missing_field, "missing: bias"),
    (_extra_field, "unknown: scale_hint"),
    (_bad_choice, "rounding: expected one of 'single', 'double'"),
    (_extra_top_level, "unknown field.s. comment"),
    (_bad_tensor_name, "tensor_file must be"),
    (_float_steps, "float_steps are"),
    (_tensor_entry_shape, "expected a tensor entry"),
]


@pytest.mark.parametrize("edit,match", EDITS, ids=[e.__name__.strip("_") for e, _ in EDITS])
def test_hand_edited_json(copy, edit, match):
    meta = load_meta(copy)
    edit(meta)
    save_meta(copy, meta)
    error = fails(copy, "edited", match)
    assert "export the model again" in str(error)


def _requant(meta):
    """The JSON args of the output projection's requantization (a Requant), or the first one found."""
    stack = [meta["model"]]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("class") == "Requant":
                return node["args"]
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    raise AssertionError("no Requant in the model")


@pytest.mark.parametrize("field, change", [("shift", 3), ("m0", 2 ** 40)])
def test_an_edited_number_of_the_model_is_found_by_its_hash(copy, field, change):
    """A multiplier or shift edited by hand (the model would decode another WER, or wrap in int64)
    is refused: the model entry no longer has the sha256 it was written with."""
    meta = load_meta(copy)
    _requant(meta)[field] += change
    save_meta(copy, meta, rehash=False)
    error = fails(copy, "edited", "does not match the sha256 it was written with")
    assert "export the model again" in str(error)


# NaN, and 1e999, which parses as inf (the model's hash had then raised a raw ValueError)
@pytest.mark.parametrize("number, match", [("NaN", "NaN is not a number JSON allows"),
                                           ("1e999", "1e999 is beyond the float range")])
def test_a_number_json_or_a_float_cannot_hold_is_refused(copy, number, match):
    text = (copy / JSON_FILE).read_text()
    meta = load_meta(copy)
    scale = meta["model"]["args"]["decoder"]["args"]["out_grid"]["args"]["scale"]
    (copy / JSON_FILE).write_text(text.replace(f'"scale": {json.dumps(scale)}', f'"scale": {number}', 1))
    fails(copy, "edited", match)


def test_an_extra_tensor_in_a_rehashed_file(copy):
    from safetensors.torch import load, save
    tensors = load(tensor_path(copy).read_bytes())
    tensors["model.payload"] = torch.zeros(4, dtype=torch.int8)
    replace_tensor_file(copy, save(tensors))
    fails(copy, "edited", "tensors no field uses: model.payload")


def test_the_untouched_copy_loads(copy):
    assert type(load_integer_model(copy).model).__name__ == "IntegerS2TTransformerModel"


def test_another_tensor_file_named_in_the_json_is_found_by_the_hash(copy):
    """The model's hash covers the tensor file's: the tensor_file entry of another export of the same
    architecture copied over (its file beside it) had loaded as neither model."""
    from safetensors.torch import load, save
    tensors = load(tensor_path(copy).read_bytes())
    key = next(k for k, v in tensors.items() if v.dtype == torch.int8)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] += 1
    save_meta(copy, new_tensor_file(copy, save(tensors)), rehash=False)  # the model entry untouched, as written
    fails(copy, "edited", "does not match the sha256 it was written with")


def test_a_model_that_is_no_whole_integer_model_is_refused(copy):
    """A declared class that is no model at the top (a Grid) had raised a raw AttributeError."""
    from safetensors.torch import save
    meta = new_tensor_file(copy, save({}))
    meta["model"] = {"class": "Grid", "args": _first(meta, "Grid")}
    save_meta(copy, meta)
    fails(copy, "edited", "not a whole integer model")


def test_json_nested_beyond_any_export_is_refused(copy):
    """A RecursionError from the JSON reader had come through raw."""
    meta = load_meta(copy)
    text = json.dumps(meta)
    (copy / JSON_FILE).write_text(text.replace('"source": ', '"source": ' + "[" * 100000 + "]" * 100000 + ', "x": ', 1))
    fails(copy, "edited", "recursion")

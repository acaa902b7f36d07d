"""The bad-input corpus: every case names its input and the one outcome qswap must give.

A case either raises exactly ``raises`` (a QswapError subclass, with a one-line message), or
returns a result that ``check`` accepts (finite numbers, the right shape...). Never a raw
traceback, a hang or a NaN. ``test_rel_corpus.py`` runs the table; ``tools/reliability_table.py``
turns it into the table in ``docs/reliability.md``.

Each ``run(env)`` gets an ``Env``: ``env.tmp`` is a fresh directory, ``env.shared`` the
session's real fairseq checkpoints (``rel_fixtures.Shared``).
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import pickle
import struct
import wave
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from qswap.errors import (AudioError, CalibrationError, CheckpointError, ConvertError, DataError,
                          OutputError, QswapError, RecipeError, SpecError, UnsafeCheckpointError)

CATEGORIES = {
    "recipe": "Recipes: malformed and adversarial YAML, files and values",
    "checkpoint": "Checkpoints: missing, truncated, corrupt, non-fairseq, unsafe",
    "data": "Data directories",
    "audio": "Audio",
    "calibration": "Calibration data",
    "convert": "Models and convert",
    "quant": "Quantization primitives",
    "output": "Writing files",
    "cli": "Command line",
}


@dataclass
class Env:
    tmp: Path
    shared: Any  # rel_fixtures.Shared


@dataclass(frozen=True)
class Case:
    id: str
    category: str
    input: str
    run: Callable[[Env], Any]
    raises: type[QswapError] | None = None
    outcome: str = ""  # for cases that succeed: what the correct result is
    check: Callable[[Any], None] | None = None
    after: Callable[[Env], None] | None = None  # runs after the outcome (e.g. no marker file)
    needs: tuple[str, ...] = field(default=())  # "features": needs qswap.features

    @property
    def expected(self) -> str:
        return self.raises.__name__ if self.raises else f"ok: {self.outcome}"


CASES: list[Case] = []


def case(category: str, id: str, input: str, *, raises=None, outcome: str = "", check=None,
         after=None, needs=()):
    assert category in CATEGORIES and (raises is None) != (not outcome), id
    def register(run: Callable[[Env], Any]) -> Callable[[Env], Any]:
        CASES.append(Case(id, category, input, run, raises, outcome, check, after, tuple(needs)))
        return run
    return register


def finite(t: torch.Tensor) -> None:
    assert torch.isfinite(t).all(), "non-finite values in the result"


# -- recipes -----------------------------------------------------------------------------------
V = "version: 1\n"
_BOMB = (V + "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
         "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
         "rules: [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n")

RECIPE_TEXTS: list[tuple[str, str, "str | bytes"]] = [
    ("yaml-syntax-error", "unclosed flow sequence", V + "defaults: [\n"),
    ("yaml-tab-indent", "tab used for indentation", V + "defaults:\n\tweight: {bits: 8}\n"),
    ("yaml-nul-byte", "NUL byte in the text", V + "name: a\x00b\n"),
    ("empty-file", "empty file", ""),
    ("top-level-list", "a list at the top level", "- version: 1\n"),
    ("top-level-scalar", "a plain string at the top level", "just some text\n"),
    ("version-missing", "no version key", "name: x\n"),
    ("version-unsupported", "version: 2", "version: 2\n"),
    ("version-string", "version: \"1\" (a string)", 'version: "1"\n'),
    ("version-bool", "version: true", "version: true\n"),
    ("unknown-top-key", "unknown top-level key", V + "quantize: everything\n"),
    ("unknown-rule-key", "unknown key in a rule", V + "rules: [{match: {path: fc1}, bitz: 4}]\n"),
    ("unknown-spec-field", "unknown quantizer field (typo)", V + "defaults: {weight: {bitz: 8}}\n"),
    ("non-string-spec-keys", "integer keys in a quantizer mapping",
     V + "defaults: {weight: {1: 2, a: 3}}\n"),
    ("duplicate-key", "the same key twice", V + "defaults: {weight: {bits: 8, bits: 4}}\n"),
    ("bits-string", "bits: eight", V + "defaults: {weight: {bits: eight}}\n"),
    ("bits-huge", "bits: 10^30", V + "defaults: {weight: {bits: 1000000000000000000000000000000}}\n"),
    ("bits-17", "bits: 17 (above the 16-bit maximum)", V + "defaults: {weight: {bits: 17}}\n"),
    ("bits-zero", "bits: 0", V + "defaults: {weight: {bits: 0}}\n"),
    ("bits-one", "bits: 1", V + "defaults: {activation: {bits: 1}}\n"),
    ("bits-negative", "bits: -8", V + "defaults: {weight: {bits: -8}}\n"),
    ("bits-float", "bits: 8.5", V + "defaults: {weight: {bits: 8.5}}\n"),
    ("bits-inf", "bits: .inf", V + "defaults: {weight: {bits: .inf}}\n"),
    ("bits-bool", "bits: true", V + "defaults: {weight: {bits: true}}\n"),
    ("granularity-unknown", "granularity: per_row", V + "defaults: {weight: {granularity: per_row}}\n"),
    ("group-size-zero", "per_group with group_size 0",
     V + "defaults: {weight: {granularity: per_group, group_size: 0}}\n"),
    ("group-size-without-groups", "group_size with per_tensor", V + "defaults: {weight: {group_size: 32}}\n"),
    ("axis-float", "axis: 0.5", V + "defaults: {weight: {granularity: per_channel, axis: 0.5}}\n"),
    ("percentile-out-of-range", "percentile: 150",
     V + "defaults: {activation: {observer: percentile, percentile: 150}}\n"),
    ("percentile-nan", "percentile: .nan", V + "defaults: {activation: {percentile: .nan}}\n"),
    ("momentum-zero", "momentum: 0", V + "defaults: {activation: {momentum: 0}}\n"),
    ("narrow-range-unsigned", "narrow_range on an unsigned grid",
     V + "defaults: {activation: {signed: false, narrow_range: true}}\n"),
    ("observer-unknown", "observer: histogram", V + "defaults: {activation: {observer: histogram}}\n"),
    ("option-unread-by-observer", "percentile: 99 beside observer: minmax (an option its observer never reads)",
     V + "defaults: {activation: {observer: minmax, percentile: 99.0}}\n"),
    ("transform-twice", "the hadamard transform listed twice (the second rotation undoes the first)",
     V + "transforms: [{hadamard: {block: 4}}, {hadamard: {block: 4}}]\n"),
    ("hadamard-block-no-matrix", "hadamard block: 11 (no Hadamard matrix of that order)",
     V + "transforms: [{hadamard: {block: 11}}]\n"),
    ("defaults-not-mapping", "defaults: [1]", V + "defaults: [1]\n"),
    ("rules-not-list", "rules: a mapping", V + "rules: {match: {path: fc1}}\n"),
    ("rule-not-mapping", "a rule that is a list", V + "rules: [[fc1]]\n"),
    ("rule-without-match", "a rule with no match", V + "rules: [{skip: true}]\n"),
    ("match-path-int", "match path: 123", V + "rules: [{match: {path: 123}}]\n"),
    ("match-class-int", "match class: 5", V + "rules: [{match: {class: 5}}]\n"),
    ("skip-not-bool", "skip: maybe", V + "rules: [{match: {path: fc1}, skip: maybe}]\n"),
    ("float-ok-empty-reason", "float_ok entry with an empty reason", V + "float_ok: {softmax: ''}\n"),
    ("sites-not-mapping", "sites: a list", V + "defaults: {sites: [q, k]}\n"),
    ("name-binary", "name: !!binary (bytes)", V + "name: !!binary aGVsbG8=\n"),
    ("name-date", "name: a YAML date", V + "name: 2024-01-01\n"),
    ("regex-nested-quantifier", "catastrophic regex re:(a+)+$",
     V + "rules: [{match: {path: 're:(a+)+$'}}]\n"),
    ("regex-invalid", "invalid regex re:([", V + "rules: [{match: {path: 're:(['}}]\n"),
    ("regex-too-long", "a 600-character pattern", V + f"rules: [{{match: {{path: '{'a' * 600}'}}}}]\n"),
    ("recursive-alias-list", "rules: &r [*r] (a list containing itself)", V + "rules: &r [*r]\n"),
    ("recursive-alias-map", "defaults: &d {weight: *d}", V + "defaults: &d {weight: *d}\n"),
    ("alias-bomb", "billion-laughs alias expansion (9^5 nodes)", _BOMB),
    ("deep-nesting", "100000 nested flow sequences", "[" * 100000),
    ("non-utf8", "Latin-1 bytes", (V + "description: caf\xe9\n").encode("latin-1")),
    ("utf16", "UTF-16 with a byte-order mark", (V + "name: x\n").encode("utf-16")),
    ("too-large", "a 2 MiB file", V + "description: '" + "a" * (2 << 20) + "'\n"),
]


def _recipe_file(env: Env, data: "str | bytes", name: str = "recipe.yaml") -> Path:
    path = env.tmp / name
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


for _id, _desc, _text in RECIPE_TEXTS:
    def _run(env: Env, text=_text):
        from qswap.recipe import load_recipe
        return load_recipe(_recipe_file(env, text))
    case("recipe", _id, _desc, raises=RecipeError)(_run)


def _marker_absent(env: Env) -> None:
    assert not (env.tmp / "PWNED").exists(), "the payload ran"


@case("recipe", "python-object-tag", "!!python/object/apply:os.system (must not run)",
      raises=RecipeError, after=_marker_absent)
def _(env):
    from qswap.recipe import load_recipe
    payload = f"name: !!python/object/apply:os.system ['touch {env.tmp / 'PWNED'}']\n"
    return load_recipe(_recipe_file(env, V + payload))


@case("recipe", "recipe-file-missing", "a recipe path that does not exist", raises=RecipeError)
def _(env):
    from qswap.recipe import load_recipe
    return load_recipe(env.tmp / "nope.yaml")


@case("recipe", "recipe-path-is-directory", "a directory given as the recipe", raises=RecipeError)
def _(env):
    from qswap.recipe import load_recipe
    (env.tmp / "dir.yaml").mkdir()
    return load_recipe(env.tmp / "dir.yaml")


@case("recipe", "recipe-name-unknown", "a shipped recipe name that does not exist", raises=RecipeError)
def _(env):
    from qswap.recipe import load_recipe
    return load_recipe("w3a3_turbo")


@case("recipe", "recipe-wrong-type", "recipe=42 (not a name, path or dict)", raises=RecipeError)
def _(env):
    from qswap.recipe import load_recipe
    return load_recipe(42)


def _long_path_model() -> nn.Module:
    inner = nn.ModuleDict({"block_eleven_self_attention_output_projection": nn.Linear(4, 4)})
    return nn.ModuleDict({"encoder_transformer_layers_stack_number_one": inner})


@case("recipe", "regex-overlapping-alternation",
      "re:(.|\\w)*\\d{3} (exponential backtracking, not a nested quantifier) at convert",
      raises=RecipeError)
def _(env):
    import qswap
    return qswap.convert(_long_path_model(), {"version": 1, "rules": [
        {"match": {"path": r"re:(.|\w)*\d{3}"}, "skip": True}]})


def _same_recipes(pairs):
    assert pairs and all(a.defaults == b.defaults and a.rules == b.rules for a, b in pairs)


@case("recipe", "valid-recipe-round-trip", "every shipped recipe, dumped to YAML and parsed back",
      outcome="equal Recipe objects", check=_same_recipes)
def _(env):
    import yaml
    from qswap.recipe import load_recipe, parse_yaml, shipped_recipe_names
    return [(load_recipe(n), parse_yaml(yaml.safe_dump(load_recipe(n).to_dict()), source=n))
            for n in shipped_recipe_names()]


# -- checkpoints -------------------------------------------------------------------------------
class _Payload:
    """Unpickling this runs ``os.system`` (touches a marker file): a malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _ExecPayload(_Payload):
    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


class Harmless:
    """A user class: harmless, but not on the allowlist."""

    def __init__(self):
        self.note = "hello"


def _load(path, **kw):
    from qswap.io import load_fairseq_model
    return load_fairseq_model(path, **kw)


def _good_bytes(env: Env) -> bytes:
    return env.shared.checkpoint().read_bytes()


def _write(env: Env, data: bytes, name: str = "ckpt.pt") -> Path:
    path = env.tmp / name
    path.write_bytes(data)
    return path


def _torch_file(env: Env, obj, name: str = "ckpt.pt", **kw) -> Path:
    path = env.tmp / name
    torch.save(obj, path, **kw)
    return path


def _state(env: Env, flavour: str = "trainer") -> dict:
    return env.shared.state(flavour)


def _bytes_case(id, desc, make):
    case("checkpoint", id, desc, raises=CheckpointError)(lambda env: _load(_write(env, make(env))))


_bytes_case("ckpt-empty-file", "a 0-byte file", lambda env: b"")
_bytes_case("ckpt-text-file", "a YAML text file named .pt", lambda env: b"version: 1\nname: x\n")
_bytes_case("ckpt-random-bytes", "4 KiB of random bytes", lambda env: os.urandom(4096))
_bytes_case("ckpt-truncated-half", "the first half of a real checkpoint",
            lambda env: _good_bytes(env)[: len(_good_bytes(env)) // 2])
_bytes_case("ckpt-truncated-tail", "a real checkpoint missing its last 100 bytes",
            lambda env: _good_bytes(env)[:-100])
_bytes_case("ckpt-truncated-head", "a real checkpoint missing its first 100 bytes",
            lambda env: _good_bytes(env)[100:])
_bytes_case("ckpt-raw-pickle", "pickle.dumps of a dict (not torch.save)",
            lambda env: pickle.dumps({"model": {}, "cfg": {}}))


def _flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at:at + 32] = bytes(b ^ 0xFF for b in out[at:at + 32])
    return bytes(out)


_bytes_case("ckpt-corrupt-weights", "32 flipped bytes inside the weight data (CRC mismatch)",
            lambda env: _flip(_good_bytes(env), len(_good_bytes(env)) // 2))
_bytes_case("ckpt-corrupt-pickle", "32 flipped bytes inside data.pkl",
            lambda env: _flip(_good_bytes(env), _good_bytes(env).find(b"data.pkl") + 64))


def _zip_not_torch(env):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("readme.txt", "not a checkpoint")
    return buf.getvalue()


_bytes_case("ckpt-zip-not-torch", "a zip archive that torch did not write", _zip_not_torch)


@case("checkpoint", "ckpt-missing", "a path that does not exist", raises=CheckpointError)
def _(env):
    return _load(env.tmp / "missing.pt")


@case("checkpoint", "ckpt-directory", "a directory instead of a file", raises=CheckpointError)
def _(env):
    return _load(env.tmp)


@case("checkpoint", "ckpt-tensor-only", "torch.save of a bare tensor", raises=CheckpointError)
def _(env):
    return _load(_torch_file(env, torch.zeros(3)))


@case("checkpoint", "ckpt-plain-state-dict", "a plain state_dict (no cfg/args): not fairseq",
      raises=CheckpointError)
def _(env):
    return _load(_torch_file(env, {"encoder.weight": torch.zeros(2, 2)}))


@case("checkpoint", "ckpt-no-model", "cfg but no 'model' entry", raises=CheckpointError)
def _(env):
    state = _state(env)
    del state["model"]
    return _load(_torch_file(env, state))


@case("checkpoint", "ckpt-model-not-tensors", "'model' holding a string where a tensor belongs",
      raises=CheckpointError)
def _(env):
    state = _state(env)
    state["model"]["encoder.layer_norm.weight"] = "oops"
    return _load(_torch_file(env, state))


@case("checkpoint", "ckpt-nan-weights", "a weight tensor full of NaN (diverged run)",
      raises=CheckpointError)
def _(env):
    state = _state(env)
    state["model"]["encoder.layer_norm.weight"].fill_(float("nan"))
    return _load(_torch_file(env, state))


@case("checkpoint", "ckpt-shape-mismatch", "weights whose shapes do not match the cfg",
      raises=CheckpointError)
def _(env):
    state = _state(env)
    state["model"]["encoder.layer_norm.weight"] = torch.ones(7)
    return _load(_torch_file(env, state))


@case("checkpoint", "ckpt-unknown-arch", "cfg naming an architecture fairseq does not know",
      raises=CheckpointError)
def _(env):
    state = _state(env)
    state["cfg"]["model"].arch = state["cfg"]["model"]._name = "s2t_hyperformer_xxl"
    return _load(_torch_file(env, state))


@case("checkpoint", "ckpt-unknown-task", "cfg naming a task fairseq does not know",
      raises=CheckpointError)
def _(env):
    state = _state(env)
    state["cfg"]["task"].task = state["cfg"]["task"]._name = "speech_to_everything"
    return _load(_torch_file(env, state))


@case("checkpoint", "ckpt-malicious-os-system",
      "a pickle whose __reduce__ calls os.system (must not run)", raises=UnsafeCheckpointError,
      after=_marker_absent)
def _(env):
    state = _state(env)
    state["extra_state"]["payload"] = _Payload(env.tmp / "PWNED")
    return _load(_torch_file(env, state))


@case("checkpoint", "ckpt-malicious-exec", "a pickle whose __reduce__ calls exec (must not run)",
      raises=UnsafeCheckpointError, after=_marker_absent)
def _(env):
    return _load(_torch_file(env, {"model": {}, "x": _ExecPayload(env.tmp / "PWNED")}))


@case("checkpoint", "ckpt-malicious-legacy-format",
      "the os.system payload in torch's old (non-zip) format", raises=UnsafeCheckpointError,
      after=_marker_absent)
def _(env):
    return _load(_torch_file(env, {"x": _Payload(env.tmp / "PWNED")},
                             _use_new_zipfile_serialization=False))


@case("checkpoint", "ckpt-unlisted-class", "a harmless user class outside the allowlist",
      raises=UnsafeCheckpointError)
def _(env):
    state = _state(env)
    state["extra_state"]["note"] = Harmless()
    return _load(_torch_file(env, state))


@case("checkpoint", "ckpt-unlisted-class-trusted", "the same file with trust_checkpoint=True",
      outcome="loads (the opt-in)")
def _(env):
    state = _state(env)
    state["extra_state"]["note"] = Harmless()
    model, _cfg, _task = _load(_torch_file(env, state), trust_checkpoint=True)
    return model


for _flavour, _desc in [("trainer", "fairseq 0.12 Trainer.state_dict layout (cfg as dict + Namespace)"),
                        ("dictconfig", "cfg pickled as an OmegaConf DictConfig"),
                        ("legacy_args", "pre-hydra checkpoint with only args (Namespace)"),
                        ("legacy_format", "args checkpoint in torch's old non-zip format")]:
    case("checkpoint", f"ckpt-valid-{_flavour.replace('_', '-')}", _desc,
         outcome="loads with no opt-in, same outputs as the saved model",
         check=lambda r: r is None)(lambda env, f=_flavour: _same_outputs(env.shared.checkpoint(f)))


def _same_outputs(path: Path) -> None:
    from qswap.models import build_s2t_transformer, s2t_net_input
    model, _cfg, _task = _load(path)
    ref, x = build_s2t_transformer(seed=0), s2t_net_input(frames=40)
    with torch.no_grad():
        assert torch.equal(model(**x)[0], ref(**x)[0])


def _qswap_state(env: Env) -> dict:
    return torch.load(env.shared.qswap_checkpoint(), weights_only=True)


@case("checkpoint", "qswap-ckpt-future-format", "a qswap checkpoint with format 99",
      raises=CheckpointError)
def _(env):
    state = _qswap_state(env)
    state["qswap"]["format"] = 99
    return _load(_torch_file(env, state))


@case("checkpoint", "qswap-ckpt-bad-recipe", "a qswap checkpoint whose stored recipe is invalid",
      raises=CheckpointError)
def _(env):
    state = _qswap_state(env)
    state["qswap"]["recipe"]["defaults"]["weight"]["bits"] = 99
    return _load(_torch_file(env, state))


@case("checkpoint", "qswap-ckpt-missing-buffer", "a qswap checkpoint missing a quantizer buffer",
      raises=CheckpointError)
def _(env):
    state = _qswap_state(env)
    key = next(k for k in state["model"] if k.endswith(".zero_point"))
    del state["model"][key]
    return _load(_torch_file(env, state))


@case("checkpoint", "qswap-ckpt-valid", "a qswap checkpoint (w8a8, calibrated), no opt-in",
      outcome="loads converted, with the saved quantizer state")
def _(env):
    from qswap.calibrate import activation_quantizers
    model, _cfg, _task = _load(env.shared.qswap_checkpoint())
    saved = _qswap_state(env)["model"]
    assert model.qswap_recipe.name == "w8a8"
    assert any(bool(q.frozen) for q in activation_quantizers(model))
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


# -- data directories --------------------------------------------------------------------------
def _data_case(id, desc, prepare):
    def run(env):
        data = prepare(env)
        return _load(env.shared.checkpoint(), arg_overrides={"data": str(data)})
    case("data", id, desc, raises=DataError)(run)


def _copy_data(env, drop=(), **replace) -> Path:
    data = env.tmp / "data"
    data.mkdir()
    for src in env.shared.data_dir.iterdir():
        if src.name not in drop:
            (data / src.name).write_bytes(replace.get(src.name.replace(".", "_"), src.read_bytes()))
    return data


_data_case("data-dir-missing", "data directory that does not exist", lambda env: env.tmp / "nowhere")
_data_case("data-dir-is-file", "a file given as the data directory", lambda env: _write(env, b"x", "data"))
_data_case("data-config-missing", "data directory without config.yaml",
           lambda env: _copy_data(env, drop=("config.yaml",)))
_data_case("data-dict-missing", "config.yaml present, dictionary missing",
           lambda env: _copy_data(env, drop=("dict.txt",)))
_data_case("data-config-malformed", "config.yaml that is not YAML",
           lambda env: _copy_data(env, config_yaml=b"vocab_filename: [unclosed\n"))



def _swapped_dictionary(env) -> Path:
    lines = (env.shared.data_dir / "dict.txt").read_text().splitlines(keepends=True)
    lines[0], lines[1] = lines[1], lines[0]
    return _copy_data(env, dict_txt="".join(lines).encode())


@case("data", "data-dict-swapped", "a qswap checkpoint loaded with a data directory whose dictionary has two "
      "symbols swapped (same size)", raises=DataError)
def _(env):
    return _load(env.shared.qswap_checkpoint(), arg_overrides={"data": str(_swapped_dictionary(env))})


HEADER = "id\taudio\tn_frames\ttgt_text\n"


def _subset_case(id, desc, manifest: "str | bytes | None",
                 read=lambda data, task: data.load_subset(task, "test")):
    """A data directory with ``manifest`` as test.tsv, read by qswap.integration.data."""
    def run(env):
        from qswap.integration import data
        directory = _copy_data(env)
        if manifest is not None:
            text = manifest.encode() if isinstance(manifest, str) else manifest
            (directory / "test.tsv").write_bytes(text)
        _model, task = data.load_model_and_task(env.shared.checkpoint(), directory)
        return read(data, task)
    case("data", id, desc, raises=DataError)(run)


_subset_case("data-manifest-missing", "no test.tsv for subset 'test'", None)
_subset_case("data-manifest-empty", "test.tsv with a header and no utterances", HEADER)
_subset_case("data-manifest-bad-columns", "test.tsv without the id/audio/n_frames columns",
             "foo\tbar\n1\t2\n")
_subset_case("data-manifest-not-utf8", "test.tsv of binary bytes", b"\xff\xfe\x00garbage\n")
_subset_case("data-manifest-bad-n-frames", "n_frames: abc", HEADER + "u1\tx.npy\tabc\thello\n")
_subset_case("data-audio-missing", "a manifest line whose audio file does not exist",
             HEADER + "u1\tnowhere.npy\t100\thello\n",
             read=lambda data, task: data.first_net_input(task, "test"))
_subset_case("data-shard-out-of-range", "shard_id 5 of 2 shards", HEADER + "u1\tx.npy\t100\thello\n",
             read=lambda data, task: list(data.batches(task, "test", num_shards=2, shard_id=5)))
_subset_case("data-manifest-bom", "test.tsv saved with a UTF-8 byte-order mark",
             b"\xef\xbb\xbf" + (HEADER + "u1\tx.npy\t100\thello\n").encode())


@case("data", "data-zero-frames", "a manifest line whose features have 0 frames (audio shorter than one "
      "25 ms frame)", raises=DataError)
def _(env):
    import numpy as np

    from qswap.integration import data
    directory = _copy_data(env)
    np.save(directory / "empty.npy", np.zeros((0, 80), np.float32))
    (directory / "test.tsv").write_text(HEADER + "u1\tempty.npy\t0\thello\n")
    _model, task = data.load_model_and_task(env.shared.checkpoint(), directory)
    return list(data.batches(task, "test"))


# -- audio -------------------------------------------------------------------------------------
def _wav(env: Env, samples, rate: int = 16000, width: int = 2, name: str = "a.wav") -> Path:
    path = env.tmp / name
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(samples if isinstance(samples, bytes) else
                      torch.as_tensor(samples, dtype=torch.int16).numpy().tobytes())
    return path


def _features():
    import qswap.features as features
    return features


def _audio_case(id, desc, run, *, raises=AudioError, outcome="", check=None):
    case("audio", id, desc, raises=raises if not outcome else None, outcome=outcome, check=check,
         needs=("features",))(run)


def _sine(seconds: float, rate: int = 16000, amp: float = 0.3) -> torch.Tensor:
    t = torch.arange(int(seconds * rate), dtype=torch.float32) / rate
    return amp * torch.sin(2 * math.pi * 440.0 * t)


def _fbank_of_wav(env, samples, **kw):
    f = _features()
    wav, rate = f.load_audio(_wav(env, samples, **kw), expected_sample_rate=16000)
    return f.fbank(wav, rate)


def _fbank_ok(frames: int):
    def check(feats):
        assert feats.shape == (frames, 80), feats.shape
        finite(feats)
    return check


_audio_case("audio-missing", "a WAV path that does not exist",
            lambda env: _features().load_audio(env.tmp / "none.wav"))
_audio_case("audio-not-wav", "a text file named .wav",
            lambda env: _features().load_audio(_write(env, b"hello", "a.wav")))
_audio_case("audio-truncated-header", "the first 20 bytes of a WAV file",
            lambda env: _features().load_audio(_write(env, _wav(env, [0] * 1600).read_bytes()[:20],
                                                      "t.wav")))
_audio_case("audio-empty", "a valid WAV header with 0 samples",
            lambda env: _features().load_audio(_wav(env, b"")))
_audio_case("audio-wrong-sample-rate", "8 kHz audio where 16 kHz is expected",
            lambda env: _features().load_audio(_wav(env, [0] * 800, rate=8000), expected_sample_rate=16000))
def _float_read(out):
    waveform, rate = out
    assert rate == 16000 and torch.allclose(waveform, torch.tensor([0.0, 0.1, -0.1, 0.0])), (waveform, rate)


_audio_case("audio-float-wav", "an IEEE-float WAV (format 3)",
            lambda env: _features().load_audio(_write(env, _float_wav(), "f.wav")),
            outcome="read with soundfile, its 4 samples as written", check=_float_read)
_audio_case("audio-nan-samples", "a waveform with NaN samples",
            lambda env: _features().fbank(torch.full((16000,), float("nan")), 16000))
_audio_case("audio-inf-samples", "a waveform with an inf sample",
            lambda env: _features().fbank(torch.cat([_sine(1.0), torch.tensor([float("inf")])]), 16000))
_audio_case("audio-too-short", "10 samples (less than one 25 ms frame)",
            lambda env: _features().fbank(torch.zeros(10), 16000))
_audio_case("audio-stereo-array", "a (2, N) stereo array given to fbank",
            lambda env: _features().fbank(torch.zeros(2, 16000), 16000))
_audio_case("audio-zero-sample-rate", "sample_rate=0",
            lambda env: _features().fbank(_sine(1.0), 0))
_audio_case("audio-int64-pcm", "16-bit samples in an int64 tensor (torch.tensor of ints)",
            lambda env: _features().fbank((_sine(1.0) * 32767).long(), 16000))
_audio_case("audio-unscaled-float", "16-bit sample values as floats (not divided by 32768)",
            lambda env: _features().fbank(_sine(1.0) * 32767, 16000))
_audio_case("audio-silent", "1 s of digital silence",
            lambda env: _fbank_of_wav(env, [0] * 16000), outcome="finite (98, 80) features",
            check=_fbank_ok(98))
_audio_case("audio-clipped", "1 s square wave at full scale (clipped)",
            lambda env: _fbank_of_wav(env, ([32767] * 20 + [-32768] * 20) * 400),
            outcome="finite (98, 80) features", check=_fbank_ok(98))
_audio_case("audio-very-long", "3 minutes of audio in one utterance",
            lambda env: _features().fbank(_sine(180.0, amp=0.1), 16000),
            outcome="finite (17998, 80) features", check=_fbank_ok(17998))


def _float_wav() -> bytes:
    data = struct.pack("<4f", 0.0, 0.1, -0.1, 0.0)
    fmt = struct.pack("<HHIIHH", 3, 1, 16000, 64000, 4, 32)
    body = (b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
            + b"data" + struct.pack("<I", len(data)) + data)
    return b"RIFF" + struct.pack("<I", len(body)) + body


# -- calibration -------------------------------------------------------------------------------
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def _calibrate(batches, recipe="w8a8", model=None, **kw):
    import qswap
    qmodel = qswap.convert(model if model is not None else _mlp(), recipe)
    qswap.calibrate(qmodel, batches, **kw)
    return qmodel


def _finite_grid(qmodel):
    from qswap.calibrate import activation_quantizers
    quantizers = activation_quantizers(qmodel)
    assert quantizers and all(bool(q.frozen) for q in quantizers)
    for q in quantizers:
        finite(q.scale)
        assert (q.scale > 0).all()
    finite(qmodel(torch.randn(3, 8)))


def _calib_case(id, desc, run, *, raises=CalibrationError, outcome="", check=None):
    case("calibration", id, desc, raises=None if outcome else raises, outcome=outcome, check=check)(run)


_calib_case("calib-zero-batches", "an empty list of batches", lambda env: _calibrate([]))
_calib_case("calib-max-batches-zero", "max_batches=0",
            lambda env: _calibrate([torch.ones(2, 8)], max_batches=0))
_calib_case("calib-generator-empty", "an exhausted generator", lambda env: _calibrate(iter(())))
_calib_case("calib-nan-batch", "a batch of NaN", lambda env: _calibrate([torch.full((4, 8), float("nan"))]))
_calib_case("calib-inf-batch", "a batch with +inf",
            lambda env: _calibrate([torch.cat([torch.randn(3, 8), torch.full((1, 8), float("inf"))])]))
_calib_case("calib-empty-tensors", "batches of shape (0, 8) only",
            lambda env: _calibrate([torch.zeros(0, 8)] * 2))
_calib_case("calib-batch-string", "a batch that is a string", lambda env: _calibrate(["utt1.wav"]))
_calib_case("calib-batch-none", "a batch that is None", lambda env: _calibrate([None]))
_calib_case("calib-wrong-shape", "batches of the wrong feature size",
            lambda env: _calibrate([torch.zeros(4, 5)]))
_calib_case("calib-wrong-keys", "a net_input dict with the wrong keys",
            lambda env: _calibrate([{"source": torch.zeros(4, 8)}]))
_calib_case("calib-float-model", "calibrating a model that was never converted",
            lambda env: __import__("qswap").calibrate(_mlp(), [torch.zeros(2, 8)]))
_calib_case("calib-constant-data", "every batch the same constant (3.0)",
            lambda env: _calibrate([torch.full((4, 8), 3.0)] * 3), outcome="finite positive scales, frozen",
            check=_finite_grid)
_calib_case("calib-zero-range", "all-zero batches (zero range)",
            lambda env: _calibrate([torch.zeros(4, 8)] * 3), outcome="finite positive scales, frozen",
            check=_finite_grid)
_calib_case("calib-extreme-range", "values of +-3e38 (range overflows float32)",
            lambda env: _calibrate([torch.tensor([[-3e38] * 4 + [3e38] * 4])]),
            outcome="finite positive scales, frozen", check=_finite_grid)


# -- convert -----------------------------------------------------------------------------------
class _Custom(nn.Module):
    """A module with a parameter and no counterpart."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x * self.gain


def _convert(model, recipe="w8a8", **kw):
    import qswap
    return qswap.convert(model, recipe, **kw)


def _nothing_quantized(counts) -> None:
    assert counts["quantized"] == 0 and counts["float"] == 0 and counts["passthrough"] >= 2, counts


@case("convert", "model-nothing-quantizable", "a model of Dropout and Identity only",
      outcome="converted; the report lists 0 quantized, all passthrough", check=_nothing_quantized)
def _(env):
    return _convert(nn.Sequential(nn.Dropout(), nn.Identity())).qswap_report.counts()


@case("convert", "model-nothing-quantizable-calibrate", "calibrating that model", raises=CalibrationError)
def _(env):
    import qswap
    return qswap.calibrate(_convert(nn.Sequential(nn.Dropout(), nn.Identity())), [torch.zeros(2, 4)])


@case("convert", "unsigned-symmetric-negative-weights", "weights on an unsigned symmetric grid (signed: false, "
      "symmetric: true: zero point 0) that have negative values", raises=SpecError)
def _(env):
    return _convert(_mlp(), {"version": 1, "defaults": {"weight": {"bits": 8, "signed": False, "symmetric": True}}})


@case("convert", "model-unsupported-strict", "strict convert of a module with no counterpart",
      raises=ConvertError)
def _(env):
    return _convert(nn.Sequential(_Custom(), nn.Linear(4, 4)), strict=True)


@case("convert", "model-not-a-module", "convert('model.pt', ...)", raises=ConvertError)
def _(env):
    return _convert("model.pt")


@case("convert", "model-already-converted", "converting a converted model again", raises=ConvertError)
def _(env):
    return _convert(_convert(_mlp()))


@case("convert", "rule-matches-nothing-strict", "strict recipe whose rule matches no module",
      raises=ConvertError)
def _(env):
    return _convert(_mlp(), {"version": 1, "strict": True,
                             "rules": [{"match": {"path": "decoder.fc9"}, "skip": True}]})


@case("convert", "group-size-not-dividing", "per_group size 3 on 8 input channels", raises=SpecError)
def _(env):
    recipe = {"version": 1, "defaults": {"weight": {"granularity": "per_group", "group_size": 3}}}
    return _convert(_mlp(), recipe)(torch.zeros(2, 8))


@case("convert", "model-nan-weights", "a float model with a NaN weight, run after convert",
      raises=CalibrationError)
def _(env):
    model = _mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    return _convert(model)(torch.zeros(2, 8))


@case("convert", "model-nan-input", "NaN in the features fed to a converted, calibrated S2T transformer",
      raises=DataError)
def _(env):
    import qswap
    from qswap.models import build_s2t_transformer, s2t_net_input

    x = s2t_net_input(frames=40)
    qmodel = qswap.convert(build_s2t_transformer(seed=0), "w8a8")
    qswap.calibrate(qmodel, [x])
    x["src_tokens"][0, 3, 5] = float("nan")
    with torch.no_grad():
        return qmodel(**x)


def _float_and_unchanged(result) -> None:
    model, state = result
    assert not any(type(m).__module__.startswith("qswap") for m in model.modules()), "float_model was converted"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items()), "float_model's weights changed"


@case("convert", "regrid-other-architecture", "qswap.regrid onto a float model with fewer layers",
      outcome="ConvertError; the float model stays float, its weights unchanged", check=_float_and_unchanged)
def _(env):
    import qswap
    from qswap.models import build_s2t_transformer, s2t_net_input

    qmodel = qswap.convert(build_s2t_transformer(seed=0), "w8a8")
    qswap.calibrate(qmodel, [s2t_net_input(frames=40)])
    float_model = build_s2t_transformer(seed=1, encoder_layers=1)
    state = {k: v.clone() for k, v in float_model.state_dict().items()}
    with contextlib.suppress(ConvertError):
        qswap.regrid(qmodel, "w8a8", float_model)
        raise AssertionError("regrid of another architecture did not raise")
    return float_model, state


@case("convert", "caller-model-untouched", "convert + calibrate, then inspect the float model",
      outcome="same modules, parameters and outputs as before")
def _(env):
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 8)
    y = model(x)
    _calibrate([torch.randn(4, 8)], model=model)
    assert all(type(m) in (nn.Sequential, nn.Linear, nn.ReLU) for m in model.modules())
    assert not hasattr(model, "qswap_recipe")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model(x), y)


# -- quantization primitives -------------------------------------------------------------------
@case("quant", "spec-bits-17", "QuantSpec(bits=17)", raises=SpecError)
def _(env):
    from qswap.quant import QuantSpec
    return QuantSpec(bits=17)


@case("quant", "spec-unknown-field", "QuantSpec.from_dict with an unknown field", raises=SpecError)
def _(env):
    from qswap.quant import QuantSpec
    return QuantSpec.from_dict({"bits": 8, "bitz": 4})


@case("quant", "qparams-nan-range", "choose_qparams(NaN, 1.0)", raises=CalibrationError)
def _(env):
    from qswap.quant import QuantSpec, choose_qparams
    return choose_qparams(torch.tensor(float("nan")), torch.tensor(1.0), QuantSpec())


@case("quant", "qparams-extreme-range", "choose_qparams(-3e38, 3e38), affine and pow2",
      outcome="finite scales; fake_quantize stays finite", check=finite)
def _(env):
    from qswap.quant import QuantSpec, choose_qparams, fake_quantize
    x = torch.tensor([-3e38, -1.0, 0.0, 1.0, 3e38])
    outs = []
    for spec in (QuantSpec(symmetric=False), QuantSpec(scale_type="pow2"),
                 QuantSpec(bits=2, symmetric=False)):
        scale, zp = choose_qparams(x.min(), x.max(), spec)
        outs += [scale, fake_quantize(x, scale, zp, spec)]
    return torch.cat([o.reshape(-1) for o in outs])


@case("quant", "fake-quantize-inf-input", "fake_quantize of +-inf with a finite grid",
      outcome="clamped to the grid ends (finite)", check=finite)
def _(env):
    from qswap.quant import QuantSpec, fake_quantize
    inf = float("inf")
    return fake_quantize(torch.tensor([inf, -inf, 1.0]), torch.tensor(0.1),
                         torch.tensor(0, dtype=torch.int32), QuantSpec())


@case("quant", "fake-quantize-zero-tensor", "observing and fake-quantizing an all-zero tensor",
      outcome="zeros, with the smallest positive scale")
def _(env):
    import qswap
    fq = qswap.FakeQuantize(qswap.QuantSpec(symmetric=False))
    out = fq(torch.zeros(4, 4))
    assert torch.equal(out, torch.zeros(4, 4)) and float(fq.scale) > 0
    return out


# -- writing files -----------------------------------------------------------------------------
@case("output", "write-missing-directory", "atomic write into a directory that does not exist",
      raises=OutputError)
def _(env):
    from qswap.io import atomic_write_text
    return atomic_write_text(env.tmp / "no" / "such" / "report.json", "{}")


@case("output", "write-onto-directory", "atomic write whose target is a directory", raises=OutputError)
def _(env):
    from qswap.io import atomic_write_text
    (env.tmp / "report.json").mkdir()
    return atomic_write_text(env.tmp / "report.json", "{}")


@case("output", "write-fails-midway", "the writer raises halfway through",
      outcome="previous file intact, no temporary file left")
def _(env):
    from qswap.io import atomic_open
    target = env.tmp / "model.pt"
    target.write_bytes(b"previous")
    with contextlib.suppress(RuntimeError):
        with atomic_open(target, "wb") as f:
            f.write(b"half a checkpoint")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in env.tmp.iterdir()) == ["model.pt"]


def _link_kept(env: Env) -> None:
    assert (env.tmp / "latest.pt").is_symlink() and (env.tmp / "real.pt").read_bytes() == b"new"


@case("output", "write-through-symlink", "atomic write whose target is a symbolic link to a file",
      outcome="the file the link names replaced atomically, the link kept", after=_link_kept)
def _(env):
    from qswap.io import atomic_write_bytes
    (env.tmp / "real.pt").write_bytes(b"previous")
    (env.tmp / "latest.pt").symlink_to("real.pt")
    return atomic_write_bytes(env.tmp / "latest.pt", b"new")


@case("output", "save-unconverted-model", "save_qswap_checkpoint of a float model", raises=CheckpointError)
def _(env):
    from qswap.io import save_qswap_checkpoint
    return save_qswap_checkpoint(env.tmp / "q.pt", _mlp(), {"cfg": {}})


# -- command line ------------------------------------------------------------------------------
def _cli(argv: list[str]) -> tuple[int, str]:
    from qswap.cli import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
    return code, err.getvalue()


def _exit_2_one_line(result) -> None:
    code, err = result
    assert code == 2, (code, err)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("usage:")]
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in err, err


def _cli_case(id, desc, argv):
    case("cli", id, desc, outcome="exit code 2, one-line message, no traceback",
         check=_exit_2_one_line)(lambda env: _cli(argv(env)))


_cli_case("cli-bad-recipe", "qswap recipes bad.yaml (bits: 0)",
          lambda env: ["recipes", str(_recipe_file(env, V + "defaults: {weight: {bits: 0}}\n"))])
_cli_case("cli-missing-recipe", "qswap recipes missing.yaml",
          lambda env: ["recipes", str(env.tmp / "m.yaml")])
_cli_case("cli-convert-missing-checkpoint", "qswap convert missing.pt",
          lambda env: ["convert", str(env.tmp / "missing.pt"), "--recipe", "w8a8",
                       "-o", str(env.tmp / "q.pt")])
_cli_case("cli-convert-bad-recipe", "qswap convert with a recipe whose bits is 0",
          lambda env: ["convert", str(env.shared.checkpoint()), "-o", str(env.tmp / "q.pt"), "--recipe",
                       str(_recipe_file(env, V + "defaults: {weight: {bits: 0}}\n"))])
_cli_case("cli-convert-unwritable-output", "qswap convert -o into a missing directory",
          lambda env: ["convert", str(env.shared.checkpoint()), "--recipe", "w8_weight_only",
                       "-o", str(env.tmp / "no" / "dir" / "q.pt")])
_cli_case("cli-calibrate-missing-data", "qswap calibrate --data missing_dir",
          lambda env: ["calibrate", str(env.shared.qswap_checkpoint()), "--data", str(env.tmp / "none"),
                       "-o", str(env.tmp / "q.pt")])

_cli_case("cli-eval-calibration-without-recipe", "qswap eval QCKPT --calib-batches 4 (no --recipe: nothing to calibrate)",
          lambda env: ["eval", str(env.shared.qswap_checkpoint()), "--data", str(env.shared.data_dir),
                       "--calib-batches", "4"])
_cli_case("cli-eval-onnxruntime-calibration", "qswap eval DIR --backend onnxruntime --calib-subset train",
          lambda env: ["eval", str(env.tmp / "export"), "--data", str(env.shared.data_dir), "--backend",
                       "onnxruntime", "--calib-subset", "train"])

_cli_case("cli-sensitivity-wer-options-under-sqnr", "qswap sensitivity --top-k 3 (the default --metric sqnr decodes "
          "nothing)", lambda env: ["sensitivity", str(env.shared.checkpoint()), "--data", str(env.shared.data_dir),
                                   "--top-k", "3"])
_cli_case("cli-calibrate-weight-only", "qswap calibrate of a w8_weight_only checkpoint (no activation quantizers)",
          lambda env: ["calibrate", str(_weight_only(env)), "--data", str(env.shared.data_dir), "-o",
                       str(env.tmp / "again.pt")])


def _weight_only(env):
    from qswap.cli import main
    out = env.tmp / "wo.pt"
    assert main(["convert", str(env.shared.checkpoint()), "--recipe", "w8_weight_only", "-o", str(out)]) == 0
    return out


def _asks_for_the_recipe(result) -> None:
    _exit_2_one_line(result)
    assert "is a float checkpoint: it needs --recipe R" in result[1], result[1]


@case("cli", "cli-audit-float-without-recipe", "qswap audit of the shipped float checkpoint with neither --recipe "
      "nor --data (its task's data directory is not found)", outcome="exit code 2: it needs --recipe (and --data)",
      check=_asks_for_the_recipe)
def _(env):
    asset = Path(__file__).resolve().parents[2] / "qswap" / "assets" / "s2t_demo" / "checkpoint.pt"
    here = os.getcwd()
    os.chdir(env.tmp)  # its cfg names data '.': no config.yaml here
    try:
        return _cli(["audit", str(asset)])
    finally:
        os.chdir(here)


def _printed_as_written(result) -> None:
    code, out = result
    assert code == 0 and "x[/]" in out and "kept [red] float [/]" in out, out


@case("cli", "cli-recipe-text-with-brackets", "qswap recipes FILE whose name and note hold [/] and [red]",
      outcome="exit code 0, the text printed as written (not read as markup)", check=_printed_as_written)
def _(env):
    from qswap.cli import main
    path = _recipe_file(env, V + 'name: "x[/]"\ndefaults: {weight: {bits: 8}}\n'
                             'rules: [{match: {path: fc1}, note: "kept [red] float [/]"}]\n')
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(["recipes", str(path)])
    return code, out.getvalue()


def _refused_unsafe(result) -> None:
    _exit_2_one_line(result)
    assert f"{os.system.__module__}.system" in result[1] and "--trust-checkpoint" in result[1], result[1]


@case("cli", "cli-convert-malicious-checkpoint", "qswap convert of a checkpoint with an os.system payload",
      outcome="exit code 2, one line naming the global and --trust-checkpoint", check=_refused_unsafe,
      after=_marker_absent)
def _(env):
    path = _torch_file(env, {"model": {}, "x": _Payload(env.tmp / "PWNED")})
    return _cli(["convert", str(path), "--recipe", "w8a8", "-o", str(env.tmp / "q.pt")])
_cli_case("cli-unknown-command", "qswap frobnicate", lambda env: ["frobnicate"])
_cli_case("cli-unknown-option", "qswap recipes --bits 4", lambda env: ["recipes", "--bits", "4"])


@case("cli", "cli-debug-traceback", "qswap --debug recipes bad.yaml",
      raises=RecipeError)
def _(env):
    from qswap.cli import main
    with contextlib.redirect_stderr(io.StringIO()):
        return main(["--debug", "recipes", str(_recipe_file(env, V + "defaults: {weight: {bits: 0}}\n"))])

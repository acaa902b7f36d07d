"""The safe evaluator of fairseq's expression-valued config fields: it computes what fairseq's
own ``eval`` computes on every such default fairseq ships, and refuses everything else with a
ConvertError that names the field."""
import pytest

from qswap.errors import ConvertError
from qswap.nn.fairseq.config_expr import MAX_ITEMS, eval_config_expr

# Wav2Vec2Config's default (base; the large and XLS-R configs keep it), as fairseq 0.12 writes it
DEFAULT = "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]"


def test_wav2vec2_default_layers():
    assert eval_config_expr(DEFAULT, "conv_feature_layers") == (
        [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2)


def _fairseq_expression_defaults():
    """(config class, field, default) of every dataclass field fairseq ``eval``s."""
    pytest.importorskip("fairseq")
    from fairseq.models.hubert.hubert import HubertConfig
    from fairseq.models.wav2vec.wav2vec import Wav2VecConfig
    from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Config

    return [(cls.__name__, field, getattr(cls(), field))
            for cls, fields in ((Wav2Vec2Config, ["conv_feature_layers"]),
                                (HubertConfig, ["conv_feature_layers"]),
                                (Wav2VecConfig, ["conv_feature_layers", "conv_aggregator_layers"]))
            for field in fields]


def test_matches_fairseqs_eval_on_every_shipped_default():
    cases = _fairseq_expression_defaults()
    assert ("Wav2Vec2Config", "conv_feature_layers", DEFAULT) in cases
    for cls, field, text in cases:
        assert eval_config_expr(text, field) == eval(text), (cls, field)  # trusted: fairseq's own defaults


@pytest.mark.parametrize("text, value", [
    ("[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2", [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2),
    ("[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2", [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2),
    ("2 * [(32, 3, 2)]", [(32, 3, 2), (32, 3, 2)]),
    ("[(512, 10, 5)] + [(512, 2, 2)] + [(512, 2, 2)]", [(512, 10, 5), (512, 2, 2), (512, 2, 2)]),
    ("[(16 * 2, 3 + 1, 2)]", [(32, 4, 2)]),
    ("[[32, 3, 2]]", [[32, 3, 2]]),
    ("[(32, 3, 2)] * 0", []),
])
def test_accepts_the_config_language(text, value):
    assert eval_config_expr(text, "conv_feature_layers") == value


@pytest.mark.parametrize("text, says", [
    ("__import__('os').system('true')", "is not allowed"),  # a call
    ("[(dim, 3, 2)]", "'dim' is not allowed"),  # a name
    ("[().__class__]", "is not allowed"),  # an attribute
    ("[(512, 3, 2)] * 10**9", "is not allowed"),  # ** is not in the language
    ("[(512, 3, 2)] * 1000000", f"longer than {MAX_ITEMS}"),  # a huge repetition
    ("[(512, 3, 2)] * 100 * 100 * 100", f"longer than {MAX_ITEMS}"),
    ("[(512, 3, 2)] - [(512, 3, 2)]", "is not allowed"),
    ("[(512, 3, 2)] + 1", "cannot apply `+` to list and int"),
    ("[(512, 3, 2)] * [(1, 2, 3)]", "cannot apply `*` to list and list"),
    ("[(512.0, 3, 2)]", "'512.0' is not allowed"),  # floats
    ("[(True, 3, 2)]", "'True' is not allowed"),  # bools are not integers here
    ("'[(512, 3, 2)]'", "is not allowed"),  # a string
    ("[x for x in ()]", "is not allowed"),
    ("[(512, 3, 2)", "not a valid expression"),
    ("[" * 5000 + "]" * 5000, "not a valid expression"),  # nesting beyond the parser
    ("1" + "0" * 20, "larger than"),
    ("9" * 20000, "characters long"),
])
def test_rejects_everything_else_naming_the_field(text, says):
    with pytest.raises(ConvertError, match="conv_feature_layers") as err:
        eval_config_expr(text, "conv_feature_layers")
    assert says in str(err.value)
    assert "only integers" in str(err.value) or "valid expression" in str(err.value) or \
        "characters long" in str(err.value)


def test_rejects_a_non_string():
    with pytest.raises(ConvertError, match="conv_feature_layers' must be a string"):
        eval_config_expr([(512, 3, 2)], "conv_feature_layers")

"""Counterparts of fairseq modules (imports fairseq). Registered on import; ``qswap.convert``
imports this package whenever fairseq is already imported.

Modules that only move data at inference are passthrough (listed by qualified name in
``qswap.nn.registry.PASSTHROUGH``): ``TransposeLast`` and ``SamePad`` (wav2vec 2.0),
``RelPositionalEncoding`` (slices a constant table that the rel-pos attention's ``linear_pos``
quantizes).
What each counterpart quantizes is listed in docs/architectures.md. Importing this package also
declares every integer form of its modules (``qswap.export.integer_load`` relies on it).
"""
from qswap.nn.fairseq import (  # noqa: F401  (registration, integer-form declarations)
    attention,
    chain,
    conformer,
    decoder,
    espnet,
    layers,
    models,
    norms,
    positional,
    subsample,
    wav2vec2,
)

"""Counterparts of fairseq modules (imports fairseq). Registered on import; ``qswap.convert``
imports this package whenever fairseq is already imported."""

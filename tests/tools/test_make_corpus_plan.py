"""tools/make_corpus.py's plan of the large evaluation sets: no synthesis, the voice inventories
given explicitly (the machine's own need not have every voice)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import make_corpus as mc  # noqa: E402

SHIPPED_VOICES = {"espeak-ng": [f"{a}+{v}" for a in mc.ESPEAK_ACCENTS for v in mc.ESPEAK_VARIANTS],
                  "flite": list(mc.FLITE_VOICES), "festival": list(mc.FESTIVAL_VOICES)}


def test_the_large_sets_keep_the_shipped_corpus_out_with_the_shipped_voices():
    planned = {u.text for u in mc.plan(mc.BASE_NUM, mc.SHIPPED_SEED, SHIPPED_VOICES)}
    large = mc.plan_eval_large(50, 30, mc.SHIPPED_SEED, SHIPPED_VOICES, mc.BASE_NUM)
    assert len(large) == 80 and not {u.text for u in large} & planned


def test_another_voice_inventory_is_refused_not_mixed_into_the_large_sets():
    """Without festival the corpus planned again is not the shipped one (plan draws sentences and
    voices from one generator): the large sets had taken 161 of 1600 sentences from it, 155 of
    them training sentences, with a warning only."""
    without = {k: v for k, v in SHIPPED_VOICES.items() if k != "festival"}
    with pytest.raises(SystemExit, match="does not give .*test.*sentences: its voice inventory differs"):
        mc.plan_eval_large(50, 30, mc.SHIPPED_SEED, without, mc.BASE_NUM)
    assert len(mc.plan_eval_large(5, 3, 2, without, mc.BASE_NUM)) == 8  # another seed: no shipped corpus to match

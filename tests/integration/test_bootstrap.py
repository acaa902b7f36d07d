"""Paired bootstrap intervals: a closed form, scipy's bootstrap as the reference, determinism,
and the sign and width of ΔWER intervals."""
import numpy as np
import pytest
import scipy.stats

from qswap.errors import DataError
from qswap.integration.bootstrap import (MIN_UTTERANCES, NO_INTERVAL, Bootstrap, Interval, as_interval, bounds,
                                         delta_interval, interval_text, no_interval_note, significant, value_text,
                                         wer_interval)
from qswap.integration.compare import Row, add_intervals
from qswap.integration.metrics import error_counts, utterance_word_errors


def _system(seed: int, n: int = 300, p: float = 0.1):
    r = np.random.default_rng(seed)
    words = r.integers(3, 12, n)
    return r.binomial(words, p), words


def test_one_word_utterances_give_the_binomial_quantiles():
    # n one-word utterances, k wrong: a resample's error count is Binomial(n, k/n), exactly
    n, k = 60, 12
    errors, words = np.r_[np.ones(k, int), np.zeros(n - k, int)], np.ones(n, int)
    got = wer_interval(errors, words, Bootstrap(resamples=20000))
    expected = 100 * scipy.stats.binom.ppf([0.025, 0.975], n, k / n) / n
    assert (got.low, got.high) == pytest.approx(tuple(expected))


@pytest.mark.parametrize("seed", [0, 7])
def test_intervals_equal_scipy_percentile_bootstrap(seed):
    errors, words = _system(1)
    baseline, _ = _system(2)
    baseline = np.minimum(baseline, words)
    bs = Bootstrap(resamples=3000, seed=seed)

    def ref(stat, *data):
        res = scipy.stats.bootstrap(data, stat, paired=True, vectorized=True, n_resamples=3000,
                                    method="percentile", rng=np.random.default_rng(seed))
        return tuple(res.confidence_interval)

    wer = ref(lambda e, w, axis: 100 * e.sum(axis) / w.sum(axis), errors, words)
    delta = ref(lambda e, b, w, axis: 100 * (e.sum(axis) - b.sum(axis)) / w.sum(axis), errors, baseline, words)
    got_wer, got_delta = wer_interval(errors, words, bs), delta_interval(errors, baseline, words, bs)
    assert (got_wer.low, got_wer.high) == pytest.approx(wer, rel=1e-12)
    assert (got_delta.low, got_delta.high) == pytest.approx(delta, rel=1e-12)


def test_fixed_seed_is_deterministic_and_another_seed_differs():
    errors, words = _system(3)
    assert wer_interval(errors, words) == wer_interval(errors, words)
    assert wer_interval(errors, words, Bootstrap(seed=1)) != wer_interval(errors, words, Bootstrap(seed=2))


def test_identical_systems_give_a_zero_width_interval_at_zero():
    errors, words = _system(4)
    interval = delta_interval(errors, errors, words)
    assert (interval.low, interval.high) == (0.0, 0.0) and not significant(interval)


def test_a_system_dropping_one_word_per_utterance_is_significantly_worse():
    r = np.random.default_rng(5)
    refs = [" ".join(f"w{r.integers(50)}" for _ in range(r.integers(4, 10))) for _ in range(100)]
    hyps = [ref.split(" ", 1)[1] for ref in refs]  # the first word of every utterance dropped
    base_errors, words = utterance_word_errors(refs, refs)
    errors, _ = utterance_word_errors(refs, hyps)
    interval = delta_interval(errors, base_errors, words)
    assert interval.low > 0 and significant(interval)
    assert (delta_interval(base_errors, errors, words).high < 0)  # and the other way round, better


def test_a_tiny_difference_on_a_small_set_is_not_significant():
    errors, words = _system(6, n=100)
    better = errors.copy()
    better[np.argmax(errors)] -= 1  # one word fewer wrong in 100 utterances
    interval = delta_interval(better, errors, words)
    assert interval.contains(0.0) and not significant(interval)


def test_per_utterance_counts_sum_to_the_totals():
    refs = ["turn on the kitchen lights", "set a timer for ten minutes", "call anna"]
    hyps = ["turn the kitchen light on", "set timer for ten ten minutes", ""]
    errors, words = utterance_word_errors(refs, hyps)
    total = error_counts(refs, hyps)
    assert words == [5, 6, 2] and errors[2] == 2
    assert sum(errors) == total.word_errors and sum(words) == total.words


def test_rows_get_intervals_against_the_first_row():
    errors, words = _system(8, n=50)
    rows = [Row(name, 100 * sum(e) / sum(words), 0.0, 0.0, True, 0, 1.0, 1.0, 1.0, 1.0, 50, list(e), list(words))
            for name, e in (("fp32", errors), ("same", errors), ("worse", errors + 1))]
    add_intervals(rows)
    assert rows[0].significant is None and rows[0].wer_ci[0] < rows[0].wer < rows[0].wer_ci[1]
    assert rows[1].delta_wer_ci == (0.0, 0.0) and rows[1].significant is False
    assert rows[2].delta_wer_ci[0] > 0 and rows[2].significant is True
    rows[2].utterance_words = rows[2].utterance_words[:-1]
    with pytest.raises(DataError, match="same utterances"):
        add_intervals(rows)


@pytest.mark.parametrize("errors,words", [([], []), ([1, 2], [3])])
def test_mismatched_or_empty_inputs_are_data_errors(errors, words):
    with pytest.raises(DataError):
        wer_interval(errors, words)


def test_one_utterance_gives_no_interval_and_no_verdict():
    # one utterance resamples only to itself: a zero-width interval would call any ΔWER significant
    assert wer_interval([1], [6]) is None and delta_interval([1], [0], [6]) is None
    assert significant(delta_interval([1], [0], [6])) is None
    assert delta_interval([1, 0], [0, 0], [6, 4]) is not None  # two utterances: an interval


def test_rows_of_one_utterance_render_a_dash_and_say_why():
    from qswap.cli.compare_cmd import render_comparison
    from qswap.integration.compare import Comparison

    rows = [Row(name, 100 * e / 6, 0.0, 0.0, True, 0, 1.0, 1.0, 1.0, 1.0, 1, [e], [6])
            for name, e in (("fp32", 0), ("w4a4", 1))]
    add_intervals(rows)
    assert rows[1].wer_ci is None and rows[1].delta_wer_ci is None and rows[1].significant is None
    table = Comparison("ck.pt", "one", rows, {"bootstrap": Bootstrap().to_dict()})
    md = table.markdown()
    assert "| w4a4 | 16.67 | +16.67 | - |" in md and "needs at least 2 utterances, one gave 1" in md
    assert table.to_dict()["note"] == table.note and table.to_dict()["rows"][1]["significant"] is None
    assert "needs at least 2 utterances" in render_comparison(table).caption


def test_the_no_interval_note_is_one_sentence_for_the_comparison_and_for_eval():
    """compare's table and ``qswap eval`` say why there is no interval with the same helper."""
    from qswap.cli.eval_cmd import _intervals
    from qswap.integration.compare import Comparison

    assert no_interval_note(1, "test gave") == f"{NO_INTERVAL}, test gave 1"
    assert no_interval_note(MIN_UTTERANCES, "test gave") is None
    row = Row("fp32", 0.0, 0.0, 0.0, True, 0, 1.0, 1.0, 1.0, 1.0, 1, [0], [6])
    assert Comparison("ck.pt", "test", [row]).note == no_interval_note(1, "test gave")
    assert Comparison("ck.pt", "test", []).note is None
    one = [{"id": "a", "ref": "a b c", "hyp": "a b d"}]
    assert _intervals(one, None)["note"] == no_interval_note(1, "this result has")
    assert "note" not in _intervals(one + [{"id": "b", "ref": "x y", "hyp": "x y"}], None)


def test_an_interval_renders_as_its_bounds_and_a_missing_one_as_no_interval():
    """The doc tools render intervals (or their JSON bounds) with these; without one they say why
    in NO_INTERVAL's words instead of indexing None."""
    interval = Interval(-0.25, 1.5)
    assert as_interval(interval) is interval and as_interval([-0.25, 1.5]) == interval
    assert as_interval(None) is None and as_interval(bounds(None)) is None
    assert interval_text(interval, "+") == interval_text((-0.25, 1.5), "+") == " [-0.25, +1.50]"
    assert value_text(9.771, [6.74, 13.17]) == "9.77 [6.74, 13.17]"
    one = delta_interval([1], [0], [6])
    assert value_text(16.67, one, "+") == f"+16.67 ({NO_INTERVAL})"
    assert value_text(16.67, bounds(one), "+", missing="") == "+16.67"


@pytest.mark.parametrize("refs, hyps", [([""], ["a"]), (["  "], ["a"]), (["a", ""], ["a", "b"])])
def test_an_empty_reference_is_the_same_data_error_for_totals_and_per_utterance_counts(refs, hyps):
    """error_counts refused an empty reference; utterance_word_errors counted it as 0 words (and
    eval's paired ΔWER divided by the sum of those words): both apply the one rule now."""
    for count in (error_counts, utterance_word_errors):
        with pytest.raises(DataError, match=r"reference transcript is empty.*give them a transcript"):
            count(refs, hyps)
    with pytest.raises(DataError, match=r"utterance ids 7\b"):
        utterance_word_errors(["a", ""], ["a", "b"], ids=[3, 7])


def test_a_baseline_listing_an_utterance_twice_is_a_data_error():
    """A concatenated baseline (utterance 0 twice, once all wrong and once right) had been taken
    as the same utterances: the last duplicate decided the ΔWER (0 instead of -50 points)."""
    from qswap.errors import DataError
    from qswap.integration.bootstrap import paired_delta

    result = [{"id": 0, "ref": "a b", "hyp": "a b"}, {"id": 1, "ref": "c d", "hyp": "c d"}]
    baseline = [{"id": 0, "ref": "a b", "hyp": "x y"}, {"id": 1, "ref": "c d", "hyp": "c d"},
                {"id": 0, "ref": "a b", "hyp": "a b"}]
    with pytest.raises(DataError, match=r"the baseline lists utterance\(s\) 0 more than once"):
        paired_delta(result, baseline)
    assert paired_delta(result, baseline[:2])[0] == -50.0


@pytest.mark.parametrize("field, value", [("seed", -1), ("seed", 1.5), ("resamples", 2.5), ("seed", True)])
def test_a_bootstrap_of_a_bad_seed_or_count_is_a_data_error(field, value):
    """numpy's ValueError or TypeError had come at the first interval."""
    from qswap.errors import DataError

    with pytest.raises(DataError, match=f"bootstrap {field} must be a non-negative integer"):
        Bootstrap(**{field: value})

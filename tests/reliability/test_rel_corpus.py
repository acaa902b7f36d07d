"""Runs the bad-input corpus (rel_cases.CASES): each case gives exactly its expected outcome."""
from __future__ import annotations

import contextlib
import signal
import warnings

import pytest

from qswap.errors import QswapError
from rel_cases import CASES, CATEGORIES, Env

CASE_TIMEOUT_S = 60  # a case that runs longer has hung


class CaseHung(BaseException):
    pass


@contextlib.contextmanager
def _deadline(seconds: int):
    def _raise(signum, frame):
        raise CaseHung(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_corpus_is_large_and_well_formed():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    assert len(CASES) >= 40
    assert {c.category for c in CASES} == set(CATEGORIES)
    for c in CASES:
        assert c.raises is None or issubclass(c.raises, QswapError), c.id


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.category}:{c.id}")
def test_case(case, shared, tmp_path):
    if "features" in case.needs:
        pytest.importorskip("qswap.features")
    env = Env(tmp=tmp_path, shared=shared)
    try:
        with _deadline(CASE_TIMEOUT_S), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if case.raises is None:
                result = case.run(env)
                if case.check is not None:
                    case.check(result)
            else:
                with pytest.raises(QswapError) as info:
                    case.run(env)
                exc = info.value
                assert type(exc) is case.raises, f"expected {case.raises.__name__}, got {exc!r}"
                message = str(exc)
                assert message.strip() and "\n" not in message, f"not a one-line message: {message!r}"
    finally:
        if case.after is not None:
            case.after(env)

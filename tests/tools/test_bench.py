"""tools/bench.py's interleaved timing: each function timed round-robin after a warm-up; a pause
before each timed call is slept, not timed (so threads one system leaves spinning go idle before
the next one's run)."""
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import bench  # noqa: E402


def test_the_pause_before_each_run_is_not_timed():
    calls = []

    def run(name):
        return lambda: calls.append((name, time.perf_counter()))
    t0 = time.perf_counter()
    medians = bench.interleaved_medians({"a": run("a"), "b": run("b")}, repeats=3, pause=0.02)
    elapsed = time.perf_counter() - t0
    assert [name for name, _ in calls] == ["a", "b"] + ["a", "b"] * 3  # warm-up, then round-robin
    assert elapsed >= 6 * 0.02  # slept before each of the 6 timed calls
    assert all(0 <= m < 0.02 for m in medians.values())  # but none of it timed
    gaps = [later - earlier for (_, earlier), (_, later) in zip(calls[2:], calls[3:])]
    assert min(gaps) >= 0.02


def test_a_bad_repeat_count_or_model_name_is_refused_before_any_work(capsys):
    """--repeats 0 had silently become 7 (0 is falsy) and a negative count a StatisticsError after
    the models were built; --models sx had benchmarked the shipped model against the 27M targets."""
    import pytest

    for argv, said in ((["--repeats", "0"], "expected 1 or more, got 0"), (["--repeats", "-2"], "got -2"),
                       (["--models", "s,sx"], "--models takes s, shipped or both")):
        with pytest.raises(SystemExit) as stop:
            bench.main(argv)
        assert stop.value.code == 2 and said in capsys.readouterr().err
    assert bench.Sizes.of(quick=False, repeats=None).repeats == 7
    assert bench.Sizes.of(quick=True, repeats=1).repeats == 1

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

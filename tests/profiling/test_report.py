"""The report's timing statistics: spread over repeats and the caveats printed beside speed-ups."""

from __future__ import annotations

from userllm.profiling.report import NOISY_SPREAD, _caveat, _spread, _timed


def test_spread_flags_single_repeats_and_noisy_repeats():
    steady = _spread({"wall_s": 1.0, "wall_s_all": [0.99, 1.0, 1.01]})
    noisy = _spread({"wall_s": 1.0, "wall_s_all": [0.7, 1.0, 1.0 + 2 * NOISY_SPREAD]})
    single = _spread({"wall_s": 1.0, "wall_s_all": [1.0]})
    assert (steady["repeats"], steady["min"], steady["max"], steady["noisy"]) == (3, 0.99, 1.01, False)
    assert noisy["noisy"] and single["noisy"] and _spread(None) is None
    assert _caveat([steady, steady], "cpu") is None
    assert "noisy CPU" in _caveat([steady, noisy], "cpu")
    assert _caveat([single, steady], "cuda:0") == "from a single repeat"
    assert _timed(1.0, steady) == "1.00 s [990.0 ms-1.01 s, n=3]"
    assert _timed(1.0, single).endswith("(1 repeat) ⚠")

"""bench/search_efficiency.py --quick runs end to end and reports every figure."""

from __future__ import annotations

import pytest


@pytest.mark.slow  # real trials through Optuna and two Ray Tune searches
def test_quick_bench_reports_hypervolumes_and_compute(ray_local, tmp_path):
    from bench.search_efficiency import QUICK, main

    results = main(["--quick", "--out", str(tmp_path)])
    hv = results["samplers"]["hypervolume"]
    assert set(hv) == {f"nsga2@{QUICK.k}", f"random@{QUICK.k}", f"random@{2 * QUICK.k}"}
    assert all(v > 0 for v in hv.values())
    off, on = results["early_stopping"]["off"], results["early_stopping"]["on"]
    assert off["stopped"] == 0 and off["completed"] == QUICK.es_trials
    assert on["completed"] + on["stopped"] <= QUICK.es_trials and on["steps_spent"] <= off["steps_spent"]
    # Early stopping really stopped a trial: at step 2 the perplexity follows the lasso weight
    # alone, and seed 0's fourth trial has the largest, so it meets at least two better ones there.
    assert on["stopped"] >= 1 and on["steps_spent"] < off["steps_spent"]
    assert (tmp_path / "results.json").is_file()

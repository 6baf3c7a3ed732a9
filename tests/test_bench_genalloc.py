"""`uvdma bench genalloc` runs and reports every case; no timing is asserted here."""

from __future__ import annotations

import json

import pytest

from uvdma.bench import genalloc as bench
from uvdma.cli import main


@pytest.mark.parametrize("fill", [0.0, 0.5, 0.9])
def test_fill_reaches_the_target_with_holes_spread_out(fill: float) -> None:
    granules = 4096
    pool = bench.fill_pool(granules, fill)
    used = 1 - pool.avail() / pool.size()
    assert fill - 0.01 <= used <= fill + 0.01
    assert bench.fill_pool(granules, fill).avail() == pool.avail()  # deterministic
    if fill:
        chunks: list[bytes] = []
        pool.for_each_chunk(lambda _p, c: chunks.append(bytes(c.map.bits)))
        # free granules in both halves: the holes are not all at one end
        half = granules // 2
        assert 0 in chunks[0][:half]
        assert 0 in chunks[0][half:]


def test_json_report_has_every_case_and_the_goals(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "genalloc", "--json", "--quick"]) == 0
    report = json.loads(capsys.readouterr().out)
    cases = {(r["algo"], r["granules"], r["fill"]) for r in report["results"]}
    assert len(cases) == 5 * 2 * 3
    for r in report["results"]:
        assert 0 < r["anchor_median_ns"] < r["median_ns"] <= r["p99_ns"]
        assert r["ratio"] > 1
    assert set(report["goals"]) == {
        "first_fit_64Ki_50pct_ratio",
        "first_fit_64Ki_50pct_goal_met",
        "first_fit_1Mi_90pct_over_64Ki_50pct",
        "scaling_goal_met",
    }


def test_table_names_the_goals(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(quick=True) == 0
    out = capsys.readouterr().out
    assert "anchor (a pair of no-op method calls)" in out
    assert out.count("goal:") == 2

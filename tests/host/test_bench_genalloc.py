"""`uvdma bench genalloc` runs and reports every case; no timing is asserted here."""

from __future__ import annotations

import hashlib
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


@pytest.mark.parametrize(("fill", "digest"), [(0.5, "84a8ca8ce9814b4e"), (0.9, "ad8f984125f6b1f3")])
def test_fill_is_the_pool_it_always_was(fill: float, digest: str) -> None:
    # The pool the first version of this benchmark filled (its list of tuples is now two
    # arrays, for 16 Mi granules): figures stay comparable from version to version.
    chunks: list[bytes] = []
    bench.fill_pool(4096, fill).for_each_chunk(lambda _p, c: chunks.append(bytes(c.map.bits)))
    assert hashlib.sha256(chunks[0]).hexdigest()[:16] == digest


def test_json_report_has_every_case_and_the_goals(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "genalloc", "--json", "--quick"]) == 0
    report = json.loads(capsys.readouterr().out)
    cases = {(r["algo"], r["granules"], r["fill"]) for r in report["results"]}
    assert len(cases) == len(report["results"]) == 6 * 2 * 3
    assert {r["algo"] for r in report["results"]} == set(bench.ALGORITHMS)
    for r in report["results"]:
        assert 0 < r["anchor_median_ns"] < r["median_ns"] <= r["p99_ns"]
        assert r["ratio"] > 1
    assert set(report["goals"]) == {
        "first_fit_64Ki_50pct_ratio",
        "first_fit_64Ki_50pct_goal_met",
        "first_fit_1Mi_90pct_over_64Ki_50pct",
        "scaling_goal_met",
        "best_fit_empty_granules",
        "best_fit_empty_ratios",
        "best_fit_empty_scaling",
        "best_fit_scaling_goal_met",
    }
    assert report["goals"]["best_fit_empty_granules"] == [65536, 1048576]


def test_granules_and_fills_choose_the_cases(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "genalloc", "--json", "--quick", "--granules", "65536,4096,4096"]
    assert main([*argv, "--fills", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    cases = {(r["granules"], r["fill"]) for r in report["results"]}
    assert cases == {(4096, 0.0), (65536, 0.0)}
    goals = report["goals"]
    assert set(goals) == {
        "best_fit_empty_granules",
        "best_fit_empty_ratios",
        "best_fit_empty_scaling",
        "best_fit_scaling_goal_met",
    }
    lo, hi = goals["best_fit_empty_ratios"]
    assert goals["best_fit_empty_scaling"] == pytest.approx(hi / lo)
    assert goals["best_fit_empty_granules"] == [4096, 65536]


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("--granules", "64Ki", "not a comma-separated list of whole numbers of granules"),
        ("--granules", "0", "granules must be 1 to"),
        ("--granules", "", "not a comma-separated list"),
        ("--fills", "100", "percent must be 0 to 99, not 100"),
        ("--fills", "-5", "not a comma-separated list"),
    ],
)
def test_bad_lists_are_refused_by_argparse(
    option: str, value: str, words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["bench", "genalloc", option, value])
    assert info.value.code == 2
    assert words in capsys.readouterr().err


def test_one_pool_size_measures_no_scaling_goal(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(quick=True, granules=(4096,), fills=(0.0,)) == 0
    out = capsys.readouterr().out
    assert "goals: none measured" in out


def test_table_names_the_goals(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(quick=True) == 0
    out = capsys.readouterr().out
    assert "anchor (a pair of no-op method calls)" in out
    assert out.count("goal:") == 3
    assert "goal: best_fit on an empty pool, 1048576 granules <= 3x 65536:" in out

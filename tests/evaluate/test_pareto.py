"""Pareto fronts on synthetic points, budget parsing, and the recommendation's choice and reasons."""

from __future__ import annotations

import pytest

from slmkit.evaluate.pareto import BudgetError, parse_budget, pareto_front, recommend

POINTS = [  # (bits_per_byte, bytes)
    {"name": "base", "bits_per_byte": 1.30, "bytes_on_disk": 8_000_000, "decode_ms_per_token": 9.0},
    {"name": "int8", "bits_per_byte": 1.31, "bytes_on_disk": 2_100_000, "decode_ms_per_token": 7.0},
    {"name": "int4", "bits_per_byte": 1.40, "bytes_on_disk": 1_200_000, "decode_ms_per_token": 4.0},
    {"name": "bad", "bits_per_byte": 1.45, "bytes_on_disk": 2_500_000, "decode_ms_per_token": 8.0},  # dominated
    {"name": "tie", "bits_per_byte": 1.31, "bytes_on_disk": 2_100_000, "decode_ms_per_token": 7.0},
    {"name": "nan", "bits_per_byte": float("nan"), "bytes_on_disk": 10, "decode_ms_per_token": 1.0},
]


def test_pareto_front_of_quality_vs_bytes():
    front = pareto_front(POINTS, {"bits_per_byte": "min", "bytes_on_disk": "min"})
    assert [POINTS[i]["name"] for i in front] == ["base", "int8", "int4", "tie"]  # equal points both stay
    brute = [i for i, p in enumerate(POINTS[:5]) if not any(
        q["bits_per_byte"] <= p["bits_per_byte"] and q["bytes_on_disk"] <= p["bytes_on_disk"]
        and (q["bits_per_byte"], q["bytes_on_disk"]) != (p["bits_per_byte"], p["bytes_on_disk"]) for q in POINTS[:5])]
    assert front == brute


def test_pareto_front_with_a_maximised_objective():
    rows = [{"acc": 0.5, "bytes_on_disk": 10}, {"acc": 0.6, "bytes_on_disk": 20}, {"acc": 0.4, "bytes_on_disk": 30}]
    assert pareto_front(rows, {"acc": "max", "bytes_on_disk": "min"}) == [0, 1]


def test_budget_parsing_units_and_errors():
    b = parse_budget("bytes<=20MB, decode_ms<5,bpb<=1.6,rss<=1GiB")
    assert [(c.metric, c.op, c.value) for c in b] == [("bytes_on_disk", "<=", 20e6), ("decode_ms_per_token", "<", 5.0),
                                                     ("bits_per_byte", "<=", 1.6), ("peak_rss_bytes", "<=", 2 ** 30)]
    assert parse_budget("") == []
    with pytest.raises(BudgetError, match="unknown metric 'size'"):
        parse_budget("size<=3MB")
    with pytest.raises(BudgetError, match="unknown unit 'parsecs'"):
        parse_budget("bytes<=3parsecs")
    with pytest.raises(BudgetError, match="not `metric<=value"):
        parse_budget("bytes about 3MB")


def test_recommendation_inside_the_budget_explains_itself():
    names = [p["name"] for p in POINTS]
    rec = recommend(POINTS, parse_budget("bytes<=3MB,decode_ms<=8"), "bpb", names)
    assert names[rec.index] == "int8"  # int8 and tie score alike; fewer bytes or first wins the tie
    assert sorted(names[i] for i in rec.feasible) == ["bad", "int4", "int8", "tie"]
    assert "int8 has the lowest bits_per_byte (1.31)" in rec.reasons[0]
    assert any(r.startswith("base scores better (1.3) but breaks bytes<=3MB, decode_ms<=8") for r in rec.reasons)


def test_recommendation_when_nothing_fits():
    rec = recommend(POINTS[:3], parse_budget("bytes<=1KB"), "bpb", ["a", "b", "c"])
    assert rec.index is None and "no candidate meets the budget" in rec.reasons[0]
    assert rec.reasons[1] == "a breaks bytes<=1KB"

"""The champion lineage that rollback walks, replayed from recorded alias moves (pure, table-driven)."""

from __future__ import annotations

import pytest

from pipelines.registry.mlflow_client import champion_lineage


def promote(version: str, previous: str | None) -> dict:
    return {"action": "promote", "version": version, "previous": previous}


def rollback(version: str, previous: str) -> dict:
    return {"action": "rollback", "version": version, "previous": previous}


@pytest.mark.parametrize(
    ("name", "history", "lineage"),
    [
        ("nothing recorded", [], []),
        ("first promotion", [promote("1", None)], ["1"]),
        ("promotions stack up", [promote("1", None), promote("2", "1"), promote("3", "2")], ["1", "2", "3"]),
        ("a rollback pops", [promote("1", None), promote("2", "1"), rollback("1", "2")], ["1"]),
        (
            "two rollbacks walk further back",
            [promote("1", None), promote("2", "1"), promote("3", "2"), rollback("2", "3"), rollback("1", "2")],
            ["1"],
        ),
        (
            "promoting after a rollback replaces the rolled-back branch",
            [promote("1", None), promote("2", "1"), rollback("1", "2"), promote("3", "1")],
            ["1", "3"],
        ),
        (
            "a champion set outside promote() is kept as the previous one",
            [promote("1", None), promote("5", "4")],
            ["1", "4", "5"],
        ),
        (
            "re-promoting an old version keeps the order it served in",
            [promote("1", None), promote("2", "1"), promote("1", "2")],
            ["1", "2", "1"],
        ),
    ],
)
def test_champion_lineage(name, history, lineage):
    assert champion_lineage(history) == lineage, name

"""`shopguide simulate` against the real service over HTTP (uvicorn in a thread; the session's champion, a copy of its
applied and materialized Feast stores, real logs in temporary folders): every simulated search is in the request log,
every accepted event in the event log, naming one of those answers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from typer.testing import CliRunner

from pipelines.cli import app as cli
from pipelines.data.dataset import is_training_term
from pipelines.data.event_log import read_event_log
from pipelines.data.request_log import read_request_log
from serving.app import create_app
from serving.settings import Settings

if TYPE_CHECKING:
    from tests.integration.conftest import RegisteredChampion

USERS_IN_EVENT_LOG = 30  # the champion fixture's snapshot: DataConfig(max_terms=100, event_users=30)


def _home(champion: RegisteredChampion, folder: Path) -> Settings:
    """A home with a copy of the champion's Feast stores (its 30 simulated users online) and empty logs."""
    shutil.copytree(champion.paths.feast_dir, folder / "home" / "feast")
    return Settings(
        home=folder / "home",
        model_name=champion.model_name,
        model_poll_seconds=0,
        request_log_flush_seconds=0.05,
        request_log_dir=folder / "requests",
        event_log_dir=folder / "events",
    )


def _simulate(serve_app, settings: Settings, profile: Path) -> tuple[dict, list[dict], list[dict], str]:
    """`shopguide simulate` against a service of its own: (summary, request log, event log, the command's stderr)."""
    args = ["simulate", "--users", "4", "--sessions", "3", "--seed", "5", "--minutes", "2", "--profile", str(profile)]
    with serve_app(create_app(settings)) as url:
        result = CliRunner().invoke(cli, [*args, "--url", url, "--json"])
    assert result.exit_code == 0, result.output
    requests = read_request_log(folder=settings.request_log_folder).to_pylist()  # flushed on the shutdown
    events = read_event_log(folder=settings.event_log_folder).to_pylist()
    return json.loads(result.stdout), requests, events, result.stderr


def test_simulated_shoppers_leave_their_searches_and_events_in_the_logs(
    champion_features: RegisteredChampion, serve_app, tmp_path: Path
) -> None:
    profile = tmp_path / "simulate.yaml"  # the fixture's data: its terms, its event log's users; flat out, 2 threads
    data = {"max_terms": 100, "event_users": USERS_IN_EVENT_LOG}
    profile.write_text(yaml.safe_dump({"data": data, "simulate": {"think_seconds": 0, "concurrency": 2}}))
    summary, requests, events, stderr = _simulate(serve_app, _home(champion_features, tmp_path / "a"), profile)
    assert "SIMULATED traffic" in stderr
    assert summary["simulated"] is True and summary["errors"] == {}, summary
    assert (summary["stopped"], summary["sessions"]) == ("sessions", 12)

    assert len(requests) == summary["searches"] >= 12
    assert all(r["endpoint"] == "search" and is_training_term(r["query"]) for r in requests)
    users = {r["user_id"] for r in requests}
    assert len(users) == 4 and users <= set(range(1, USERS_IN_EVENT_LOG + 1))
    assert any(r["personalized"] for r in requests)  # the users have online features

    sent = summary["events"]
    assert len(events) == summary["accepted"] == sum(sent.values()) > 0 and summary["duplicates"] == 0
    assert {t: sum(e["event_type"] == t for e in events) for t in sent} == sent
    answers = {r["request_id"]: r for r in requests}
    for e in events:
        answer = answers[e["request_id"]]  # every event names a logged answer of the same user
        assert e["user_id"] == answer["user_id"]
        assert e["position"] is not None and answer["product_ids"][e["position"]] == e["product_id"]

    # the same seed against a fresh service: the same searches per user, and for the same answers the same events
    again, requests_2, events_2, _ = _simulate(serve_app, _home(champion_features, tmp_path / "b"), profile)

    def searches(log: list[dict]) -> dict[int, list[tuple[str, list[int]]]]:
        by_user: dict[int, list[tuple[str, list[int]]]] = {}
        for r in log:  # the log's ts order is each user's own order (one user is played by one thread)
            by_user.setdefault(r["user_id"], []).append((r["query"], r["product_ids"]))
        return by_user

    def clicks(log: list[dict]) -> list[tuple[int, int, str]]:
        return sorted((e["user_id"], e["product_id"], e["event_type"]) for e in log)

    first, second = searches(requests), searches(requests_2)
    assert {u: [q for q, _ in s] for u, s in first.items()} == {u: [q for q, _ in s] for u, s in second.items()}
    if first == second:  # personalised scores move with the clock (recency weights): compare only equal answers
        assert clicks(events) == clicks(events_2) and again["events"] == sent

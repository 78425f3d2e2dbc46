"""judgments_path only reads regular files inside the landing folder: relative names resolve there, `..`, absolute
paths elsewhere and symlinks out are refused with a readable error, before anything is read or written."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from pipelines.config import DataConfig
from pipelines.data.dataset import HOMEDEPOT_FILE, JudgmentsPathError, landed_judgments, snapshot_data

CSV = "id,product_uid,product_title,search_term,relevance\n1,100001,angle bracket,angle bracket,3.0\n"


@pytest.fixture
def landing(tmp_path: Path) -> Path:
    """A landing folder with one judgments file, a sub-folder and a secret file beside it (outside)."""
    root = tmp_path / "landing"
    (root / "batch").mkdir(parents=True)
    (root / "judgments.csv").write_text(CSV)
    (root / "batch" / "more.csv").write_text(CSV)
    (tmp_path / "secret.csv").write_text("not for training\n")
    return root


def refused(path: str | Path, landing: Path, rule: str) -> str:
    with pytest.raises(JudgmentsPathError) as info:
        landed_judgments(path, landing)
    message = str(info.value)
    assert rule in message and str(landing) in message, message
    return message


def test_relative_names_resolve_under_the_landing_folder(landing: Path) -> None:
    assert landed_judgments("judgments.csv", landing) == landing / "judgments.csv"
    assert landed_judgments("batch/more.csv", landing) == landing / "batch" / "more.csv"
    assert landed_judgments(landing / "batch" / "more.csv", landing) == landing / "batch" / "more.csv"  # absolute


def test_dot_dot_is_refused_even_when_it_stays_inside(landing: Path) -> None:
    refused("../secret.csv", landing, "contains '..'")
    refused("batch/../judgments.csv", landing, "contains '..'")
    refused(str(landing / ".." / "secret.csv"), landing, "contains '..'")


def test_an_absolute_path_elsewhere_is_refused(landing: Path) -> None:
    refused(landing.parent / "secret.csv", landing, "resolves outside")
    refused(HOMEDEPOT_FILE, landing, "resolves outside")  # a real, readable file: still not landed


def test_a_symlink_out_of_the_landing_folder_is_refused(landing: Path) -> None:
    (landing / "link.csv").symlink_to(landing.parent / "secret.csv")
    (landing / "linked_dir").symlink_to(landing.parent, target_is_directory=True)
    refused("link.csv", landing, "resolves outside")
    refused("linked_dir/secret.csv", landing, "resolves outside")


def test_a_symlink_within_the_landing_folder_reads_its_target(landing: Path) -> None:
    (landing / "latest.csv").symlink_to(landing / "batch" / "more.csv")
    assert landed_judgments("latest.csv", landing) == landing / "batch" / "more.csv"
    # a landing folder that is itself a symlink (a mounted volume) is resolved before the comparison
    alias = landing.parent / "landing-alias"
    alias.symlink_to(landing, target_is_directory=True)
    assert landed_judgments("judgments.csv", alias) == landing / "judgments.csv"


def test_non_files_and_missing_files_are_refused(landing: Path) -> None:
    refused("batch", landing, "not a regular file")
    os.mkfifo(landing / "pipe.csv")  # reading it would block the task forever
    refused("pipe.csv", landing, "not a regular file")
    refused("missing.csv", landing, "no such file")
    (landing / "dangling.csv").symlink_to(landing / "gone.csv")
    refused("dangling.csv", landing, "no such file")
    refused("", landing, "is empty")


def test_a_hostile_path_is_not_echoed_whole(landing: Path) -> None:
    message = refused("../" + "<script>" * 2000, landing, "contains '..'")
    assert len(message) < 500


def test_snapshot_refuses_before_reading_or_writing(landing: Path, tmp_path: Path) -> None:
    out = tmp_path / "snapshot"
    with pytest.raises(JudgmentsPathError, match="resolves outside"):
        snapshot_data(DataConfig(judgments_path=str(tmp_path / "secret.csv")), out, datetime(2026, 1, 1, tzinfo=UTC))
    assert not out.exists()


def test_snapshot_reads_a_landed_file(landing: Path, tmp_path: Path) -> None:
    rows = pd.read_csv(HOMEDEPOT_FILE, encoding="latin-1", nrows=40)
    rows.to_csv(landing / "small.csv", index=False)
    cfg = DataConfig(judgments_path="small.csv", max_offers=200, event_users=10)
    snap = snapshot_data(cfg, tmp_path / "snapshot", datetime(2026, 1, 1, tzinfo=UTC), landing=landing)
    assert len(snap.table("judgments_train")) + len(snap.table("judgments_heldout")) == 40


def test_snapshot_checks_against_the_configured_landing_folder(
    landing: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # no `landing` argument: the step's call path, Paths.from_env().landing (SHOPGUIDE_LANDING)
    monkeypatch.setenv("SHOPGUIDE_LANDING", str(tmp_path / "elsewhere"))
    with pytest.raises(JudgmentsPathError, match="no such file"):
        snapshot_data(DataConfig(judgments_path="judgments.csv"), tmp_path / "s", datetime(2026, 1, 1, tzinfo=UTC))


def test_cli_refuses_a_path_outside_the_landing_folder_before_airflow(tmp_path: Path) -> None:
    from pipelines.cli import app

    result = CliRunner().invoke(app, ["retrain", "--profile", "tiny", "--judgments", "../secret.csv"])
    assert result.exit_code == 2, result.output
    assert "contains '..'" in result.output and "--judgments" in result.output

"""`--help` documents every option, with the defaults that options compute at run time."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from mvpp.cli.bank import app as bank_app
from mvpp.cli.main import app as main_app


@pytest.mark.parametrize(
    ("app", "command", "expected"),
    [
        (main_app, "train", ["[default: all]", "[default: all labels of", "--lexicon", "--beta-nll"]),
        (main_app, "score", ["[default: those the run was"]),
        (bank_app, "build", ["[default: title]", "[default: beside the bank]"]),
    ],
)
def test_help_shows_computed_defaults(app, command: str, expected: list[str]) -> None:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.output.replace("│", " ").split())
    for piece in expected:
        assert piece in text, piece

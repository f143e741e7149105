"""`--help` documents every option, with the defaults that options compute at run time."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from mvpp.cli.bank import app as bank_app
from mvpp.cli.main import app as main_app


@pytest.mark.parametrize(
    ("app", "command", "expected"),
    [
        (main_app, "train", ["[default: all]", "[default: every label of", "--config", "--set", "--ablate",
                             "word-prior", "lexical-retrieval"]),
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


def test_train_defaults_come_from_the_dataclasses() -> None:
    """Options that set a TrainConfig field have no default of their own (None: the
    dataclass's, or the config file's, applies) and show the dataclass's in --help."""
    from dataclasses import fields

    import typer

    from mvpp.predictor.training import TrainConfig

    command = typer.main.get_command(main_app).commands["train"]
    names = {f.name for f in fields(TrainConfig)}
    aliases = {"target": "targets", "meta_col": "meta_cols"}
    checked = 0
    for param in command.params:
        field = aliases.get(param.name, param.name)
        if field in names:
            assert param.default is None, f"--{param.name} repeats a default: {param.default!r}"
            checked += 1
    assert checked >= 8
    text = " ".join(CliRunner().invoke(main_app, ["train", "--help"], env={"COLUMNS": "200"}).output.replace("│", " ").split())
    for name in ("k", "seed"):
        assert f"[default: {getattr(TrainConfig(), name)}]" in text
    assert "[default: fitted to the data" in text


def _words(text: str) -> set[str]:
    return set(text.replace("`", "").replace("│", " ").split())


@pytest.mark.parametrize("app", [main_app, bank_app], ids=["mvpp", "mvpp-bank"])
def test_help_shows_every_word_of_the_help_texts(app) -> None:
    """Help texts reach the terminal whole: bracketed words (`[train]`) are not taken for
    markup, and a command's summary in the command list is one sentence, not the
    docstring's line breaks."""
    import inspect

    import typer

    group = typer.main.get_command(app)
    listing = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    for name, command in group.commands.items():
        summary = " ".join(inspect.cleandoc(command.help or "").split("\n\n")[0].split())
        assert summary.replace("`", "") in " ".join(listing.replace("`", "").replace("│", " ").split()), name
        shown = _words(CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "200"}).output)
        for param in command.params:
            missing = _words(getattr(param, "help", None) or "") - shown
            assert not missing, f"{name} --{param.name}: {sorted(missing)}"

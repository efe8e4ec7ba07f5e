"""`aquila <verb> --help` shows the defaults of every verb's options."""

from __future__ import annotations

import argparse
import re

import pytest

from aquila.cli import COMMANDS, main


def help_of(verb: str, monkeypatch, capsys) -> tuple[str, argparse.ArgumentParser]:
    """The --help text of `verb` and the parser that printed it."""
    parsers = []
    original = argparse.ArgumentParser.parse_known_args

    def recording(self, *args, **kwargs):
        parsers.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", recording)
    with pytest.raises(SystemExit) as done:
        main([verb, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out, parsers[0]


@pytest.mark.parametrize("verb", sorted(COMMANDS))
def test_every_option_with_a_default_shows_it(verb, monkeypatch, capsys):
    text, parser = help_of(verb, monkeypatch, capsys)
    flat = " ".join(text.split())
    with_defaults = [
        a for a in parser._actions
        if a.option_strings and a.help != argparse.SUPPRESS and a.nargs != 0
        and a.default not in (None, argparse.SUPPRESS) and a.default is not False
    ]  # fmt: skip
    for action in with_defaults:  # each entry as --help prints it
        entry = " ".join(parser._get_formatter()._format_action(action).split())
        assert "default" in entry, f"{verb} {action.option_strings[0]}: {entry!r}"
    if with_defaults:
        assert "(default: " in flat, text


def test_examples_of_shown_defaults(monkeypatch, capsys):
    flat = {verb: " ".join(help_of(verb, monkeypatch, capsys)[0].split()) for verb in ("eval", "serve", "pretrain")}
    assert "few-shot examples per prompt (default: 5)" in flat["eval"]
    assert "--port PORT (default: 7860)" in flat["serve"]  # an option without help text still shows its default
    assert re.search(r"--lr V \(default: [0-9.e-]+\)", flat["pretrain"]), flat["pretrain"]
    assert "--help show this help message and exit" in flat["eval"]  # no "(default: ...)" on flags

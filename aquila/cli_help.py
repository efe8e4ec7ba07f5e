"""`--help` of every verb: each option shows its default; descriptions keep their line breaks."""

from __future__ import annotations

import argparse
import copy


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to an option's help unless the default is None/False or the help already states one.

    Options without help text get the default as their help (argparse shows no default without help text).
    """

    def _format_action(self, action: argparse.Action) -> str:
        if action.option_strings and not action.help and _shows_default(action):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not _shows_default(action) or "default" in text.lower():
            return text
        return super()._get_help_string(action)


def _shows_default(action: argparse.Action) -> bool:
    default = action.default
    return default is not None and default is not False and default != argparse.SUPPRESS and action.nargs != 0

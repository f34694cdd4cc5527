"""The root ``typer`` app, in a leaf module: each command module adds itself to it, and the
package ``__init__`` (which imports the command modules) adds the root options and ``main``.
Were it defined in ``__init__``, every command module would import its own importer."""

from __future__ import annotations

import shlex
import sys

import typer

app = typer.Typer(
    name="selfconsist",
    help="Make a VAE's encoder consistent with its own decoder (AVAE self-consistency, post hoc). "
    "Add --debug anywhere to see tracebacks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

#: Flags of the root command that ``main`` also accepts after the command name.
GLOBAL_FLAGS = ("--debug", "--quiet", "-q", "--verbose", "-v")

#: The arguments ``main`` was given, without the global flags (set by ``main``; None when a
#: command runs some other way, e.g. typer's test runner).
INVOKED: list[str] | None = None


def command_line() -> str:
    """``selfconsist ARGS`` as the user typed it, for the record a run keeps of itself (the
    checkpoint's ``selfconsist.command``, the model card): the global flags (--debug, -q, -v,
    which change what is printed, not what runs) are left out wherever they stood, so the line
    reruns the same job."""
    args = INVOKED if INVOKED is not None else [a for a in sys.argv[1:] if a not in GLOBAL_FLAGS]
    return "selfconsist " + shlex.join(args)

"""The root ``typer`` app, in a leaf module: each command module adds itself to it, and the
package ``__init__`` (which imports the command modules) adds the root options and ``main``.
Were it defined in ``__init__``, every command module would import its own importer."""

from __future__ import annotations

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

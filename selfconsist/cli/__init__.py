"""The ``selfconsist`` command line: one module per command, errors as one red line.

Results go to stdout, progress and errors to stderr. A :class:`SelfconsistError`
(bad input the user can fix) exits with code 2 and no traceback; ``--debug``
anywhere on the command line shows the traceback instead.
"""

from __future__ import annotations

import sys

import typer

from ..errors import NonFiniteLossError, SelfconsistError

app = typer.Typer(
    name="selfconsist",
    help="Make a VAE's encoder consistent with its own decoder (AVAE self-consistency, post hoc). "
    "Add --debug anywhere to see tracebacks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"selfconsist {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """selfconsist: AVAE self-consistency for pretrained VAEs."""


def _register() -> None:
    # Each command lives in its own module and adds itself to ``app``.
    from . import eval, info, push, train, tune  # noqa: F401


def print_error(message: str) -> None:
    """One red line on stderr."""
    from rich.console import Console
    from rich.markup import escape

    line = " ".join(str(message).split())
    Console(stderr=True, soft_wrap=True).print(f"[bold red]Error:[/bold red] {escape(line)}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:  # accept --debug anywhere, hand it to the root callback
        argv = ["--debug"] + [a for a in argv if a != "--debug"]
    _register()
    try:
        app(args=argv, prog_name="selfconsist")
    except NonFiniteLossError as e:
        if debug:
            raise
        print_error(str(e))
        sys.exit(3)
    except SelfconsistError as e:
        if debug:
            raise
        print_error(str(e))
        sys.exit(2)
    except KeyboardInterrupt:
        print_error("interrupted; resume with --resume where the command offers it")
        sys.exit(130)

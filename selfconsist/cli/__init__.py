"""The ``selfconsist`` command line: one module per command, errors as one red line.

Results go to stdout, progress and errors to stderr. A :class:`SelfconsistError`
(bad input the user can fix) and a usage error (an unknown option, a missing argument, a value
of the wrong type) exit with code 2 and no traceback; ``--debug``
anywhere on the command line shows the traceback instead. ``--quiet``/``-q`` and
``--verbose``/``-v`` set the level of the ``selfconsist`` logger and are accepted
anywhere too. A run stopped by SIGINT/SIGTERM exits with 130/143 after one line that
says how to resume.
"""

from __future__ import annotations

import logging
import shlex
import sys

import typer

from ..errors import Interrupted, NonFiniteLossError, SelfconsistError
from . import _app
from ._app import GLOBAL_FLAGS, app


def _print_version(value: bool) -> None:
    if value:
        from .._version import __version__

        typer.echo(f"selfconsist {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q",
                               help="Only warnings and errors: no progress bar or log lines."),
    verbose: bool = typer.Option(False, "--verbose", "-v",
                                 help="Also debug lines (state saves, measurement details)."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """selfconsist: AVAE self-consistency for pretrained VAEs.

    Progress goes to stderr through the `selfconsist` logger: a bar on a terminal, plain
    lines (step, loss terms, it/s, ETA) in a log file. --quiet and --verbose work on every
    command, before or after its name.
    """
    from ..runtime import setup_logging

    setup_logging(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)


def _register() -> None:
    # Each command lives in its own module and adds itself to ``app``.
    from . import eval, info, push, train, tune  # noqa: F401


def print_error(message: str) -> None:
    """One red line on stderr."""
    from rich.console import Console
    from rich.markup import escape

    line = " ".join(str(message).split())
    Console(stderr=True, soft_wrap=True).print(f"[bold red]Error:[/bold red] {escape(line)}")


def resume_command(argv: list[str]) -> str:
    """The command line that resumes this run: the same one, with --resume."""
    args = [a for a in argv if a != "--debug"]
    if "--resume" not in args:
        args.append("--resume")
    return "selfconsist " + shlex.join(args)


def print_stopped(e: Interrupted, argv: list[str]) -> None:
    """One line on stderr: what stopped the run and the exact command that resumes it."""
    from rich.console import Console
    from rich.markup import escape

    hint = (f"resume with: {resume_command(argv)}" if e.step is not None
            else "run the same command again to start afresh")
    line = " ".join(f"{e}; {hint}".split())
    Console(stderr=True, soft_wrap=True).print(f"[bold yellow]Stopped:[/bold yellow] {escape(line)}")


def _click_error(e: BaseException) -> str | None:
    """What kind of click error ``e`` is: "help" (no arguments), "usage", "abort", "other" (any
    other click exception), or None for anything else. By class name, because typer from 0.2x
    raises the exceptions of its own copy of click, not ``click``'s."""
    names = {k.__name__ for k in type(e).__mro__}
    if "ClickException" not in names and "Abort" not in names:
        return None
    for name, kind in (("NoArgsIsHelpError", "help"), ("UsageError", "usage"), ("Abort", "abort")):
        if name in names:
            return kind
    return "other"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    # Accept the global flags anywhere (before an argument-only "--"), hand them to the root.
    cut = argv.index("--") if "--" in argv else len(argv)
    flags = [a for a in argv[:cut] if a in GLOBAL_FLAGS]
    _app.INVOKED = [a for a in argv[:cut] if a not in GLOBAL_FLAGS] + argv[cut:]
    argv = flags + _app.INVOKED
    _register()
    try:
        # standalone_mode=False: click raises its usage errors instead of printing them as a
        # boxed panel, so that they too are one line (below); --help and typer.Exit return a code.
        code = app(args=argv, prog_name="selfconsist", standalone_mode=False)
    except Interrupted as e:
        if debug:
            raise
        print_stopped(e, argv)
        sys.exit(e.exit_code)
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
    except Exception as e:
        kind = _click_error(e)
        if kind is None or debug:
            raise
        if kind == "help":
            pass  # `selfconsist` alone: typer's rich help printed it while raising; exit 2
        elif kind == "usage":  # an unknown option, a missing argument, a value of the wrong type
            ctx = getattr(e, "ctx", None)
            command = ctx.command_path if ctx is not None else "selfconsist"
            message = e.format_message().rstrip(".")  # type: ignore[attr-defined]
            print_error(f"{message}; see '{command} -h'")
        else:
            print_error("aborted" if kind == "abort" else e.format_message())  # type: ignore[attr-defined]
        sys.exit(getattr(e, "exit_code", 1))
    # Exit as click's standalone mode does, also on success: typer.Exit(code) returns its code.
    sys.exit(code if isinstance(code, int) else 0)

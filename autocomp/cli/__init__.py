"""``autocomp`` command line: one module per command group, choices read from the registries (samplers,
metrics, techniques' clip modes, seeds, backends; see :mod:`autocomp.search.config`). Heavy imports (torch,
optuna, transformers) happen inside commands, so ``--help`` answers at once."""

from __future__ import annotations

import sys

import click

from autocomp.cli import deploy, hardware, models, search, studies  # noqa: F401 - register the commands
from autocomp.cli.common import cli
from autocomp.errors import AutocompError

__all__ = ["cli", "main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors print one line and exit 2; Ctrl-C exits 130 after saving."""
    try:
        cli.main(args=argv, standalone_mode=False)
    except AutocompError as e:
        click.echo(f"error: {e}", err=True)
        return 2
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        click.echo("interrupted: finished trials are saved; run the same command again to resume", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())

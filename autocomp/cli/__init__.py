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


_KEPT = {  # what an interrupted command leaves behind
    "search": "finished trials are saved; run the same command again to resume",
    "train": "the last checkpoint (every --checkpoint-every steps) is kept at --out; run the same command again "
             "to resume",
    "export": "nothing was written (the file is written whole or not at all)",
    "plan": "nothing was written",
    "report": "nothing was written (files are written whole or not at all)",
    "hardware": "nothing was recorded",
    None: "nothing was changed",
}


def _command(argv: list[str] | None) -> str | None:
    args = sys.argv[1:] if argv is None else argv
    return next((a for a in args if not a.startswith("-")), None)


def _database_failed(e: BaseException) -> str | None:
    """One line for a study database that failed under a running command (a server restarted or gone, a
    connection dropped: SQLAlchemy's or a driver's OperationalError / InterfaceError, after the storage's own
    retries), or None for any other error."""
    seen = e
    while seen is not None:
        names = {c.__name__ for c in type(seen).__mro__}
        if type(seen).__module__.split(".")[0] in ("sqlalchemy", "psycopg", "psycopg2", "pymysql", "sqlite3") and \
                names & {"OperationalError", "InterfaceError"}:
            from autocomp.search.study import mask_url

            first = (str(seen).strip().splitlines() or [type(seen).__name__])[0]
            return f"the study's database failed ({mask_url(first)[:200]}); check the server or file"
        seen = seen.__cause__ or seen.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors print one line and exit 2; Ctrl-C exits 130 after saving."""
    try:
        cli.main(args=argv, standalone_mode=False)
    except AutocompError as e:
        click.echo(f"error: {e}", err=True)
        return 2
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        click.echo(f"interrupted: {_KEPT.get(_command(argv), _KEPT[None])}", err=True)
        return 130
    except click.UsageError as e:  # bad flags or values: one line, like every other user error
        cmd = _command(argv)
        hint = f"; see autocomp {cmd} --help" if cmd and e.ctx is not None and e.ctx.info_name == cmd else \
            "; see autocomp --help"
        click.echo(f"error: {e.format_message().rstrip('.')}{hint}", err=True)
        return 2
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except Exception as e:  # a study database that failed mid-command: one line, and what was kept
        line = _database_failed(e)
        if line is None:
            raise
        click.echo(f"error: {line}; {_KEPT.get(_command(argv), _KEPT[None])}", err=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

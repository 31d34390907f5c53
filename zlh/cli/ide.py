"""`zlh ide NAME`: the browser IDE's address and how to log in; `zlh ide rotate NAME`."""

from __future__ import annotations

from typing import Any

import typer

ROTATE = "rotate"


def ide(
    target: str = typer.Argument(..., metavar="NAME | rotate",
                                 help="Server name, or `rotate` followed by the name."),
    name: str | None = typer.Argument(None, metavar="[NAME]", show_default=False,
                                      help="With `rotate`: the server whose password to "
                                           "replace."),
    local: bool = typer.Option(False, "--local",
                               help="A URL that works from this machine (local provider)."),
    show_password: bool = typer.Option(False, "--show-password",
                                       help="Print the password itself."),
    json_output: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Show where a dev container's IDE is and how to log in.

    `zlh ide rotate NAME` replaces the IDE password and restarts code-server.
    """
    from zlh import ide as core
    from zlh import render
    from zlh.cli import want_json
    from zlh.errors import UsageError

    as_json = want_json(json_output)
    if target == ROTATE and name is not None:
        render.emit(core.rotate(name), as_json, _rotated)
        return
    if name is not None:
        raise UsageError(f"unexpected argument {name!r}: `zlh ide NAME` or "
                         "`zlh ide rotate NAME`")
    render.emit(core.ide_access(target, local, show_password), as_json, _access)


def _access(access: Any) -> Any:
    from rich.text import Text

    state = "ready" if access.ready else access.state
    lines = [
        f"{access.name}: code-server is {state}, running as {access.user or 'unknown'}",
        f"  open:      {access.url}",
    ]
    if access.password is not None:
        lines.append(f"  password:  {access.password}")
    else:
        lines.append(f"  password:  in {access.password_file} (mode 0600); "
                     "--show-password prints it")
    return Text("\n".join(lines))


def _rotated(result: Any) -> Any:
    from rich.text import Text

    state = "ready" if result.ready else result.state
    return Text(f"{result.name}: IDE password replaced in {result.password_file}; "
                f"code-server restarted (pid {result.pid}, {state})")


def register(app: typer.Typer) -> None:
    app.command("ide")(ide)

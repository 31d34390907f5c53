"""`zlh ssh NAME [-- COMMAND]`, `zlh ssh trust HOST[:PORT]` and `zlh ssh-config`.

`trust` is taken as the subcommand word: a server called `trust` is reached with
`zlh ssh --server trust`. `trust` fetches the key the way `zlh ssh` connects: through the
bastion when one is configured, unless HOST is the bastion itself or `--direct` is given.
"""

from __future__ import annotations

import sys
from typing import Any

import typer

TRUST = "trust"


def ssh(
    target: str = typer.Argument(None, help="Server name, or `trust` HOST[:PORT]."),
    command: list[str] = typer.Argument(None, help="Command to run (after --)."),
    user: str = typer.Option(None, "--user", "-u", help="Login user (default: ssh.user)."),
    server: str = typer.Option(None, "--server", help="Server name (when it is `trust`)."),
    expect: str = typer.Option(None, "--expect", help="trust: the SHA256 fingerprint wanted."),
    replace: bool = typer.Option(False, "--replace", help="trust: swap a recorded key."),
    direct: bool = typer.Option(False, "--direct",
                                help="trust: connect to HOST directly, not via the bastion."),
) -> None:
    """Open a shell on a server (or run COMMAND; its exit code is ours), via the bastion."""
    from zlh import opconfig
    from zlh import ssh as core

    config = opconfig.load().ssh
    if server is None and target == TRUST:
        if not command or len(command) != 1:
            raise typer.BadParameter("zlh ssh trust HOST[:PORT]")
        result = core.trust(core.parse_hop(command[0], user=config.user), config,
                            expect, replace, direct)
        _show_trusted(result)
        return
    name = server or target
    if not name:
        raise typer.BadParameter("name a server")
    hop = core.server_hop(name, config, user)
    with core.session(hop, config, core.is_direct(name)) as conn:
        if command:
            status = core.run(conn, " ".join(command), sys.stdout.buffer, sys.stderr.buffer)
        else:
            status = core.interactive(conn)
    raise typer.Exit(status)


def _show_trusted(result: Any) -> None:
    verb = "already trusted" if result.already else "trusted"
    sys.stdout.write(f"{result.host} {result.key_type} {result.fingerprint}\n"
                     f"{verb}; recorded in {result.known_hosts}\n")


def ssh_config(
    name: str = typer.Argument(None, help="Server name."),
    all_servers: bool = typer.Option(False, "--all", help="Every server with an address."),
    user: str = typer.Option(None, "--user", "-u", help="Login user (default: ssh.user)."),
) -> None:
    """Print an OpenSSH config snippet for `ssh -F FILE zlh-NAME`."""
    from zlh import opconfig
    from zlh import ssh as core

    config = opconfig.load().ssh
    if all_servers:
        targets = core.all_server_hops(config, user)
    elif name:
        targets = [(name, core.server_hop(name, config, user))]
    else:
        raise typer.BadParameter("name a server, or pass --all")
    direct = frozenset(name for name, _ in targets if core.is_direct(name))
    sys.stdout.write(core.ssh_config_text(targets, config, direct))


def register(app: typer.Typer) -> None:
    app.command("ssh")(ssh)
    app.command("ssh-config")(ssh_config)

"""Render `--help` of every clipfail command as Markdown (cog runs this for docs/cli.md)."""

from __future__ import annotations

import click
from click.testing import CliRunner

Command = tuple[tuple[str, ...], click.Command]


def commands(group: click.Group | None = None, prefix: tuple[str, ...] = ()) -> list[Command]:
    """The clipfail group and every command under it, depth first, in the order `--help` lists them."""
    if group is None:
        from cli import cli as group
    out: list[Command] = [] if prefix else [((), group)]
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        out.append((prefix + (name,), cmd))
        if isinstance(cmd, click.Group):
            out.extend(commands(cmd, prefix + (name,)))
    return out


def render() -> str:
    from cli import cli

    runner = CliRunner()
    parts = []
    for path, _cmd in commands():
        title = " ".join(("clipfail",) + path)
        result = runner.invoke(cli, [*path, "--help"], terminal_width=100, prog_name="clipfail")
        if result.exit_code != 0:
            raise RuntimeError(f"{title} --help failed: {result.output}")
        level = "##" if len(path) <= 1 else "###"
        parts.append(f"{level} {title}\n\n```\n{result.output.rstrip()}\n```\n")
    return "\n" + "\n".join(parts)

"""The README documents every command and option of the CLI: a new one fails this test until
it is described. Commands and options come from click itself, not from parsing `--help`. Its
exit-code table is ``errors.ExitCode``."""

from __future__ import annotations

import re
from collections.abc import Iterator

import click
import pytest
from conftest import REPO

from audience_sync.cli import cli
from audience_sync.errors import SEVERITY, ExitCode

README = (REPO / "README.md").read_text(encoding="utf-8")


def commands(
    group: click.Group, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    """Every command under ``group`` with its documented path (``("history", "prune")``,
    ``("history", "RUN_ID")``), groups included."""
    yield path, group
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None
        if isinstance(command, click.Group):
            yield from commands(command, (*path, name))
        elif command.hidden:  # reached by its arguments: `history show 5` is `history 5`
            arguments = [
                p.human_readable_name for p in command.params if isinstance(p, click.Argument)
            ]
            yield (*path, *arguments), command
        else:
            yield (*path, name), command


ALL = list(commands(cli))


def option_names(command: click.Command) -> list[str]:
    return [
        name
        for param in command.params
        if isinstance(param, click.Option)
        for name in param.opts
        if name.startswith("--") and name != "--help"
    ]


@pytest.mark.parametrize(
    ("path", "command"),
    [(p, c) for p, c in ALL if p and not c.hidden],
    ids=lambda v: " ".join(v) if isinstance(v, tuple) else "",
)
def test_every_command_is_in_the_readme(path: tuple[str, ...], command: click.Command) -> None:
    assert f"audience-sync {' '.join(path)}" in README


@pytest.mark.parametrize(
    ("path", "option"),
    [(p, o) for p, c in ALL for o in option_names(c)],
    ids=lambda v: " ".join(v) if isinstance(v, tuple) else v,
)
def test_every_option_is_in_the_readme_next_to_its_command(
    path: tuple[str, ...], option: str
) -> None:
    # On one line with `audience-sync <command>`: `--force` of `run` does not document `init`'s.
    command = " ".join(("audience-sync", *path))
    lines = [line for line in README.splitlines() if command in line and option in line]
    assert lines, f"`{command} {option}` is not documented in README.md"


def test_the_walk_finds_the_commands() -> None:
    found = {" ".join(p) for p, _ in ALL}
    assert {"run", "check", "init", "history prune", "history RUN_ID", "db upgrade"} <= found


def readme_section(title: str) -> str:
    """The README's text under the heading ``title`` up to the next heading of any level."""
    start = README.index(f"\n{title}\n") + len(title) + 2
    end = README.find("\n#", start)
    return README[start:] if end < 0 else README[start:end]


def test_the_exit_code_table_is_the_one_in_errors() -> None:
    section = readme_section("### Exit codes")
    documented = {
        int(code)
        for line in section.splitlines()
        if line.startswith("| ") and line[2].isdigit()
        for code in line.split("|")[1].split(",")
    }
    assert documented == set(ExitCode)
    assert click.UsageError.exit_code == ExitCode.USAGE  # click's code for bad usage is ours
    # "the most severe code wins (3 > 7 > ...)" lists SEVERITY, most severe first
    (order,) = re.findall(r"the most severe code wins \(([\d >]+)\)", section)
    assert [int(c) for c in order.split(" > ")] == list(reversed(SEVERITY[1:]))

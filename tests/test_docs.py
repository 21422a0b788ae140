"""Every `labtune` command shown in README.md and docs/ is one the CLI takes: its command path
answers --help, a concrete example parses (options and arguments valid) without running, and the
recipe files it names exist."""

from __future__ import annotations

import re
import shlex

import pytest
from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PREFIX = re.compile(r"^(?:\$\s+)?(?:\.venv/bin/)?labtune\s")


def shown_commands() -> list[tuple[str, str]]:
    """(page, command line) for each labtune command in a code block or an inline code span."""
    found = []
    for page in PAGES:
        text = page.read_text()
        in_block, pending = False, ""
        for line in text.splitlines():
            if line.lstrip().startswith("```"):
                in_block, pending = not in_block, ""
                continue
            if in_block:
                line = pending + line.strip()
                if line.endswith("\\"):
                    pending = line[:-1] + " "
                    continue
                pending = ""
                if PREFIX.match(line):
                    found.append((page.name, line))
            else:
                found += [(page.name, span) for span in re.findall(r"`([^`]+)`", line) if PREFIX.match(span)]
    return found


COMMANDS = shown_commands()


def test_the_pages_show_many_commands():
    assert len(COMMANDS) > 40 and {page for page, _ in COMMANDS} >= {"README.md", "cli.md", "training.md"}


def words_of(line: str) -> list[str]:
    line = re.sub(r"\s#\s.*$", "", line)  # a shell comment after the command
    words = shlex.split(line, comments=False)
    return words[1:] if words[0] != "$" else words[2:]


@pytest.mark.parametrize("page,line", COMMANDS, ids=[f"{p}:{i}" for i, (p, _) in enumerate(COMMANDS)])
def test_a_shown_command_is_one_the_cli_takes(page, line):
    import typer

    from labtune.cli import app

    root = typer.main.get_command(app)
    words = words_of(line)
    if words[0] in ("--version", "--help", "-h"):
        return
    synopsis = any(mark in line for mark in ("[", "...", "|", "KEY", "RECIPE ", "SOURCE OUT"))
    # walk down the command path (`stack up`, `server start`)
    command, path, rest = root, [], list(words)
    while hasattr(command, "commands") and rest and rest[0] in command.commands:
        path.append(rest[0])
        command = command.commands[rest.pop(0)]
    assert path, f"{page}: {line!r}: not a labtune command"
    if hasattr(command, "commands") and rest and "|" in rest[0]:  # `stack up|down|status`: each of them
        assert set(rest[0].split("|")) <= set(command.commands), f"{page}: {line!r}"
        return
    if rest and rest[0] in ("-h", "--help"):
        return
    context = root.context_class  # typer's own click
    with context(root, info_name="labtune") as parent:
        help_text = command.get_help(context(command, info_name=" ".join(path), parent=parent))
    assert "Example:" in help_text or hasattr(command, "commands")
    if synopsis or not rest:  # a synopsis, or a command named in passing
        return
    # a concrete example: every option and argument parses (nothing runs)
    with context(root, info_name="labtune") as parent:
        command.make_context(" ".join(path), list(rest), parent=parent)
    for word in rest:
        value = word.split("=", 1)[1] if "=" in word and not word.startswith("-") else word
        if value.endswith((".yaml", ".yml")) and "~" not in value and "/" in value:
            assert (REPO / value).is_file(), f"{page}: {line!r}: recipe {value} not found"

"""Documentation cannot drift: docs/cli.md is cog's output of every `--help`, and every command
and option is documented (as sqlite-utils' docs test does for its CLI reference)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from helpers import import_tool

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS))

from cli_help import commands  # noqa: E402

ALL = commands()
IDS = [" ".join(path) or "clipfail" for path, _ in ALL]


def section(path: tuple[str, ...]) -> str:
    """The part of docs/cli.md under this command's heading."""
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    title = " ".join(("clipfail",) + path)
    match = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ clipfail|\Z)", text, re.M | re.S)
    assert match, f"docs/cli.md has no section for `{title}`: run cog -r -I docs docs/cli.md"
    return match.group(1)


def test_cli_reference_is_what_cog_generates():
    import_tool("cogapp", "pip install -e '.[dev]'")
    done = subprocess.run(
        [sys.executable, "-m", "cogapp", "--check", "-I", str(DOCS), str(DOCS / "cli.md")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, f"docs/cli.md is out of date: run cog -r -I docs docs/cli.md\n{done.stderr}"


@pytest.mark.parametrize("path,cmd", ALL, ids=IDS)
def test_every_command_and_option_is_documented(path, cmd):
    assert (cmd.help or "").strip(), f"{IDS[ALL.index((path, cmd))]} has no help text"
    text = section(path)
    for param in cmd.params:
        if isinstance(param, click.Option):
            assert param.help and param.help.strip(), f"option {param.opts[0]} of {path} has no help text"
            for opt in param.opts:
                assert opt in text, f"{opt} of {path} is missing from docs/cli.md"
        else:
            assert param.human_readable_name.upper() in text or param.name.upper() in text


def test_examples_are_not_rewrapped():
    # click re-wraps paragraphs; an example needs a \b line before it to keep one command per line
    for path, cmd in ALL:
        for para in (cmd.help or "").split("\n\n"):
            lines = [line.strip() for line in para.strip().splitlines()]
            if any(line.startswith(("clipfail ", "Example:", "Examples:")) for line in lines):
                assert lines[0] == "\b", f"clipfail {' '.join(path)}: put \\b before the example paragraph"


def test_commands_are_in_stage_order_in_help_and_in_source():
    import inspect

    from cli import STAGE_ORDER, cli

    names = cli.list_commands(click.Context(cli))
    staged = [n for n in names if n in STAGE_ORDER]
    assert staged == [n for n in STAGE_ORDER if n in cli.commands] and names[: len(staged)] == staged
    lines = [inspect.getsourcelines(cli.commands[n].callback)[1] for n in staged]
    assert lines == sorted(lines), "cli.py defines the commands out of stage order"


def test_model_options_are_declared_once():
    # the same option means the same thing, with the same help, in every command that has it
    helps: dict[str, set[str]] = {}
    users = set()
    for path, cmd in ALL:
        for param in cmd.params:
            if isinstance(param, click.Option) and param.name in ("model", "pretrained", "checkpoint", "device"):
                helps.setdefault(param.name, set()).add(param.help)
                users.add(path)
    assert {("embed",), ("evaluate",), ("improve",), ("run",)} <= users
    assert all(len(texts) == 1 for texts in helps.values()), helps


def test_ci_runs_the_readmes_test_command_with_the_same_extras():
    """What a newcomer runs is what CI checks: README's test command appears in .ci/run word for word, and it
    installs the extras that CI installs (the Ray tests run for a newcomer too)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"Run the tests:\s*```bash\n(.+?)\n```", readme, re.S)
    assert block, "README.md has no 'Run the tests:' bash block"
    command = block.group(1).strip()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert command in ci.splitlines(), f".ci/run does not run README's test command {command!r}"
    assert "-e '.[dev,ray]'" in command and "python -m pytest -q" in command
    assert "'label-studio==1.23.2' 'sentry-sdk<3'" in ci  # tests/test_labelstudio_live.py's server

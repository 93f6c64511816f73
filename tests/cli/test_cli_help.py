"""Every option and positional of every ``nnunet-ssl`` command has a help text, and every ``--help`` renders."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nnunet_ssl.cli import build_parser, main


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {name: sub for action in actions for name, sub in action.choices.items()}


def _command_helps() -> dict[str, str]:
    """Each subcommand's one-line help, as ``nnunet-ssl --help`` lists it."""
    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return {choice.dest: choice.help or "" for choice in action._choices_actions}


COMMANDS = list(_subcommands(build_parser()))


def _undocumented(parser: argparse.ArgumentParser) -> list[str]:
    """Options and positionals of ``parser`` without a help text (argparse's own -h aside)."""
    missing = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
            missing.append("/".join(action.option_strings) or action.dest)
    return missing


def test_the_walker_finds_an_option_without_help() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--documented", help="says what it does")
    parser.add_argument("--bare")
    parser.add_argument("--blank", help=" ")
    parser.add_argument("source")
    assert _undocumented(parser) == ["--bare", "--blank", "source"]


def test_the_commands_are_found() -> None:
    assert {"pretrain", "export", "convert", "make-phantoms", "plan", "split", "experiment"} <= set(COMMANDS)


def test_every_option_and_positional_has_help() -> None:
    parser = build_parser()
    missing = [f"nnunet-ssl {name}" for name in _undocumented(parser)]
    for command, sub in _subcommands(parser).items():
        missing += [f"nnunet-ssl {command} {name}" for name in _undocumented(sub)]
    assert not missing, "options without help text:\n" + "\n".join(missing)


def test_every_command_has_a_one_line_help() -> None:
    helps = _command_helps()
    assert list(helps) == COMMANDS
    assert not [name for name, text in helps.items() if not text.strip()]


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_renders(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``nnunet-ssl COMMAND --help`` exits 0 and shows every option (a stray % in a help text fails here)."""
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: nnunet-ssl {command}")
    sub = _subcommands(build_parser())[command]
    for action in sub._actions:
        if action.option_strings:
            shown = action.option_strings[-1]
        elif action.choices is not None:
            shown = "{" + ",".join(action.choices) + "}"
        else:
            shown = action.metavar or action.dest
        assert shown in text, f"{command} --help does not show {shown}"


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for name, help_text in _command_helps().items():
        assert name in text
        assert help_text.replace("%%", "%").split()[0] in text


def test_installed_command_renders_help() -> None:
    """The console script itself (not only ``main``) prints the pretrain help with its documented defaults."""
    script = shutil.which("nnunet-ssl", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "nnunet_ssl.cli"]
    result = subprocess.run([*command, "pretrain", "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "--warmup-epochs" in result.stdout and "default 30" in result.stdout

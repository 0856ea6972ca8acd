"""The two commands' command line as a person meets it: help on stdout, every argument explained with its
default, errors naming the flag that was given."""

import re
import subprocess
import sys

import pytest

from extensions.llava import __main__ as command_line
from extensions.llava import cli_ask
from extensions.llava.converter import convert
from testbed.real_host import ROOT


def help_of(main, capsys, *argv) -> str:
    with pytest.raises(SystemExit) as stopped:
        main([*argv, "--help"])
    assert stopped.value.code == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out


def test_the_top_level_help_goes_to_stdout_and_exits_0():
    done = subprocess.run([sys.executable, "-m", "extensions.llava", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.startswith("usage: python -m extensions.llava {ask,convert}") and "convert" in done.stdout


def test_no_command_is_a_usage_error_on_stderr(capsys):
    assert command_line.main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("usage: ")


@pytest.mark.parametrize("main,flags", [
    (cli_ask.main, ("question", "--image", "--model", "--pipeline", "--device", "--embed-all", "--max-new-tokens")),
    (convert.main, ("src", "dst", "--pipeline")),
])
def test_every_argument_has_help_and_shows_its_default(main, flags, capsys):
    text = help_of(main, capsys)
    flat = " ".join(text.split())
    for flag in flags:
        assert f" {flag}" in text, (flag, text)
    assert "(default: auto)" in flat  # --pipeline, in both commands
    if main is cli_ask.main:
        for default in ("(default: cpu)", "(default: 64)", "(default: False)"):
            assert default in flat, (default, text)
        # a long path may be wrapped at a hyphen
        assert f"(default:{cli_ask.DEMO_MODEL})".replace(" ", "") in "".join(text.split()), text
    # an argument listed on its own line must have its explanation on the next one
    lines = text.splitlines()
    for number, line in enumerate(lines):
        if re.match(r"^  \S", line) and not re.search(r"\S\s{2,}\S", line.strip()):
            assert number + 1 < len(lines) and lines[number + 1].startswith(" " * 10), (line, text)


def test_a_subcommand_help_names_the_command_as_it_was_called(capsys):
    with pytest.raises(SystemExit) as stopped:
        command_line.main(["convert", "--help"])
    assert stopped.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {command_line.PROG} convert")


def test_an_unknown_device_names_the_flag(capsys):
    assert cli_ask.main(["--image", "examples/red-circle.png", "--device", "cuda:7", "Which?"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --device is 'cuda:7'") and "llava-" not in error

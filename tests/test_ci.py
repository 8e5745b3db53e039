"""CI runs exactly what the README tells a newcomer to run for the tests."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    set_up = ROOT.joinpath("README.md").read_text().split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", set_up, flags=re.DOTALL)


def test_readme_has_two_set_up_commands_one_line_each():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    assert all("\n" not in command for command in commands)
    assert commands[0].endswith("python train.py")
    assert commands[1].endswith("python -m pytest")


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = [line.strip() for line in ROOT.joinpath(".ci", "run").read_text().splitlines()]
    assert _readme_commands()[1] in ci_lines


def test_both_commands_install_the_same_data_package():
    train_command, test_command = _readme_commands()
    assert "dataset-fashion-mnist" in train_command and "dataset-fashion-mnist" in test_command

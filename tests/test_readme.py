"""README.md opens with the two commands a newcomer runs; CI runs exactly the test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    match = re.match(r"# sdmerge\n\n```bash\n(.*?)\n```", text, re.S)
    assert match, "README.md must open with a bash block right under the title"
    commands = [line.split("  #")[0].strip() for line in match.group(1).splitlines() if line.strip()]
    assert len(commands) == 2, commands
    return commands


def test_ci_runs_the_readme_test_command():
    _, test_command = readme_commands()
    assert "pytest" in test_command
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_ci_installs_what_the_readme_installs_in_the_same_order():
    main_command, _ = readme_commands()
    installs = [part.strip().removeprefix("pip install ") for part in main_command.split("&&") if "pip install" in part]
    assert len(installs) >= 2
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    positions = [ci_lines.index(f"python -m pip install --quiet {arguments}") for arguments in installs]
    assert positions == sorted(positions)


def test_main_command_installs_then_runs_an_existing_script():
    main_command, _ = readme_commands()
    assert main_command.startswith("pip install torch==2.13.0")
    script = re.search(r"python (scripts/\S+\.py)", main_command).group(1)
    assert (ROOT / script).is_file()

import subprocess
import sys

from interleaf.cli import main


def test_help_lists_commands(capsys):
    assert main([]) == 2
    assert "interleaf" in capsys.readouterr().out


def test_unknown_command_exits_nonzero():
    proc = subprocess.run(
        [sys.executable, "-m", "interleaf.cli", "no-such-command"], capture_output=True, text=True
    )
    assert proc.returncode != 0

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


def _run_into_closed_pipe(args: list[str]) -> subprocess.CompletedProcess:
    """Run ``args`` with a stdout whose reader has gone, as in ``interleaf ... | head -1``."""
    import os

    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run(args, stdout=w, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(w)


def test_a_closed_stdout_ends_quietly():
    # 'interleaf corpus config | head -1' printed 'error: BrokenPipeError: [Errno 32] Broken pipe'
    # and exited 1; the mono_checkpoint entry printed a traceback
    for args in (["interleaf.cli", "corpus", "config"], ["interleaf.corpus.cli", "corpus", "config"]):
        proc = _run_into_closed_pipe([sys.executable, "-m", *args])
        assert (proc.returncode, proc.stderr) == (141, "")


def test_a_broken_pipe_that_is_not_stdout_is_still_an_error():
    # a BrokenPipeError from a socket or a worker's pipe is a failure, not a closed output
    code = (
        "import sys; from interleaf.cli import run_handler\n"
        "def handler():\n    raise BrokenPipeError(32, 'Broken pipe')\n"
        "sys.exit(run_handler(handler))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stderr) == (1, "error: BrokenPipeError: [Errno 32] Broken pipe\n")

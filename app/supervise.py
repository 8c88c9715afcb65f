"""`maria extract` from the command line runs its Ray driver in a child process, and this one waits for it.

Why: when the driver's local raylet dies (its node lost, or killed), Ray's C++ core worker ends the driver process
itself (status 1, after Ray's own log dump): no Python handler runs, so the driver cannot say what happened. The
parent can. It also passes a SIGTERM sent to it alone (a scheduler stopping the job) on to the child, which handles
it as an interruption. The child tells the parent it exited through Python by writing to a pipe at exit; a child that
dies without doing so gets the one line here, with the exit code of a transient failure (a re-run resumes).
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys

CHILD = "MARIA_SUPERVISED_FD"  # set in the child's environment: the pipe it reports its exit on
EXIT_TRANSIENT = 75  # sysexits' EX_TEMPFAIL: a failure of the infrastructure; re-running the same command resumes


def in_child() -> bool:
    """True in the supervised child: it reports a Python exit to its parent (and never supervises again)."""
    fd = os.environ.pop(CHILD, None)
    if fd is None:
        return False
    os.set_inheritable(int(fd), False)  # Ray's own processes must not hold it
    atexit.register(os.write, int(fd), b"exited")  # not reached when Ray's core ends the process with _Exit
    return True


def supervise(verb: str, argv: list[str]) -> int:
    """Run `maria <verb> <argv>` as a child; its exit code, or one line and EXIT_TRANSIENT if Ray's core ended it."""
    read_end, write_end = os.pipe()
    env = {**os.environ, CHILD: str(write_end)}
    proc = subprocess.Popen([sys.executable, "-m", "maria_app.cli", verb, *argv], env=env, pass_fds=(write_end,))
    os.close(write_end)
    # Ctrl-C reaches the child from the terminal (one process group) and the child reports it; a SIGTERM sent to
    # this process alone is passed on to it
    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, lambda *_: None),
        signal.SIGTERM: signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM)),
    }
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    os.set_blocking(read_end, False)  # whatever still holds the write end, the answer is there once the child is gone
    try:
        reported = os.read(read_end, 16)
    except BlockingIOError:
        reported = b""
    os.close(read_end)
    if reported:
        return code
    why = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code} from inside Ray"
    print(
        f"maria {verb}: error: the job's Ray driver ended abruptly ({why}): its Ray node (raylet) was lost or "
        f"killed; re-run the same command to resume (committed blocks are kept)",
        file=sys.stderr,
    )
    return EXIT_TRANSIENT

"""Stand-ins for reproduce's worker process (imported by the spawned child, so kept light)."""

import os
import signal


def finish_or_die(conn, config: dict, path: str, resume: bool, threads) -> None:
    """Reports the run finished without training, except the run whose folder ends in "-die":
    its process is killed, as the kernel's out-of-memory killer would."""
    if path.endswith("-die"):
        os.kill(os.getpid(), signal.SIGKILL)
    conn.send(("finished", "trained"))
    conn.close()


def finish_or_be_interrupted(conn, config: dict, path: str, resume: bool, threads) -> None:
    """Reports the run finished, except the run whose folder ends in "-ctrl-c": it reports what a
    run's worker sends after Ctrl-C in its seventh step."""
    if path.endswith("-ctrl-c"):
        conn.send(("interrupted", "interrupted at step 7; progress saved. Continue with: cifarlab train ..."))
    else:
        conn.send(("finished", "trained"))
    conn.close()


def analyse_hang_or_die(conn, out: str, name: str, tsne_points: int, parent: int) -> None:
    """Stands in for reproduce's analysis worker, set up as the real one is: the run named "...-die"
    is killed; "...-hang" (or $CIFARLAB_TEST_HANG) starts a process of its own, writes both pids to OUT/NAME.pids and never
    ends; others report one log line."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    from cifarlab.reproduce import become_analysis_process

    become_analysis_process(parent)
    if name.endswith("-die"):
        os.kill(os.getpid(), signal.SIGKILL)
    if name.endswith("-fail"):
        conn.send(([f"  {name} analysis failed: out of memory"], "analysis failed: out of memory"))
        return
    if name.endswith("-hang") or name == os.environ.get("CIFARLAB_TEST_HANG"):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        pids = Path(out) / f"{name}.pids"
        pids.with_suffix(".tmp").write_text(f"{os.getpid()} {child.pid}")
        pids.with_suffix(".tmp").rename(pids)
        time.sleep(600)
    conn.send(([f"  {name} analysed"], None))
    conn.close()


def analyse_says_if_sigint_was_blocked(conn, out: str, name: str, tsne_points: int, parent: int) -> None:
    """Stands in for reproduce's analysis worker: reports whether it began with SIGINT blocked."""
    blocked = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    conn.send(([f"{name} began with SIGINT blocked: {blocked}"], None))
    conn.close()

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


def analyse_hang_or_die(conn, out: str, name: str, tsne_points: int) -> None:
    """Stands in for reproduce's analysis worker: the run named "...-die" is killed; "...-hang"
    never ends (and ignores Ctrl-C, as the real one does); others report one log line."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if name.endswith("-die"):
        os.kill(os.getpid(), signal.SIGKILL)
    if name.endswith("-hang"):
        signal.pause()
    conn.send(([f"  {name} analysed"], None))
    conn.close()

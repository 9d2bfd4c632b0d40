"""Ctrl-C and SIGTERM, which a run's training and `cifarlab reproduce` take over for a while:
one way to take a signal over and give it back, and what the training tells the handlers
around it (kept free of torch, so that reproduce's handler can read it anywhere)."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

# whether the latest training of this process was asked to stop (Ctrl-C, SIGTERM): a handler that
# gets SIGTERM back after it (reproduce's) must not begin a second stop while the first is reported
training_stop_asked = False


@contextlib.contextmanager
def taking_over(signum: int, handler) -> Iterator[bool]:
    """`handler` for `signum` while the block runs, then the handler found before it; yields
    whether it took over. Not outside the main thread (Python cannot), nor where the signal is
    ignored: a process started so (nohup, a job a script put in the background) keeps it ignored,
    as Python itself does."""
    previous = signal.getsignal(signum)
    if threading.current_thread() is not threading.main_thread() or previous is signal.SIG_IGN:
        yield False
        return
    signal.signal(signum, handler)
    try:
        yield True
    finally:
        signal.signal(signum, signal.SIG_DFL if previous is None else previous)  # None: not set from Python

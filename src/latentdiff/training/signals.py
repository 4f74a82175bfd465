"""SIGINT/SIGTERM during training: finish the current step, save a checkpoint, stop."""

from __future__ import annotations

import contextlib
import signal


class StopFlag:
    requested = False


@contextlib.contextmanager
def stop_requests():
    """A flag set by SIGINT/SIGTERM while the block runs; the caller's handlers are restored after it.

    The loop polls the flag between steps instead of being interrupted mid-step, so a checkpoint is
    never written from a half-updated model. Outside the main thread signals cannot be caught: the
    flag then simply stays down.
    """
    flag = StopFlag()

    def on_signal(signum, frame):
        flag.requested = True

    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not in the main thread
            pass
    try:
        yield flag
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)

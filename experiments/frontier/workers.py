"""The job's worker processes end with it, however it is stopped.

`--workers N` runs the job's runs in N spawned processes (`concurrent.futures.ProcessPoolExecutor`). Nothing in
Python ties their lives to the main process's: killed (SIGKILL, an out-of-memory kill, SIGTERM, which Python does not
catch), it leaves them training as orphans until their runs end; interrupted (SIGINT), it waits in the pool's
shutdown for their runs to end. So:

* each worker watches its parent (`watch_parent`, from the pool's initializer): a daemon thread that ends the worker
  as soon as its parent process id changes, i.e. the parent is gone and the worker was re-parented. It polls, twice
  a second, because that works on every platform (Linux's `PR_SET_PDEATHSIG` also fires when the thread that started
  the worker ends, which a pool does not promise not to do);
* the main process, leaving the pool on an exception (KeyboardInterrupt included), terminates its workers
  (`terminate_workers`) instead of waiting for their runs.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time

__all__ = ["POLL_SECONDS", "terminate_workers", "watch_parent"]

#: How often a worker checks that its parent is alive.
POLL_SECONDS = 0.5


def watch_parent(parent_pid: int, poll_seconds: float = POLL_SECONDS) -> threading.Thread:
    """In a worker process: end this process (exit status 1, no clean-up: its parent, who would read the results,
    is gone) once `parent_pid` is no longer its parent. Returns the watching daemon thread."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_seconds)
        os._exit(1)

    thread = threading.Thread(target=watch, name="watch-parent", daemon=True)
    thread.start()
    return thread


def terminate_workers() -> None:
    """In the main process: send SIGTERM to every live child process that `multiprocessing` started (the pool's
    workers), so that an interrupted job does not wait for their runs to end."""
    for child in multiprocessing.active_children():
        child.terminate()

"""Watching the threads a model starts during the audit.

A ``TorchDispatchMode`` is thread-local: ops a model runs on a worker thread (a threaded
ensemble, ``nn.parallel.parallel_apply``) would pass unseen. While the audit runs,
``watch_threads`` makes every ``threading.Thread`` started from then on run under a mode that
hands its ops to the same tracker (their findings say which thread). Threads started before the
audit (a pool made earlier) cannot be entered; what they compute reaches the audited path as a
tensor the audit never saw made, which is a finding of its own ("unseen_origin"). The class
attribute is restored in a ``finally``.
"""
from __future__ import annotations

import contextlib
import threading

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _Forward(TorchDispatchMode):
    """The tracker's dispatch handler, entered on another thread."""

    def __init__(self, tracker):
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.tracker.__torch_dispatch__(func, types, args, kwargs)


@contextlib.contextmanager
def watch_threads(tracker):
    """Run every thread started inside the block under ``tracker`` (and ``torch.no_grad``)."""
    original = threading.Thread.run

    def run(thread: threading.Thread) -> None:
        with torch.no_grad(), _Forward(tracker):
            original(thread)

    threading.Thread.run = run
    try:
        yield
    finally:
        threading.Thread.run = original

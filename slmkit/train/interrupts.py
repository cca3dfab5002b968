"""Interrupts (Ctrl-C, SIGTERM from a scheduler) that stop training only at a step boundary.

A step updates the weights (`optimizer.step()`) and then the counters (step, tokens seen). A signal that
lands between the two and unwinds at once leaves updated weights with the old step number; the state
saved on the way out would then replay that step on resume and silently diverge from an uninterrupted
run. So while a step runs, the first SIGINT/SIGTERM only records that a stop was asked for; the loop
checks after the step, saves a consistent state and raises `TrainingInterrupted`. Outside a step (eval,
saving, hooks) a signal interrupts at once, since the state is consistent there. A second signal during the
same step gives up on the step: it raises at once and the loop keeps the last saved state instead of
writing a torn one (a step that hangs, e.g. a stuck collective, must still be stoppable).

Under `torchrun` every rank receives the signal, but not necessarily in the same step: the stop request is
all-reduced at each boundary so all ranks stop after the same step (otherwise one rank would wait forever
in the next step's gradient all-reduce).
"""

from __future__ import annotations

import contextlib
import signal
import threading

import torch

from .distributed import DistInfo, all_reduce_mean


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by a signal at a step boundary, after saving its state (a KeyboardInterrupt, so
    callers that handle Ctrl-C handle it)."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"{signal.Signals(signum).name} at step {step}")
        self.signum, self.step = signum, step


class StepBoundaryInterrupts:
    """Installs SIGINT/SIGTERM handlers for the duration of a `with` block (main thread only: Python
    delivers signals there, and `signal.signal` refuses other threads; elsewhere it does nothing)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, on_deferred=None):
        self.pending: int | None = None  # the signal that asked for a stop, once one did
        self.in_step = False
        self.torn = False  # an exception left a step half done: its state must not be saved
        self.on_deferred = on_deferred  # called once, with the signal number, when a stop is deferred
        self._previous: dict[int, object] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.in_step and self.pending is None:
            self.pending = signum
            if self.on_deferred is not None:
                self.on_deferred(signum)
            return
        raise KeyboardInterrupt(signal.Signals(signum).name)

    @contextlib.contextmanager
    def step(self):
        """Wraps one training step; a step left by an exception is marked torn."""
        self.in_step = True
        try:
            yield
        except BaseException:
            self.torn = True
            raise
        finally:
            self.in_step = False

    def stop_requested(self, dist: DistInfo, device: torch.device) -> int | None:
        """The signal that asked for a stop, on any rank (all ranks agree), or None."""
        if not dist.enabled:
            return self.pending
        asked = torch.tensor([float(self.pending or 0)], device=device)
        asked = all_reduce_mean((asked > 0).float(), dist)  # > 0 on every rank when any rank was asked
        if asked.item() > 0:
            return self.pending or signal.SIGTERM  # ranks not signalled themselves stop as if told to
        return None

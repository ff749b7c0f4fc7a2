"""SIGTERM, what Slurm sends before it preempts, cancels or times out a job: the trainer finishes
the optimiser step under way, saves last.pt and stops with `Preempted`; dsp-train then exits with
status 143 (128 + SIGTERM) so the job can be requeued and continued with trainer.resume=true.

DSP_TEST_SIGNAL_AFTER_STEP=<step>:<SIGNAL> (e.g. 11:SIGKILL) makes the trainer send itself that
signal right after optimiser step <step> of the run: tests use it to kill or preempt a real
training process at an exact point.
"""
from __future__ import annotations

import os
import signal

EXIT_CODE = 143


class Preempted(Exception):
    """Training stopped on SIGTERM after writing a checkpoint to resume from."""


class StopRequest:
    """While active, SIGTERM sets `requested` (checked at safe points) instead of ending the process."""

    def __init__(self):
        self.requested, self._installed, self._previous = False, False, None
        self._stop_now = None  # set by stop_at_once: the message SIGTERM then stops with

    def stop_at_once(self, message: str) -> None:
        """From here on nothing is left to save (the final evaluation): SIGTERM stops at once with
        Preempted(message) instead of waiting for a safe point that will not come."""
        self._stop_now = message
        if self.requested:
            raise Preempted(message)

    def __enter__(self) -> StopRequest:
        self.requested, self._stop_now = False, None
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        except ValueError:  # not the main thread (e.g. train() called from a worker thread)
            pass
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        if self._stop_now is not None:
            raise Preempted(self._stop_now)

    def __exit__(self, *exc) -> None:
        if self._installed:  # give back the previous handler (e.g. submitit's); None: one set outside Python
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)


def after_step(step: int) -> None:
    """The test hook (see the module docstring); a no-op unless DSP_TEST_SIGNAL_AFTER_STEP is set."""
    spec = os.environ.get("DSP_TEST_SIGNAL_AFTER_STEP")
    if spec and step == int(spec.split(":")[0]):
        os.kill(os.getpid(), signal.Signals[spec.split(":")[1]])

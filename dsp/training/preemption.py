"""Preemption: SIGTERM (what Slurm sends before it preempts, cancels or times out a job) and
SIGUSR2 (what submitit and `sbatch --signal=USR2@<s>` send ahead of the time limit; submitit's
SUBMITIT_PREEMPT_SIGNAL names another) make the trainer finish the optimiser step under way, save
last.pt and stop with `Preempted`. dsp-train then hands the signal to the handler that was there
before training (submitit's, which requeues the job with trainer.resume=true, see
dsp.cli.launchers), or exits with status 143 (128 + SIGTERM) so a requeued job continues from there.

DSP_TEST_SIGNAL_AFTER_STEP=<step>:<SIGNAL> (e.g. 11:SIGKILL) makes the trainer send itself that
signal right after optimiser step <step> of the run: tests use it to kill or preempt a real
training process at an exact point.
"""
from __future__ import annotations

import os
import signal

EXIT_CODE = 143


def preemption_signals() -> tuple[signal.Signals, ...]:
    """SIGTERM and the job scheduler's warning signal (SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL says)."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper()
    warning = getattr(signal.Signals, name if name.startswith("SIG") else f"SIG{name}", signal.SIGUSR2)
    return tuple(dict.fromkeys((signal.SIGTERM, warning)))


class Preempted(Exception):
    """Training stopped on a preemption signal after writing a checkpoint to resume from."""

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        self.signum = signum


class StopRequest:
    """While active, a preemption signal sets `requested` (checked at safe points) instead of ending
    the process; `signal_name` says which one came."""

    def __init__(self):
        self.requested, self.signum, self._previous = False, None, {}
        self._stop_now = None  # set by stop_at_once: the message a signal then stops with

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "SIGTERM"

    def stop_at_once(self, message: str) -> None:
        """From here on nothing is left to save (the final evaluation): a signal stops at once with
        Preempted(message) instead of waiting for a safe point that will not come."""
        self._stop_now = message
        if self.requested:
            raise Preempted(message, self.signum)

    def __enter__(self) -> StopRequest:
        self.requested, self.signum, self._stop_now, self._previous = False, None, None, {}
        for sig in preemption_signals():
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. train() called from a worker thread)
                break
        return self

    def _handle(self, signum, frame) -> None:
        self.requested, self.signum = True, self.signum or signum
        if self._stop_now is not None:
            raise Preempted(self._stop_now, signum)

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():  # give back the previous handlers (e.g. submitit's)
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)


def hand_on(signum: int | None) -> None:
    """After the checkpoint is saved: deliver the signal to the handler that was installed before
    training, when it is Python code (submitit's requeues the job and exits); return otherwise."""
    if signum is not None and callable(signal.getsignal(signum)):
        signal.raise_signal(signum)


def after_step(step: int) -> None:
    """The test hook (see the module docstring); a no-op unless DSP_TEST_SIGNAL_AFTER_STEP is set."""
    spec = os.environ.get("DSP_TEST_SIGNAL_AFTER_STEP")
    if spec and step == int(spec.split(":")[0]):
        os.kill(os.getpid(), signal.Signals[spec.split(":")[1]])

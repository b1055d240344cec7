"""The vCPU thread: a KVM_RUN loop, kicks, a request queue, halt-waiting and parking.

Every request submitted to a runner executes on its vCPU thread, at a point where no exit is
waiting for completion (right after KVM_RUN returned EINTR, or while halted or parked). That
keeps every vCPU ioctl on the vCPU's own thread and the guest state consistent.

Kicking (feasibility.md section 3): ``immediate_exit = 1`` first, so a thread between two
KVM_RUN calls cannot miss it, then ``pthread_kill(SIGUSR1)`` with a no-op Python handler
installed without SA_RESTART, so that a KVM_RUN in progress returns EINTR.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from enum import Enum
from typing import Any, TypeVar

from vmce.kvm.vcpu import Vcpu

T = TypeVar("T")
KICK_SIGNAL = signal.SIGUSR1


class ExitAction(Enum):
    """What the exit handler wants the loop to do next."""

    CONTINUE = "continue"
    HALT = "halt"
    STOP = "stop"


class RunnerState(Enum):
    """Where a vCPU thread is."""

    NEW = "new"
    RUNNING = "running"
    HALTED = "halted"
    PARKED = "parked"
    STOPPED = "stopped"


def _no_op(signum: int, frame: object) -> None:
    """The kick handler: its only job is to make KVM_RUN return EINTR."""


def install_kick_handler() -> None:
    """Install the no-op SIGUSR1 handler (main thread only; keeps an existing Python handler)."""
    current = signal.getsignal(KICK_SIGNAL)
    if callable(current):
        return
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("the vCPU kick handler must first be installed from the main thread")
    signal.signal(KICK_SIGNAL, _no_op)


class _Request:
    def __init__(self, fn: Callable[[Vcpu], Any]) -> None:
        self.fn = fn
        self.future: Future[Any] = Future()


ExitHandler = Callable[[Vcpu], ExitAction]
ErrorHandler = Callable[[Vcpu, BaseException], None]


class VcpuRunner:
    """Runs one :class:`Vcpu` in its own thread.

    ``handle_exit`` is called on the vCPU thread after every KVM_RUN that returned an exit;
    ``on_error`` when anything raises in the loop (the thread then ends, the process does not).
    """

    def __init__(self, vcpu: Vcpu, handle_exit: ExitHandler, on_error: ErrorHandler) -> None:
        self.vcpu = vcpu
        self._handle_exit = handle_exit
        self._on_error = on_error
        self._cond = threading.Condition()
        self._requests: deque[_Request] = deque()
        self._state = RunnerState.NEW
        self._kicked = False
        self._halted = False
        self._pause = False
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name=f"vcpu{vcpu.vcpu_id}", daemon=True)
        self.exits = 0
        self.eintr = 0
        self.eagain = 0

    @property
    def state(self) -> RunnerState:
        """The thread's current state."""
        return self._state

    @property
    def on_vcpu_thread(self) -> bool:
        """True when called from this runner's own thread."""
        return threading.current_thread() is self._thread

    def start(self) -> None:
        """Start the thread (once)."""
        install_kick_handler()
        self._thread.start()

    def submit(self, fn: Callable[[Vcpu], T]) -> Future[T]:
        """Queue ``fn(vcpu)`` to run on the vCPU thread; kicks the vCPU."""
        request = _Request(fn)
        with self._cond:
            if self._state is RunnerState.STOPPED or self._stopping:
                request.future.set_exception(RuntimeError(f"vCPU {self.vcpu.vcpu_id} stopped"))
                return request.future
            self._requests.append(request)
        self.kick()
        return request.future

    def kick(self) -> None:
        """Make the vCPU leave KVM_RUN (or its halt wait) soon and look at its queue."""
        with self._cond:
            self._kicked = True
            run = self.vcpu.run if self._state is not RunnerState.STOPPED else None
            if run is not None:
                run.immediate_exit = 1
            self._cond.notify_all()
            alive = self._thread.is_alive() and self._state is not RunnerState.STOPPED
            if alive and not self.on_vcpu_thread and self._thread.ident is not None:
                with contextlib.suppress(ProcessLookupError):
                    signal.pthread_kill(self._thread.ident, KICK_SIGNAL)

    def wake(self) -> None:
        """Leave the halted state (for requests that made the vCPU runnable again)."""
        self._halted = False

    def set_halted(self) -> None:
        """Enter the halted state as a HLT exit would: no KVM_RUN until a request wakes the
        vCPU (for a restored vCPU that was saved halted; see :mod:`vmce.kvm.persist`)."""
        self._halted = True

    @property
    def halted(self) -> bool:
        """True after a HLT exit until :meth:`wake` (only without an in-kernel irqchip)."""
        return self._halted

    def pause(self) -> None:
        """Ask the vCPU to park at its next safe point (see :meth:`wait_parked`)."""
        with self._cond:
            self._pause = True
        self.kick()

    def wait_parked(self, timeout: float | None = None) -> bool:
        """Wait until parked (or stopped, or never started); False on timeout."""
        settled = (RunnerState.PARKED, RunnerState.STOPPED, RunnerState.NEW)
        with self._cond:
            return self._cond.wait_for(lambda: self._state in settled, timeout)

    def wait_state(self, states: set[RunnerState], timeout: float | None = None) -> bool:
        """Wait until the thread is in one of ``states``; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._state in states, timeout)

    def resume(self) -> None:
        """Let a parked vCPU run again."""
        with self._cond:
            self._pause = False
            self._cond.notify_all()

    def stop(self) -> None:
        """Ask the thread to end at its next safe point."""
        with self._cond:
            self._stopping = True
        self.kick()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end; False on timeout. A never-started runner counts as ended."""
        if self._thread.ident is None:
            with self._cond:
                self._finish_locked()
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # --- the vCPU thread -----------------------------------------------------------------

    def _main(self) -> None:
        try:
            attention = True
            while True:
                # Lock-free fast path: kick() sets _kicked and immediate_exit together under
                # the lock, so a kick missed here still makes the next KVM_RUN return EINTR.
                if (attention or self._kicked or self._halted) and not self._service():
                    break
                attention = False
                if self._halted:
                    with self._cond:
                        self._state = RunnerState.HALTED
                        self._cond.notify_all()
                        self._cond.wait_for(lambda: self._kicked or self._stopping)
                    continue
                try:
                    self.vcpu.enter()
                except InterruptedError:  # EINTR: kicked (or a stray signal)
                    self.eintr += 1
                    attention = True
                    continue
                except BlockingIOError:  # EAGAIN: an AP woken by INIT/SIPI; just re-enter
                    self.eagain += 1
                    attention = True
                    continue
                self.exits += 1
                action = self._handle_exit(self.vcpu)
                if action is ExitAction.HALT:
                    self._halted = True
                elif action is ExitAction.STOP:
                    break
        except BaseException as exc:
            with contextlib.suppress(BaseException):
                self._on_error(self.vcpu, exc)
        finally:
            with self._cond:
                self._finish_locked()

    def _service(self) -> bool:
        """Run queued requests and park while paused; False when the thread must end."""
        while True:
            with self._cond:
                if self._stopping:
                    return False
                if self._requests:
                    batch = list(self._requests)
                    self._requests.clear()
                elif self._pause:
                    self._state = RunnerState.PARKED
                    self._cond.notify_all()
                    self._cond.wait_for(
                        lambda: bool(self._requests) or self._stopping or not self._pause
                    )
                    continue
                else:
                    self._kicked = False
                    self.vcpu.run.immediate_exit = 0
                    self._state = RunnerState.HALTED if self._halted else RunnerState.RUNNING
                    self._cond.notify_all()
                    return True
            for request in batch:
                if request.future.set_running_or_notify_cancel():
                    try:
                        request.future.set_result(request.fn(self.vcpu))
                    except BaseException as exc:
                        request.future.set_exception(exc)

    def _finish_locked(self) -> None:
        self._state = RunnerState.STOPPED
        while self._requests:
            request = self._requests.popleft()
            if request.future.set_running_or_notify_cancel():
                request.future.set_exception(RuntimeError(f"vCPU {self.vcpu.vcpu_id} stopped"))
        self._cond.notify_all()

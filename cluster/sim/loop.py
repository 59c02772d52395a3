"""The simulator's event loop: simulated time, a seeded RNG, processes that run programs.

Everything that happens in a simulated cluster is a callback on this loop's heap, ordered by
(time, sequence number): one thread, no wall clock, so a run is a pure function of its seed.
A :class:`Process` drives one program (``memkv.cluster.effects``): it sends the program the
result of its last effect, receives the next effect and hands it to its *actor* (the node,
rebalancer host or client it runs on), which performs it by scheduling the process's wake-up
(after a latency, a timeout, a change of the actor's view...). Killing a process (its actor
crashed) closes the program at its current ``yield``: nothing after it runs.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from typing import Any

from memkv.cluster.effects import Parallel, Program, Sleep, WaitView


class Loop:
    def __init__(self, seed: int) -> None:
        self.now = 0.0
        self.rng = random.Random(seed)
        self._heap: list[tuple[float, int, Callable[..., Any], tuple[Any, ...]]] = []
        self._seq = 0
        self.events = 0  # callbacks run (a measure of the work a schedule took)

    def clock(self) -> float:
        return self.now

    def call_at(self, t: float, fn: Callable[..., Any], *args: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (max(t, self.now), self._seq, fn, args))

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        self.call_at(self.now + delay, fn, *args)

    def run(self, until: float, stop: Callable[[], bool] | None = None, check_every: float = 0.0) -> bool:
        """Run callbacks up to time ``until``; True as soon as ``stop()`` holds (checked after
        callbacks, at most every ``check_every`` simulated seconds)."""
        heap = self._heap
        next_check = self.now
        while heap and heap[0][0] <= until:
            t, _, fn, args = heapq.heappop(heap)
            self.now = t
            self.events += 1
            fn(*args)
            if stop is not None and t >= next_check:
                next_check = t + check_every
                if stop():
                    return True
        self.now = max(self.now, until)
        return stop() if stop is not None else False


class Process:
    """One program running on an actor. ``token`` names the effect it waits on: a wake-up for
    another (an expired timeout after the reply came) is ignored."""

    __slots__ = ("actor", "name", "gen", "alive", "token", "children", "on_done")

    def __init__(self, actor: Actor, name: str, program: Program[Any],
                 on_done: Callable[[Any, BaseException | None], None] | None = None) -> None:
        self.actor = actor
        self.name = name
        self.gen = program
        self.alive = True
        self.token = 0
        self.children: list[Process] = []
        self.on_done = on_done

    def wake(self, token: int, value: Any = None, error: BaseException | None = None) -> None:
        if not self.alive or token != self.token:
            return
        self.token += 1
        try:
            eff = self.gen.throw(error) if error is not None else self.gen.send(value)
        except StopIteration as stop:
            self._finish(stop.value, None)
            return
        except Exception as exc:  # noqa: BLE001 - the program died of it: whoever waits on it hears
            self._finish(None, exc)
            return
        self.actor.perform(self, eff)

    def _finish(self, value: Any, error: BaseException | None) -> None:
        self.alive = False
        self.actor.processes.discard(self)
        if self.on_done is not None:
            self.on_done(value, error)

    def kill(self) -> None:
        if not self.alive:
            return
        self.alive = False
        for c in self.children:
            c.kill()
        try:
            self.gen.close()
        except Exception:  # noqa: BLE001, S110 - a program's cleanup failing on a crash changes nothing
            pass


class Actor:
    """Something that runs processes (a node, a client): performs the effects common to all
    actors -- sleeping, waiting on its view, running programs in parallel; subclasses add theirs."""

    def __init__(self, loop: Loop, name: str) -> None:
        self.loop = loop
        self.name = name
        self.processes: set[Process] = set()
        self.view: Any = None
        self.alive = False
        # told when a process with nobody waiting on it dies of an exception
        self.on_failure: Callable[[str, BaseException], None] | None = None

    def spawn(self, name: str, program: Program[Any],
              on_done: Callable[[Any, BaseException | None], None] | None = None) -> Process:
        if on_done is None:
            def on_done(value: Any, error: BaseException | None) -> None:
                if error is not None and self.on_failure is not None:
                    self.on_failure(name, error)

        p = Process(self, name, program, on_done)
        self.processes.add(p)
        self.loop.call_later(0.0, p.wake, 0, None, None)
        return p

    def kill_all(self) -> None:
        for p in sorted(self.processes, key=lambda p: p.name):
            p.kill()
        self.processes.clear()

    def halt(self) -> bool:
        """The actor's process dies: its programs stop where they are, its watch ends. False if
        it was not running."""
        if not self.alive:
            return False
        self.alive = False
        self.kill_all()
        self.view.close()
        return True

    def perform(self, proc: Process, eff: Any) -> None:
        tok = proc.token
        if isinstance(eff, Sleep):
            self.loop.call_later(max(0.0, eff.seconds), proc.wake, tok, None, None)
        elif isinstance(eff, WaitView):
            self.view.wait(eff.predicate, eff.timeout, lambda ok: proc.wake(tok, ok, None))
        elif isinstance(eff, Parallel):
            self._parallel(proc, tok, eff)
        else:
            self.perform_io(proc, tok, eff)

    def perform_io(self, proc: Process, tok: int, eff: Any) -> None:
        raise TypeError(f"{self.name} cannot perform {eff!r}")

    def _parallel(self, proc: Process, tok: int, eff: Parallel) -> None:
        n = len(eff.programs)
        results: list[Any] = [None] * n
        errors: list[BaseException] = []
        left = [n]

        def done(i: int, value: Any, error: BaseException | None) -> None:
            results[i] = value
            if error is not None:
                errors.append(error)
            left[0] -= 1
            if left[0] == 0:
                proc.children = []
                proc.wake(tok, results if not errors else None, errors[0] if errors else None)

        if n == 0:
            self.loop.call_later(0.0, proc.wake, tok, [], None)
            return
        proc.children = [self.spawn(f"{proc.name}/{i}", p, lambda v, e, i=i: done(i, v, e))
                         for i, p in enumerate(eff.programs)]

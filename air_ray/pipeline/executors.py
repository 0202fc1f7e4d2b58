"""Executors: what runs a chain of stages (``air_ray.pipeline.stages.Chain``) over its items.

    executor.start(cfg)                      # join or start what it runs on (nothing, or a Ray cluster)
    executor.nodes()                         # the resources it places workers on ({"CPU": n, "GPU": m} per node)
    for out in executor.run(chain, items):   # the last stage's results, as they come
        executor.live()                      # (rows, tokens) the pooled stages reported inside their items so far
    executor.stop()                          # give back what start took

``InProcess`` runs the stages in this process, one item after another (``setup`` once, ``teardown`` at the end);
``air_ray.pipeline.runner.RayData`` runs the same chain on Ray Data (a task per item, or an actor pool per stage).
Which one a run gets: ``placement.choose_executor`` (``air_ray.pipeline.runner.choose``).
"""

from __future__ import annotations

import abc
import os
import threading
from contextlib import ExitStack
from typing import Iterable, Iterator

from air_ray.pipeline.stages import Chain


def physical_cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class Executor(abc.ABC):
    name = ""

    def __init__(self):
        self.embedded = True  # the run has the machine to itself (placement counts this machine's CPUs)
        self.phases: dict[str, float] = {}  # what start took, for the manifest's phases

    def start(self, cfg) -> None:
        """Make ready to run ``cfg``'s chains (join or start a cluster)."""

    def stop(self) -> None:
        """Give back what ``start`` took."""

    @abc.abstractmethod
    def nodes(self) -> list[dict]:
        """The alive nodes' resources the run's workers are placed on."""

    @abc.abstractmethod
    def run(self, chain: Chain, items: Iterable) -> Iterator:
        """The results of ``chain``'s last stage over ``items``, in any order."""

    def live(self) -> tuple[int, int]:
        """(rows, tokens) the stages of the running chain reported with ``Stage.progress`` so far."""
        return (0, 0)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class InProcess(Executor):
    """The chain's stages in this process: each built and set up once, every item through all of them in turn."""

    name = "in-process"

    def __init__(self):
        super().__init__()
        self.counts = Counts()

    def nodes(self) -> list[dict]:
        return [{"CPU": physical_cpus(), "GPU": min(1, local_gpus())}]

    def live(self) -> tuple[int, int]:
        return self.counts.totals()

    def run(self, chain: Chain, items: Iterable) -> Iterator:
        with ExitStack() as stack:
            stages = []
            for link in chain.links:
                stage = link.build()
                stage.progress = self.counts.add
                stage.setup()
                stack.callback(stage.teardown)  # in reverse order, also when a stage fails
                stages.append(stage)

            def feed(i: int, item):
                if i == len(stages):
                    yield item
                    return
                out = stages[i].process(item)
                for x in (out if chain.links[i].fan_out else (out,)):
                    yield from feed(i + 1, x)

            for item in items:
                yield from feed(0, item)



class Counts:
    """Rows and tokens stages report inside their items (``Stage.progress``), added up (from any thread); the Ray
    executor keeps one in an actor its workers report to."""

    def __init__(self):
        self.rows = self.tokens = 0
        self._lock = threading.Lock()

    def add(self, rows: int, tokens: int) -> None:
        with self._lock:
            self.rows += rows
            self.tokens += tokens

    def totals(self) -> tuple[int, int]:
        with self._lock:
            return self.rows, self.tokens

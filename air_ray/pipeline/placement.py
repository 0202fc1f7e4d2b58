"""Where the scoring actors go and what they get, by default filling the machine. Plain Python: the runner hands
in the cluster's nodes; nothing here imports Ray.

    GPU cluster:    one actor per GPU (``--gpus-per-worker`` 1), 1 CPU each
    no GPU:         one actor per node, each with the node's CPUs less what the read/prepare stages need
                    (``LIGHT_STAGES_CPUS``); an embedded cluster gets that many logical CPUs more than the machine
                    has, for those light stages, so its one actor gets every core
    given options:  kept as given; the CPUs split evenly where only ``--workers`` is given

The scoring backend runs as many threads as its actor has CPUs (``BackendSpec.threads``).

Where the run goes (``--executor``, ``choose_executor``): a small corpus on one machine is scored in the driver's
process, by the same stages without Ray; everything else through Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

# a small corpus: the id pass runs in the driver (a Ray Data job of its own costs seconds of start-up), and, with
# --executor auto on a machine with no cluster to join, so does the scoring: Ray's start-up (~20 s on 2 cores:
# the cluster, worker processes, each importing torch and transformers again) would be a large share of the run
SMALL_CORPUS_BYTES = 16 << 20

# the logical CPUs the light stages need beside the actors: read and prepare take 0.25 each, and Ray Data's
# repartition (one chunk per block, so that chunks spread over the actors) takes a whole one; with less, the
# pipeline waits for a CPU the scoring actor holds (measured: it hangs)
LIGHT_STAGES_CPUS = 2.0


@dataclass(frozen=True)
class Placement:
    actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    why: str

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus_per_actor))


def embedded_cpus(physical: int, actors: int | None, cpus_per_actor: float | None) -> int:
    """Logical CPUs of an embedded cluster: the machine's, plus room for the light stages (more when the options
    ask for more than the machine has)."""
    asked = (actors or 1) * (cpus_per_actor or physical)
    return int(math.ceil(max(physical, asked) + LIGHT_STAGES_CPUS))


def plan(nodes: list[dict], *, actors: int | None, gpus_per_actor: float | None, cpus_per_actor: float | None,
         embedded: bool, physical_cpus: int) -> Placement:
    """``nodes``: the alive nodes' resources (``{"CPU": n, "GPU": m}``)."""
    cpu_nodes = [n for n in nodes if n.get("CPU", 0) > 0] or [{"CPU": 1}]
    total_gpus = sum(n.get("GPU", 0) for n in nodes)
    given = [name for name, v in (("--workers", actors), ("--gpus-per-worker", gpus_per_actor),
                                  ("--cpus-per-worker", cpus_per_actor)) if v is not None]
    if gpus_per_actor is None:
        gpus_per_actor = 1 if total_gpus > 0 else 0
    if gpus_per_actor > 0:
        if actors is None:
            actors = max(1, int(total_gpus // gpus_per_actor))
        cpus = cpus_per_actor if cpus_per_actor is not None else 1.0
        why = f"{total_gpus:g} GPUs: one actor per {gpus_per_actor:g} GPU"
    else:
        if embedded:  # one machine; the light stages have their own logical CPU
            per_node = physical_cpus
        else:  # a joined cluster: leave each node room for the light stages
            per_node = max(1.0, min(n["CPU"] for n in cpu_nodes) - LIGHT_STAGES_CPUS)
        if actors is None:
            actors = 1 if embedded else len(cpu_nodes)
        if cpus_per_actor is not None:
            cpus = cpus_per_actor
        else:
            per_actor_nodes = max(1, actors // (1 if embedded else len(cpu_nodes)))
            cpus = max(1.0, math.floor(per_node / per_actor_nodes))
        why = (f"no GPU; {per_node:g} CPUs per {'machine' if embedded else 'node'} for scoring, "
               f"{actors} actor{'s' * (actors != 1)}")
    if given:
        why += f"; {', '.join(given)} as given"
    return Placement(actors=int(actors), gpus_per_actor=float(gpus_per_actor), cpus_per_actor=float(cpus), why=why)


def choose_executor(executor: str, *, actors: int | None, backend: str, total_bytes: int, ray_named: str | None,
                    local_gpus: Callable[[], int]) -> tuple[str, str]:
    """``("ray" | "in-process", why)``. ``executor`` as given unless ``auto``; ``auto``: in-process for a corpus of at
    most ``SMALL_CORPUS_BYTES`` scored by one hf scorer when no Ray cluster was named (``ray_named``: why one was, e.g.
    "a Ray cluster to join", "--address local") and this machine has at most one GPU (``local_gpus()``, asked last);
    Ray for a named cluster, several actors or GPUs, a large corpus, vllm."""
    if executor != "auto":
        return executor, "--executor as given"
    if ray_named:
        return "ray", ray_named
    if (actors or 1) > 1:
        return "ray", "--workers above 1"
    if backend != "hf":
        return "ray", f"the {backend} backend"
    if total_bytes > SMALL_CORPUS_BYTES:
        return "ray", f"a corpus over {SMALL_CORPUS_BYTES >> 20} MB"
    if local_gpus() > 1:
        return "ray", "several GPUs"
    return "in-process", (f"a corpus under {SMALL_CORPUS_BYTES >> 20} MB on one machine with no Ray cluster to join; "
                          "--executor ray for Ray")

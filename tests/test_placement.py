"""Default placement of the scoring actors (air_ray.pipeline.placement): the whole machine without flags,
one actor per GPU on GPU clusters, flags kept as given. Pure function: no Ray."""

from air_ray.pipeline.placement import embedded_cpus, plan


def test_embedded_cpu_machine_gives_every_core_to_one_actor():
    p = plan([{"CPU": 3.0}], actors=None, gpus_per_actor=None, cpus_per_actor=None, embedded=True, physical_cpus=2)
    assert (p.actors, p.gpus_per_actor, p.cpus_per_actor, p.threads) == (1, 0, 2, 2)
    assert "no GPU" in p.why
    # the embedded cluster has logical CPUs beyond the machine's for the read/prepare stages
    assert embedded_cpus(2, None, None) == 4
    assert embedded_cpus(2, 2, 2) == 6  # options asking for more than the machine get it (logically)


def test_joined_cpu_cluster_one_actor_per_node():
    nodes = [{"CPU": 8.0}, {"CPU": 8.0}, {"CPU": 0.0}]  # a head with num-cpus 0
    p = plan(nodes, actors=None, gpus_per_actor=None, cpus_per_actor=None, embedded=False, physical_cpus=2)
    assert (p.actors, p.cpus_per_actor) == (2, 6)  # two CPUs per node left for the light stages


def test_gpu_cluster_one_actor_per_gpu():
    nodes = [{"CPU": 8.0}, {"CPU": 16.0, "GPU": 4.0}, {"CPU": 16.0, "GPU": 4.0}]
    p = plan(nodes, actors=None, gpus_per_actor=None, cpus_per_actor=None, embedded=False, physical_cpus=2)
    assert (p.actors, p.gpus_per_actor, p.cpus_per_actor) == (8, 1, 1)
    p = plan(nodes, actors=None, gpus_per_actor=2, cpus_per_actor=None, embedded=False, physical_cpus=2)
    assert (p.actors, p.gpus_per_actor) == (4, 2) and "--gpus-per-worker as given" in p.why


def test_flags_are_kept():
    p = plan([{"CPU": 3.0}], actors=2, gpus_per_actor=None, cpus_per_actor=None, embedded=True, physical_cpus=2)
    assert (p.actors, p.cpus_per_actor) == (2, 1)  # the machine split between the two
    p = plan([{"CPU": 5.0}], actors=2, gpus_per_actor=0, cpus_per_actor=2, embedded=True, physical_cpus=2)
    assert (p.actors, p.gpus_per_actor, p.cpus_per_actor) == (2, 0, 2)
    assert "--workers, --gpus-per-worker, --cpus-per-worker as given" in p.why


def test_executor_auto_in_process_only_for_a_small_single_scorer_run():
    from air_ray.pipeline.placement import SMALL_CORPUS_BYTES, choose_executor

    asked = []

    def gpus(n):
        return lambda: asked.append(n) or n

    small = dict(actors=None, backend="hf", total_bytes=1000, ray_named=None)
    assert choose_executor("auto", **small, local_gpus=gpus(0))[0] == "in-process"
    assert choose_executor("auto", **small, local_gpus=gpus(1))[0] == "in-process"  # one GPU: used in-process
    assert choose_executor("auto", **small, local_gpus=gpus(2)) == ("ray", "several GPUs")
    assert choose_executor("auto", **dict(small, ray_named="a Ray cluster to join"), local_gpus=gpus(0)) == \
        ("ray", "a Ray cluster to join")
    assert choose_executor("auto", **dict(small, actors=2), local_gpus=gpus(0))[0] == "ray"
    assert choose_executor("auto", **dict(small, actors=1), local_gpus=gpus(0))[0] == "in-process"
    assert choose_executor("auto", **dict(small, backend="vllm"), local_gpus=gpus(0))[0] == "ray"
    assert choose_executor("auto", **dict(small, total_bytes=SMALL_CORPUS_BYTES), local_gpus=gpus(0))[0] == "in-process"
    assert choose_executor("auto", **dict(small, total_bytes=SMALL_CORPUS_BYTES + 1), local_gpus=gpus(0))[0] == "ray"
    assert asked == [0, 1, 2, 0, 0]  # the GPUs are looked at last, only when everything else says in-process
    for given in ("ray", "in-process"):
        assert choose_executor(given, **dict(small, ray_named="--address local", actors=4), local_gpus=gpus(9)) == \
            (given, "--executor as given")

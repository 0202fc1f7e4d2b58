"""Start-up and steady-state costs of a scoring process: freed memory kept while a CPU model is open
(``air_ray.engine.heap``: no page faults for each batch's large blocks) and the tokenizer loaded once per thread
(``air_ray.models.load.load_tokenizer``)."""

from __future__ import annotations

import gc
import platform
import resource
import threading

import pytest

from air_ray.engine import heap

GLIBC = platform.libc_ver()[0] == "glibc"
BLOCK = 48 << 20  # over glibc's largest dynamic mmap threshold (32 MB): given back to the OS when freed by default


def faults_of_blocks(rounds: int = 6) -> int:
    """Minor page faults of allocating, touching and freeing a BLOCK-sized tensor ``rounds`` times."""
    import torch

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        t = torch.empty(BLOCK // 4, dtype=torch.float32)
        t.fill_(1.0)  # touch every page
        del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _reuse_scenario() -> None:
    """Run in a fresh interpreter (no other holder): the faults of BLOCK rounds before, while and after holding."""
    pages = BLOCK // resource.getpagesize()
    assert heap._holders == 0
    fresh = faults_of_blocks()
    assert fresh > 4 * pages, fresh  # each round's block came back as fresh pages
    assert heap.hold() is True
    try:
        faults_of_blocks(12)  # the heap grows to what the rounds need (a few blocks: alignment splits a freed one)
        kept = faults_of_blocks()
        assert kept < pages // 4, (fresh, kept)  # then the freed block is reused: (almost) no page faults
        assert heap.hold() is True  # nested holders: one setting, counted
        heap.release()
        assert heap._holders == 1 and faults_of_blocks() < pages // 4
    finally:
        heap.release()
    assert heap._holders == 0
    again = faults_of_blocks()
    assert again > pages, again  # the kept memory went back to the OS (malloc_trim): touching it faults again
    heap.release()  # one release too many: nothing happens
    assert heap._holders == 0
    print("ok", fresh, kept, again)


@pytest.mark.skipif(not GLIBC, reason="the setting is glibc's")
def test_held_heap_reuses_freed_blocks():
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run([sys.executable, "-c", "from tests.test_heap import _reuse_scenario; _reuse_scenario()"],
                         cwd=Path(__file__).parent.parent, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-2000:]


@pytest.mark.slow
def test_cpu_backend_holds_the_heap_while_open(tiny_model):
    from air_ray import Scorer

    model_dir, heads = tiny_model
    gc.collect()  # other tests' scorers dropped without close() let go now, not in the middle of this test
    before = heap._holders  # other tests' scorers may still be open in this process
    with Scorer(model=str(model_dir), heads=str(heads), dtype="float32", device="cpu") as s:
        assert s.backend.heap_held is GLIBC
        assert heap._holders == before + GLIBC
    assert heap._holders == before
    s = Scorer(model=str(model_dir), heads=str(heads), dtype="float32", device="cpu")
    assert heap._holders == before + GLIBC
    release = s.backend._release_heap
    del s
    gc.collect()
    # a scorer dropped without close() lets go when it is collected
    assert release is None or not release.alive
    assert heap._holders == before


def test_tokenizer_loaded_once_per_thread_and_files(tmp_path, smol_ref):
    import shutil

    from air_ray.models.load import load_tokenizer
    from air_ray.models.resolve import ModelRef

    for p in smol_ref.path.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors"):
            shutil.copy(p, tmp_path / p.name)
    ref = ModelRef(name="copy", path=tmp_path, fingerprint=smol_ref.fingerprint)
    tok = load_tokenizer(ref)
    assert load_tokenizer(ref) is tok  # the second stage of a run gets the same one
    other = []
    t = threading.Thread(target=lambda: other.append(load_tokenizer(ref)))
    t.start()
    t.join()
    assert other[0] is not tok  # another thread: its own (a fast tokenizer's truncation settings are state)
    assert other[0]("12 apples").input_ids == tok("12 apples").input_ids
    config = tmp_path / "tokenizer_config.json"
    config.write_text(config.read_text() + "\n")  # the tokenizer's files changed (mtime): loaded again
    assert load_tokenizer(ref) is not tok

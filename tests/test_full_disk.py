"""A full disk (issue #16, point 5): the output is a size-limited tmpfs that fills mid-run. The run ends with one
clear line naming the file it could not write, no half-written partition is visible, and a rerun with space
completes the run exactly once, equal to an uninterrupted run. Real Ray, a tiny real model, a real filesystem
limit (a tmpfs mount: needs root, as on this project's machines and CI)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.test_reliability import _assert_same_scores, _cli, _read_dir

pytestmark = pytest.mark.slow

ROWS, PER_PARTITION = 48, 4


def _mount(path: Path, size: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {p.stderr.strip()}")


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@pytest.fixture
def mounts(tmp_path):
    made = []

    def mount(name: str, size: int) -> Path:
        path = tmp_path / name
        _mount(path, size)
        made.append(path)
        return path

    yield mount
    for path in made:
        _umount(path)


def test_a_full_output_ends_with_one_line_and_a_rerun_completes(tiny_model, gsm8k_rows, tmp_path, mounts):
    model, heads = tiny_model
    corpus = tmp_path / "rows.jsonl"
    corpus.write_text("".join(json.dumps(dict(gsm8k_rows[i], id=f"r{i}")) + "\n" for i in range(ROWS)))

    def score(out: Path):
        return _cli("score", "--model", model, "--heads", heads, "--input", corpus, "--output", out,
                    "--dtype", "float32", "--device", "cpu", "--address", "local", "--workers", 1,
                    "--cpus-per-worker", 1, "--rows-per-partition", PER_PARTITION)

    # the uninterrupted run, on a roomy tmpfs: what the whole output takes there
    roomy = mounts("roomy", 64 << 20)
    p = score(roomy / "out")
    assert p.returncode == 0, p.stderr[-3000:]
    need = _used(roomy)
    units = ROWS // PER_PARTITION
    assert len(list((roomy / "out" / "_commits").glob("*.json"))) == units

    # half of that: the disk fills mid-run
    small = mounts("small", max(need // 2 // 4096, 1) * 4096)
    out = small / "out"
    p = score(out)
    log = p.stdout + p.stderr
    assert p.returncode == 2, log[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("air-ray: error:")]
    assert len(errors) == 1 and "out of space writing " + str(out) in errors[0], log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    print(f"\n[full disk] {ROWS} rows in {units} partitions need {need:,} bytes on tmpfs; a "
          f"{_used(small):,}-byte-full tmpfs stopped the run with:\n  {errors[0]}")

    # nothing half-written is visible: every visible file is whole, committed units are complete
    assert not (out / "_manifest.json").exists()
    committed = {f.stem for f in (out / "_commits").glob("*.json") if not f.name.startswith(".")}
    assert 0 < len(committed) < units, "the disk should fill mid-run"
    for f in (out / "scores").glob("*.parquet"):
        if not f.name.startswith("."):
            pq.read_table(f)  # raises on a truncated file
    visible = {f.stem for f in (out / "scores").glob("*.parquet") if not f.name.startswith(".")}
    assert committed <= visible
    reference = {r["id"]: r for r in _read_dir(roomy / "out" / "scores")}
    for r in _read_dir(out / "scores"):
        assert r["score"] == reference[r["id"]]["score"]

    # more space, the same command: the rest is scored, every row exactly once
    subprocess.run(["mount", "-o", f"remount,size={64 << 20}", str(small)], check=True)
    p = score(out)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((out / "_manifest.json").read_text())
    assert m["counts"]["rows_read"] == m["counts"]["rows_scored"] == ROWS
    assert m["this_run"]["units_skipped"] == len(committed)
    assert m["this_run"]["rows_scored"] == ROWS - len(committed) * PER_PARTITION
    ids = [r["id"] for r in _read_dir(out / "scores")]
    assert len(ids) == len(set(ids)) == ROWS
    _assert_same_scores(out, roomy / "out")
    print(f"[full disk] rerun with space: {len(committed)} partitions kept, {m['this_run']['rows_scored']} rows "
          f"scored; rows lost 0, rows doubled 0")


def test_out_of_space_is_one_line_naming_the_file(tmp_path, mounts):
    """The writer every output goes through (``fsio.atomic_open``): a full filesystem is an ``AirRayError``
    naming the file, and the temporary file is gone."""
    import fsspec

    from air_ray.errors import AirRayError
    from air_ray.fsio import write_bytes_atomic

    small = mounts("tiny", 64 << 10)
    fs = fsspec.filesystem("file")
    write_bytes_atomic(fs, str(small / "a.bin"), b"x" * (16 << 10))
    with pytest.raises(AirRayError, match=f"out of space writing {small / 'b.bin'}"):
        write_bytes_atomic(fs, str(small / "b.bin"), b"x" * (128 << 10))
    assert sorted(p.name for p in small.iterdir()) == ["a.bin"]

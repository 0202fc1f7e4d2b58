"""The package as a user installs it (issue #27): the wheel built from this tree, installed into a fresh virtual
environment outside the checkout, runs `air-ray demo` on the sample rows it carries and writes a report that renders
in headless Chromium.

To keep CI cheap the fresh environment does not download the dependencies again: a .pth file puts the project's
.venv site-packages on its path (a plain path line, so the editable install of the checkout there is not loaded).
Only the wheel is installed into it (--no-deps), and every check that air_ray comes from the wheel is made from
outside the checkout (cwd, no PYTHONPATH)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

from tests.test_report import load_in_chromium, screenshot, serve  # noqa: F401  (serve: a fixture)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _run(args, cwd, env, timeout=900):
    p = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, (args, p.stdout[-3000:], p.stderr[-3000:])
    return p


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the fresh venv's python, its air-ray script, a clean environment, the wheel) for the wheel of this tree."""
    tmp = tmp_path_factory.mktemp("wheel")
    t0 = time.perf_counter()
    # build from a copy of what the wheel is made of, so that the checkout gets no build/ or egg-info
    src = tmp / "src"
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        src.mkdir(exist_ok=True)
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "air_ray", src / "air_ray", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(tmp / "dist"), str(src)], cwd=tmp, env=os.environ)
    (wheel,) = (tmp / "dist").glob("air_ray-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp, env=os.environ)
    python = venv / "bin" / "python"
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        cwd=tmp, env=os.environ).stdout.strip())
    (purelib / "air_ray_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
          str(wheel)], cwd=tmp, env=os.environ)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    print(f"\nwheel built and installed in {time.perf_counter() - t0:.1f}s")
    return {"python": python, "air_ray": venv / "bin" / "air-ray", "env": env, "wheel": wheel, "tmp": tmp,
            "purelib": purelib}


def test_the_wheel_carries_the_license_and_the_sample(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    for f in ("air_ray/data/gsm8k_sample.jsonl", "air_ray/data/LICENSE.gsm8k", "air_ray/heads/probe_values.txt"):
        assert f in names, f
    meta = zipfile.ZipFile(installed["wheel"]).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in meta
    assert (REPO / "LICENSE").read_text().lstrip().startswith("Apache License")


def test_demo_from_the_installed_wheel(installed, tmp_path, serve):
    env, cwd = installed["env"], tmp_path
    where = _run([str(installed["python"]), "-c", "import air_ray, air_ray.data; print(air_ray.__file__); "
                  "print(air_ray.data.SAMPLE)"], cwd=cwd, env=env).stdout.split()
    assert all(Path(p).is_relative_to(installed["purelib"]) for p in where), where  # the wheel, not the checkout
    assert not any(Path(p).is_relative_to(REPO) for p in where), where
    assert _run([str(installed["air_ray"]), "--version"], cwd=cwd, env=env).stdout.startswith("air-ray ")

    t0 = time.perf_counter()
    p = _run([str(installed["air_ray"]), "demo", "--limit", "4", "--num-probes", "2", "--probe-tokens", "256",
              "--output", str(tmp_path / "demo")], cwd=cwd,
             env=env)
    took = time.perf_counter() - t0
    lines = p.stdout.strip().splitlines()
    page = tmp_path / "demo" / "report" / "index.html"
    assert lines[-1] == str(page) and page.is_file(), p.stdout[-3000:]
    assert lines[0] == f"input: {where[1]} (the first 4 rows)"  # the sample rows the wheel installed
    manifest = json.loads((tmp_path / "demo" / "scores" / "_manifest.json").read_text())
    assert manifest["counts"]["rows_scored"] == 4

    got = load_in_chromium(serve(page.parent) + "index.html", tmp_path / "chrome")
    assert got["errors"] == [] and got["title"] == "AIR report", got
    assert got["images"] and all(width > 0 for _, width in got["images"]), got["images"]
    pixels, _ = screenshot(page.as_uri(), tmp_path / "shot")
    assert pixels.std() > 20  # not a blank page
    print(f"\n`air-ray demo --limit 4` from the wheel: {took:.1f}s")

"""The wheel builds, installs into a fresh virtual environment and imports."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_wheel_installs_into_fresh_venv(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)],
        check=True,
    )
    (wheel,) = dist.glob("nmtune-0.1.0-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "nmtune/py.typed" in names and "nmtune/functional.py" in names
    assert not any(n.startswith(("tests/", "examples/", "benchmarks/")) for n in names)
    # the study ships beside nmtune (as open_clip's wheel ships open_clip_train), with its package data
    study = {n for n in names if n.startswith("nmtune_study/")}
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "nmtune_study").rglob("*.py")}
    assert sources <= study, sorted(sources - study)
    assert {"nmtune_study/data/wordnet_task.jsonl.gz", "nmtune_study/data/LICENSE-WordNet-3.0.txt"} <= study
    # the licence ships in the wheel, declared in the SPDX form (PEP 639)
    (license_file,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    assert "Apache License" in zipfile.ZipFile(wheel).read(license_file).decode()
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    assert "License-Expression: Apache-2.0" in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    # torch and numpy come from this environment (a .pth file), nmtune only from the wheel
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # no PYTHONPATH: a checkout on it (its nmtune.egg-info) would make pip skip the wheel as installed
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--disable-pip-version-check", str(wheel)],
        check=True, env=env,
    )
    code = (
        "import nmtune, torch; from nmtune import NMTuneLoss, NMTuneHead; "
        "h = NMTuneHead(8, 3); x = torch.randn(16, 8); o = h(x); "
        "l = NMTuneLoss()(o.logits, torch.randint(0, 3, (16,)), o.features, x); l.backward(); "
        "print(nmtune.__file__, nmtune.__version__, float(l) > 0)"
    )
    out = subprocess.run([str(py), "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path, env=env)
    location, version, positive = out.stdout.split()
    assert location.startswith(site) and version == "0.1.0" and positive == "True"
    code = ("import nmtune_study; from nmtune_study.data.text import read_wordnet_task; "
            "print(nmtune_study.__file__, read_wordnet_task().dataset_id())")
    out = subprocess.run([str(py), "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path, env=env)
    location, dataset_id = out.stdout.split()
    assert location.startswith(site) and dataset_id == "wordnet-0818db852d"  # the package data, installed

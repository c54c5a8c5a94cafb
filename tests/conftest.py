"""Shared test configuration.

The suite runs on one torch thread: its tensors are small, so thread start-up
dominates, and on a shared 2-core CI machine two threads per LAPACK call were
measured 5-10x slower than one (the examples default to ``--threads 1`` for the
same reason). Subprocesses (distributed ranks, the wheel check) set their own.
"""

from __future__ import annotations

import torch


def pytest_configure(config):  # noqa: ARG001 - pytest hook signature
    torch.set_num_threads(1)


# -- device x dtype parametrisation (kornia's conftest, simplified) ------------------------------
#
# A test that takes a ``device`` and/or ``dtype`` argument runs once per device and dtype:
#   pytest                               cpu and cuda (cuda skipped, with the reason, without a GPU)
#   pytest --device cuda --dtype all     one device, every dtype
# One parametrised test serves every device: there is no separate copy of a test for CUDA.

import pytest  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICES = ("cpu", "cuda")


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu,cuda", help="devices for tests taking `device`: a comma list or all")
    parser.addoption("--dtype", default="float32,float64",
                     help=f"dtypes for tests taking `dtype`: a comma list of {sorted(DTYPES)} or all")


def _choices(metafunc, option: str, known) -> list[str]:
    raw = metafunc.config.getoption(option)
    names = list(known) if raw == "all" else [n.strip() for n in raw.split(",") if n.strip()]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise pytest.UsageError(f"{option} {unknown} not understood; expected a comma list of {sorted(known)} or all")
    return names


def _explicitly_parametrised(metafunc) -> set[str]:
    names: set[str] = set()
    for marker in metafunc.definition.iter_markers("parametrize"):
        argnames = marker.args[0]
        names.update(n.strip() for n in (argnames.split(",") if isinstance(argnames, str) else argnames))
    return names


def pytest_generate_tests(metafunc):
    taken = _explicitly_parametrised(metafunc)
    if "device" in metafunc.fixturenames and "device" not in taken:
        params = []
        for name in _choices(metafunc, "--device", DEVICES):
            marks = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                          reason="needs a CUDA device; none is available here")]
            params.append(pytest.param(torch.device(name), id=name, marks=marks if name == "cuda" else []))
        metafunc.parametrize("device", params)
    if "dtype" in metafunc.fixturenames and "dtype" not in taken:
        names = _choices(metafunc, "--dtype", DTYPES)
        metafunc.parametrize("dtype", [DTYPES[n] for n in names], ids=names)

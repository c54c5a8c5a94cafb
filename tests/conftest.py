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

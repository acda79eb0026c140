"""Shared fixtures. The demo data is built once per test session into a private cache folder."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

_OWN_CACHE: list[str] = []  # the cache folder this session made (and removes at its end)


def pytest_configure(config: pytest.Config) -> None:
    # Set before any test (and any subprocess a test starts) reads it; keeps the user's cache untouched.
    if "MMPTM_CACHE" not in os.environ:
        _OWN_CACHE.append(tempfile.mkdtemp(prefix="mmptm-test-cache-"))
        os.environ["MMPTM_CACHE"] = _OWN_CACHE[0]


def pytest_unconfigure(config: pytest.Config) -> None:
    for folder in _OWN_CACHE:  # each run builds its demo data again: do not leave 150 MB behind every time
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def demo():
    """The embedded demo dataset (``DemoPaths``), built on first use."""
    from mmptm.data_pipelines.demo import ensure_demo

    return ensure_demo()

"""Shared fixtures. The demo data is built once per test session into a private cache folder."""

from __future__ import annotations

import os
import tempfile

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # Set before any test (and any subprocess a test starts) reads it; keeps the user's cache untouched.
    os.environ.setdefault("MMPTM_CACHE", tempfile.mkdtemp(prefix="mmptm-test-cache-"))


@pytest.fixture(scope="session")
def demo():
    """The embedded demo dataset (``DemoPaths``), built on first use."""
    from mmptm.data_pipelines.demo import ensure_demo

    return ensure_demo()

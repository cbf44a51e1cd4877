"""Shared fixtures: the backends under test and a fresh seed per test."""

from __future__ import annotations

import os
import random

import pytest
import torch

from .helpers import ALL_BACKENDS, FUSED


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(params=FUSED or [pytest.param("none", marks=pytest.mark.skip("no fused backend built"))])
def fused(request):
    return request.param


@pytest.fixture
def seed():
    """A fresh seed per test (printed on failure through the test id's report)."""
    s = (
        random.SystemRandom().randrange(2**31)
        if os.environ.get("FASTCLIP_TEST_SEED") is None
        else int(os.environ["FASTCLIP_TEST_SEED"])
    )
    torch.manual_seed(s)
    print(f"seed={s}")
    return s

"""The comparison helpers the other suites lean on must be able to fail."""

from __future__ import annotations

import math

import pytest
import torch

from .helpers import assert_bitwise_equal


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64])
@pytest.mark.parametrize("shape", [(), (1,), (3, 4)], ids=["0-dim", "1", "3x4"])
def test_bitwise_equal_fails_on_any_difference(dtype, shape):
    a = torch.full(shape, 1.5, dtype=dtype)
    assert_bitwise_equal(a, a.clone())
    for other in (1.75, -1.5, math.inf, math.nan):
        b = a.clone()
        b.view(-1)[-1] = other
        with pytest.raises(AssertionError):
            assert_bitwise_equal(a, b)
    with pytest.raises(AssertionError):  # one ulp
        assert_bitwise_equal(a, torch.nextafter(a.real, torch.full_like(a.real, 2)).to(dtype))


def test_bitwise_equal_tells_signed_zeros_apart_and_any_nans_alike():
    with pytest.raises(AssertionError):
        assert_bitwise_equal(torch.tensor(0.0), torch.tensor(-0.0))
    assert_bitwise_equal(torch.tensor(math.nan), torch.tensor(-math.nan))
    with pytest.raises(AssertionError):  # dtype
        assert_bitwise_equal(torch.tensor(1.0), torch.tensor(1.0, dtype=torch.float64))
    assert_bitwise_equal(torch.tensor(True), torch.tensor(True))
    with pytest.raises(AssertionError):
        assert_bitwise_equal(torch.tensor(True), torch.tensor(False))

"""torch's ClipGradNormErrorIfNonfinite matrix (test/cpp/api/nn_utils.cpp and
test_nn.py): every combination must give torch's outcome, and grads stay
untouched whenever an error is raised."""

from __future__ import annotations

import itertools

import pytest
import torch

from .helpers import check_clip_grad_norm

INF, NAN = float("inf"), float("nan")
SCALARS = [INF, -INF, NAN, 2e22, -2e22, 2e200, -2e200]
NORM_TYPES = [0, 0.1, -0.1, 1, -1, 2, -2, 3.5, -3.5, "inf"]


def make_case(scalar, grad_only_one_elem, prefix_finite_grad_param):
    params = []
    if prefix_finite_grad_param:
        p = torch.nn.Parameter(torch.zeros(10, dtype=torch.float64))
        p.grad = torch.ones(10, dtype=torch.float64)
        params.append(p)
    p = torch.nn.Parameter(torch.zeros(10, dtype=torch.float64))
    if grad_only_one_elem:
        p.grad = torch.zeros(10, dtype=torch.float64)
        p.grad[1] = scalar
    else:
        p.grad = torch.ones(10, dtype=torch.float64) * scalar
    params.append(p)
    return params


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("foreach", [None, False])
def test_error_if_nonfinite_matrix(backend, norm_type, foreach):
    for scalar, one_elem, prefix, error_if_nonfinite in itertools.product(
        SCALARS, [False, True], [False, True], [False, True]
    ):
        params = make_case(scalar, one_elem, prefix)
        check_clip_grad_norm(params, backend, 1.0, norm_type, foreach, error_if_nonfinite)

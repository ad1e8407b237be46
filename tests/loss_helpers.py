"""Shared assertions for tests that compare two of the loss's paths (fast and general, closed form and autograd)."""
from __future__ import annotations

import pytest
import torch


def assert_same_terms_and_stats(a, b, rtol: float, atol: float, stats_abs: float) -> None:
    """Two ``LossOutput``s carry the same terms (values within ``rtol``/``atol``) and the same statistics."""
    assert a.terms.keys() == b.terms.keys()
    for key in a.terms:
        torch.testing.assert_close(a.terms[key], b.terms[key], rtol=rtol, atol=atol)
    assert dict(a.stats).keys() == dict(b.stats).keys()
    for key, value in dict(b.stats).items():
        assert a.stats[key] == pytest.approx(value, rel=1e-5, abs=stats_abs), key

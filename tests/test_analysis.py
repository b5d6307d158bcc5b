"""Reading dictionaries: the reconstruction-error measure."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import r2_score

from itda_lens.analysis import fvu


def test_fvu_is_one_minus_variance_weighted_r2() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 7, generator=g, dtype=torch.float64) * torch.arange(1, 8) + 3
    recon = x + 0.3 * torch.randn(300, 7, generator=g, dtype=torch.float64)
    ref = 1 - r2_score(x.numpy(), recon.numpy(), multioutput="variance_weighted")
    assert fvu(x, recon) == pytest.approx(ref, rel=1e-12)
    assert fvu(x, x) == 0.0 and fvu(x, x.mean(0).expand_as(x)) == pytest.approx(1.0)

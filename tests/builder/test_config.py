"""BuildConfig: validation, overrides, the reference code's threshold units."""

from __future__ import annotations

import pytest
import torch

from itda_lens import (
    BuildConfig,
    build_itda_from_activations,
    cos_threshold_from_tau,
)

HOOK = "blocks.1.hook_resid_post"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k must be"),
        ({"cos_threshold": 0.0}, "cos_threshold"),
        ({"cos_threshold": 1.5}, "cos_threshold"),
        ({"max_atoms": 0}, "max_atoms"),
        ({"encoder": "ista"}, "encoder"),
        ({"add_rule": "fast"}, "add_rule"),
        ({"batch_size": 0}, "batch_size"),
        ({"patience_tokens": 0}, "patience_tokens"),
        ({"dtype": "int8"}, "dtype"),
        ({"decision_dtype": "float16"}, "decision_dtype"),
        ({"target_atoms": 100, "max_atoms": 50}, "never be reached"),
    ],
)
def test_impossible_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BuildConfig(**kwargs)


def test_unknown_override_is_refused() -> None:
    with pytest.raises(TypeError, match="no field"):
        build_itda_from_activations([torch.randn(4, 4)], k_steps=3, progress=False)


def test_tau_conversion() -> None:
    # reference: (2 - 2 cos) / d > tau  <=>  cos < 1 - tau d / 2
    assert cos_threshold_from_tau(0.0004, 768) == pytest.approx(0.8464)
    with pytest.raises(ValueError, match="never add"):
        cos_threshold_from_tau(0.1, 512)

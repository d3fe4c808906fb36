import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton's interpreter runs qat.speed.fused_kernels on CPU tensors (tests/test_kernels.py); it must be on
    # before Triton is first imported, and only matters where qat.speed.fused_kernels.on_cpu() asks for it
    os.environ.setdefault("TRITON_INTERPRET", "1")
from hypothesis import HealthCheck, settings

# Deterministic property tests: the same generated cases on every run and every machine.
settings.register_profile(
    "ci", derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

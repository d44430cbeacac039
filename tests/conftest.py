"""Pytest configuration for the torch_manualgrad tests: the device/dtype fixtures, markers and hypothesis profiles."""
import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))

from common import DEVICES, FLOAT_DTYPES  # noqa: E402

# "ci" is the default: a fixed, bounded set of examples so a run is reproducible and takes minutes.
# TMG_HYPOTHESIS_PROFILE=dev explores new random examples with a larger budget.
_common = dict(
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("ci", max_examples=30, derandomize=True, **_common)
settings.register_profile("dev", max_examples=200, **_common)
settings.load_profile(os.environ.get("TMG_HYPOTHESIS_PROFILE", "ci"))

# On a GPU, torch's convolutions (the oracle) may use TF32 by default (cuDNN's allow_tf32 is on),
# which carries about 3 significant digits: float32 comparisons need full float32 on both sides.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


def pytest_configure(config):
    config.addinivalue_line("markers", "reference: compares against the loop-level torch_manualgrad.reference oracle")
    config.addinivalue_line("markers", "threads: changes torch's intra-op thread count (restored afterwards)")
    # torch's own notice when it (as the oracle) runs padding='same' with an even kernel
    config.addinivalue_line("filterwarnings", "ignore:Using padding='same' with even kernel lengths:UserWarning")


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=FLOAT_DTYPES)
def dtype(request):
    return request.param


@pytest.fixture
def restore_num_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)

import pytest
import torch

import weighted_loss  # noqa: F401  (loads the ops once for every test module)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device")

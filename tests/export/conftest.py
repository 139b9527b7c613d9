import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _restore_grad_mode():
    """`maskrcnn export` / `predict` turn autograd off for their process; called in-process here, that must not
    reach the test modules that run later."""
    with torch.enable_grad():  # restores the mode it found on exit
        yield

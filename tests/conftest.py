import pytest
import torch

from comm_vlm.tiny import build_tiny_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

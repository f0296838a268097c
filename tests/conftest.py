import os

import pytest
import torch

# Deterministic, quiet, single-threaded-friendly defaults for the whole suite.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# One thread: the test models are tiny, and on a shared 2-core machine two threads can be 100x slower.
torch.set_num_threads(1)


@pytest.fixture
def tiny_cfg():
    from smoe_lab.config import ModelConfig

    return ModelConfig.preset("tiny", n_layer=2, d_model=32, n_head=2, d_ff=64, vocab_size=97, block_size=16)

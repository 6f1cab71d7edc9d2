"""Shared fixtures: tiny random GPT-2 models (real tokenizer) built once per session."""

from __future__ import annotations

import os

import pytest
import torch

# Never let a test reach for the Hugging Face hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_grad_enabled(False)

TINY_SPECS = ("random-L2-H4-D16", "random-L3-H2-D8", "random-L1-H3-D12")


@pytest.fixture(scope="session")
def tokenizer():
    from ioi.tokenizer import get_gpt2_tokenizer

    return get_gpt2_tokenizer()


@pytest.fixture(scope="session")
def tiny_model():
    from ioi.models import load_model

    return load_model("random-L2-H4-D16", device="cpu", seed=0)

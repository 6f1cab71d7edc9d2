"""ioi.forward: END-only unembedding equals the full forward pass, with and without hooks."""

from __future__ import annotations

import pytest
import torch

from ioi.data import IOIDataset
from ioi.forward import end_logits, final_residual
from ioi.models import load_model

ATOL = 1e-4  # fp32, logit units


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("spec", ["random-L2-H3-D12", "random-L3-H4-D16"])
@pytest.mark.parametrize("bos", [False, True])
def test_end_logits_equal_full_forward_at_end(spec, bos):
    model = load_model(spec, device="cpu")
    data = IOIDataset(N=12, seed=3, prepend_bos=bos)
    end = data.word_idx["END"]
    full = model(data.toks)
    expected = full[torch.arange(len(data)), end]
    for budget in (None, 1e-3):  # one chunk; one prompt per chunk
        got = end_logits(model, data.toks, end, memory_budget_mb=budget)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected.float(), atol=ATOL, rtol=0)


def test_end_logits_apply_hooks_like_run_with_hooks():
    model = load_model("random-L3-H4-D16", device="cpu")
    data = IOIDataset(N=8, seed=1)
    end = data.word_idx["END"]

    def zero_head(z, hook):
        z = z.clone()
        z[:, :, 1] = 0.0
        return z

    hooks = [("blocks.1.attn.hook_z", zero_head)]
    expected = model.run_with_hooks(data.toks, fwd_hooks=hooks)[torch.arange(len(data)), end]
    got = end_logits(model, data.toks, end, fwd_hooks=hooks)
    torch.testing.assert_close(got, expected.float(), atol=ATOL, rtol=0)
    # and the hook mattered, so the comparison is not vacuous
    assert (got - end_logits(model, data.toks, end)).abs().max() > 1e-3
    # hooks are removed afterwards, even though the forward pass was cut short
    torch.testing.assert_close(end_logits(model, data.toks, end), model(data.toks)[torch.arange(len(data)), end].float(),
                               atol=ATOL, rtol=0)


def test_final_residual_is_the_unembedding_input():
    model = load_model("random-L2-H3-D12", device="cpu")
    toks = IOIDataset(N=4, seed=0).toks
    resid = final_residual(model, toks)
    torch.testing.assert_close(resid @ model.W_U + model.b_U, model(toks), atol=ATOL, rtol=0)


def test_end_logits_rejects_mismatched_positions():
    model = load_model("random-L2-H3-D12", device="cpu")
    toks = IOIDataset(N=4, seed=0).toks
    with pytest.raises(ValueError, match="one entry per prompt"):
        end_logits(model, toks, torch.zeros(3, dtype=torch.long))

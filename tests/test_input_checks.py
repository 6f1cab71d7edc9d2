"""Bad token tensors fail at the entry points with a message naming the fix (never a raw torch
IndexError from the embedding), and the one patching function that depends on value-bias folding
does so exactly as TransformerLens's does."""

from __future__ import annotations

import pytest
import torch

from ioi import ablation, forward
from ioi.patching import (
    get_act_patch_attn_head_out_all_pos,
    get_act_patch_attn_head_pattern_all_pos,
    get_act_patch_attn_head_pattern_dest_src_pos,
    get_act_patch_resid_pre,
    path_patch_to_heads,
    path_patch_to_logits,
)
from ioi.validation import check_tokens

pytestmark = pytest.mark.usefixtures("one_thread")


def _metric(logits):
    return logits[:, -1, 0].mean()


@pytest.fixture(scope="module")
def toks(tiny_model):
    return torch.randint(0, tiny_model.cfg.d_vocab, (3, 5), generator=torch.Generator().manual_seed(0))


def _bad_tokens(tiny_model, toks):
    too_big = toks.clone()
    too_big[0, 1] = tiny_model.cfg.d_vocab
    negative = toks.clone()
    negative[1, 2] = -1
    return [
        (toks.float(), TypeError, "integer token ids"),
        (toks.bool(), TypeError, "integer token ids"),
        (too_big, ValueError, "outside the model's vocabulary"),
        (negative, ValueError, "pad with a valid id"),
        (toks[0], ValueError, "add a batch axis"),
        ("When Mary and John", TypeError, "tokenize first"),
    ]


def _entry_points(model, toks):
    _, cache = model.run_with_cache(toks)
    means = ablation.compute_template_means(model, toks)
    return {
        "get_act_patch_resid_pre": lambda bad: get_act_patch_resid_pre(model, bad, cache, _metric, progress=False),
        "get_act_patch_attn_head_out_all_pos": lambda bad: get_act_patch_attn_head_out_all_pos(
            model, toks, cache, _metric, clean_tokens=bad, progress=False),
        "path_patch_to_logits (orig)": lambda bad: path_patch_to_logits(model, bad, toks, _metric, progress=False),
        "path_patch_to_logits (new)": lambda bad: path_patch_to_logits(model, toks, bad, _metric, progress=False),
        "path_patch_to_heads": lambda bad: path_patch_to_heads(model, bad, toks, _metric, receivers=[(1, 0)],
                                                               receiver_input="q", progress=False),
        "compute_template_means": lambda bad: ablation.compute_template_means(model, bad),
        "run_with_ablation": lambda bad: ablation.run_with_ablation(model, bad, ablation.ablate_circuit(means, None)),
        "forward.final_residual": lambda bad: forward.final_residual(model, bad),
        "forward.cache_activations": lambda bad: forward.cache_activations(model, bad, ["blocks.0.hook_resid_post"]),
        "forward.end_logits": lambda bad: forward.end_logits(model, bad, torch.full((bad.shape[0] if hasattr(bad, "shape") and bad.ndim else 1,), 4)),
    }


def test_every_entry_point_rejects_bad_tokens_with_the_fix(tiny_model, toks):
    for name, call in _entry_points(tiny_model, toks).items():
        for bad, error, message in _bad_tokens(tiny_model, toks):
            with pytest.raises(error, match=message):
                call(bad)


def test_good_tokens_pass_unchanged(tiny_model, toks):
    assert check_tokens(tiny_model, toks) is toks or torch.equal(check_tokens(tiny_model, toks), toks)
    as_int32 = check_tokens(tiny_model, toks.int())
    assert as_int32.dtype == torch.long and torch.equal(as_int32, toks)
    assert torch.equal(check_tokens(tiny_model, toks.tolist()), toks)


@pytest.fixture(scope="module")
def biased_checkpoint(tmp_path_factory):
    """A tiny GPT-2 checkpoint with large value biases (random models here have zero biases)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=16, vocab_size=50257))
    with torch.no_grad():
        for block in hf.transformer.h:
            block.attn.c_attn.bias.normal_(0, 1.0)
            block.attn.c_attn.weight.normal_(0, 0.3)
            block.attn.c_proj.weight.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("biased-gpt2")
    hf.save_pretrained(path)
    return path


def test_only_single_entry_pattern_patching_depends_on_value_bias_folding(biased_checkpoint):
    """ioi.models: whole-activation patching is processing-invariant; single-entry pattern patching
    is not (a patched row no longer sums to 1, so an unfolded b_V is weighted by the row sum), and
    ours matches transformer_lens.patching's under each setting."""
    from transformer_lens import patching as tl_patching

    from ioi.models import load_model

    clean = torch.randint(0, 50257, (2, 5), generator=torch.Generator().manual_seed(1))
    corrupt = clean.clone()
    corrupt[:, 2] = torch.randint(0, 50257, (2,), generator=torch.Generator().manual_seed(2))
    results = {}
    for fold in (False, True):
        model = load_model(str(biased_checkpoint), device="cpu", fold_value_biases=fold)
        assert (model.b_V.abs().max() > 0.5) != fold
        _, cache = model.run_with_cache(clean)
        single = get_act_patch_attn_head_pattern_dest_src_pos(model, corrupt, cache, _metric, progress=False)
        reference = tl_patching.get_act_patch_attn_head_pattern_dest_src_pos(model, corrupt, cache, _metric)
        torch.testing.assert_close(single, reference, atol=1e-4, rtol=0)
        results[fold] = (single,
                         get_act_patch_attn_head_out_all_pos(model, corrupt, cache, _metric, progress=False),
                         get_act_patch_attn_head_pattern_all_pos(model, corrupt, cache, _metric, progress=False))
    single_gap = (results[False][0] - results[True][0]).abs().max()
    assert single_gap > 1e-3, single_gap  # well above float error: it depends on the setting
    for unfolded, folded in zip(results[False][1:], results[True][1:]):
        torch.testing.assert_close(unfolded, folded, atol=1e-5, rtol=0)

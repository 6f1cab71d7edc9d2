"""The planted-circuit model behaves as constructed (ground truth, not fitted to the analyses).

Everything is measured on ``load_model("planted-ioi")`` (TransformerBridge, fold_ln +
center_writing_weights + center_unembed). Each check names the head it expects from
``ioi.planted.CIRCUIT`` and asserts a margin over the next-best head. Thresholds are far from the
measured values (see ``ioi.planted.PLANTED_BEHAVIOUR``), so they test the mechanism, not a tuning.

To keep CI fast, most forward passes stop right after the final LayerNorm (a hook raises) and the
logits are computed only at END from the captured normalised residual;
``test_end_logits_are_the_model_logits`` checks that this equals the model's own logits.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from transformer_lens import patching

from ioi import planted
from ioi.data import IOIDataset
from ioi.models import load_model

CLASSES = ("name mover", "negative name mover", "s-inhibition", "induction", "duplicate token",
           "previous token")
LD_MIN = 2.0  # every p_IOI prompt (measured minimum ~3.4)
N_IOI = 200


def _head(cls: str) -> tuple[int, int]:
    (head,) = planted.CIRCUIT[cls]
    return head


class _Stop(Exception):
    pass


def run_capture(model, toks, names=(), fwd_hooks=()):
    """Run to the final LayerNorm only; return captured activations and the normalised residual."""
    store = {}

    def capture(act, hook):
        store[hook.name] = act.detach().clone()

    def stop(act, hook):
        store["final"] = act.detach().clone()
        raise _Stop

    hooks = list(fwd_hooks) + [(name, capture) for name in names]
    hooks.append(("ln_final.hook_normalized", stop))
    try:
        model.run_with_hooks(toks, fwd_hooks=hooks)
    except _Stop:
        pass
    return store


def end_logits(model, store, end):
    rows = torch.arange(len(end))
    return store["final"][rows, end] @ model.W_U + model.b_U


def logit_diff(logits_at_end, ds):
    rows = torch.arange(len(ds))
    return logits_at_end[rows, ds.io_token_ids] - logits_at_end[rows, ds.s_token_ids]


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These are many small forward passes: with two threads on a busy 2-core machine OpenMP's
    spin-waiting made them 4-7x slower (measured); one thread is as fast when idle."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return load_model("planted-ioi", device="cpu")


@pytest.fixture(scope="module")
def ioi():
    return IOIDataset("mixed", N=N_IOI, seed=0)


@pytest.fixture(scope="module")
def abc(ioi):
    return ioi.abc_dataset(seed=0)


@pytest.fixture(scope="module")
def ioi_run(model, ioi):
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
    names += [f"blocks.{layer}.attn.hook_z" for layer in range(model.cfg.n_layers)]
    names += ["ln_final.hook_scale"]
    store = run_capture(model, ioi.toks, names)
    store["logits"] = end_logits(model, store, ioi.word_idx["END"])
    store["ld"] = logit_diff(store["logits"], ioi)
    return store


@pytest.fixture(scope="module")
def abc_run(model, abc):
    nm_layer = _head("name mover")[0]
    store = run_capture(model, abc.toks, [f"blocks.{nm_layer}.attn.hook_z"])
    store["logits"] = end_logits(model, store, abc.word_idx["END"])
    store["ld"] = logit_diff(store["logits"], abc)
    return store


def _ranked(scores: torch.Tensor) -> list[tuple[float, tuple[int, int]]]:
    n_heads = scores.shape[1]
    flat = [(float(scores[l, h]), (l, h)) for l in range(scores.shape[0]) for h in range(n_heads)]
    return sorted(flat, reverse=True)


def _assert_top(scores, expected, margin, exclude=(), what=""):
    ranked = [(s, h) for s, h in _ranked(scores) if h not in exclude]
    (best_score, best), (next_score, runner_up) = ranked[0], ranked[1]
    assert best == expected, f"{what}: expected {expected} on top, got {ranked[:3]}"
    assert best_score - next_score > margin, (
        f"{what}: {expected} = {best_score:.3f} vs next {runner_up} = {next_score:.3f}")


# ------------------------------------------------------------------------- construction


def test_circuit_metadata():
    assert set(planted.CIRCUIT) == set(CLASSES)
    assert set(planted.RELEVANT_POSITIONS) == set(planted.CIRCUIT)
    assert planted.RELEVANT_POSITIONS["name mover"] == "END"
    assert planted.RELEVANT_POSITIONS["s-inhibition"] == "END"
    assert planted.RELEVANT_POSITIONS["induction"] == "S2"
    assert planted.RELEVANT_POSITIONS["duplicate token"] == "S2"
    assert planted.RELEVANT_POSITIONS["previous token"] == "S1+1"
    heads = [h for hs in planted.CIRCUIT.values() for h in hs]
    assert len(heads) == len(set(heads))
    every = {(l, h) for l in range(planted.N_LAYERS) for h in range(planted.N_HEADS)}
    assert set(planted.IDLE_HEADS) == every - set(heads)
    # Layer order of the story: previous/duplicate < induction < s-inhibition < name movers.
    assert _head("previous token")[0] < _head("induction")[0] < _head("s-inhibition")[0]
    assert _head("s-inhibition")[0] < _head("name mover")[0]
    assert "name mover" in planted.describe()


def test_build_is_deterministic_and_cached_atomically(tmp_path):
    """A fresh build (through ensure_checkpoint's temp-folder-and-rename path) has the same bytes
    as the default cached checkpoint, which may come from another process; the second call
    reuses the folder; nothing temporary is left behind."""
    cached = planted.ensure_checkpoint()
    fresh = planted.ensure_checkpoint(tmp_path / "planted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["planted"]

    def sha(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert sha(fresh / name) == sha(cached / name), name
    marker = json.loads((fresh / "planted_ioi.json").read_text())
    assert marker["model_sha256"] == sha(fresh / "model.safetensors")
    assert marker["planted_version"] == planted.PLANTED_VERSION
    built = (fresh / "model.safetensors").stat().st_mtime_ns
    assert planted.ensure_checkpoint(tmp_path / "planted") == fresh
    assert (fresh / "model.safetensors").stat().st_mtime_ns == built  # reused, not rebuilt


def test_checkpoint_is_gpt2_shaped(model):
    from transformers import GPT2Config

    config = GPT2Config.from_pretrained(str(planted.ensure_checkpoint()))
    assert config.model_type == "gpt2" and config.vocab_size == 50257
    assert config.n_positions >= 256 and config.tie_word_embeddings
    assert model.cfg.n_layers == planted.N_LAYERS and model.cfg.n_heads == planted.N_HEADS
    assert model.cfg.d_model == planted.D_MODEL


# ------------------------------------------------------------------------------ behaviour


def test_end_logits_are_the_model_logits(model, ioi):
    part = ioi[:4]
    full = model(part.toks)
    rows = torch.arange(len(part))
    store = run_capture(model, part.toks)
    torch.testing.assert_close(
        end_logits(model, store, part.word_idx["END"]), full[rows, part.word_idx["END"]],
        atol=1e-4, rtol=0)


def test_logit_difference_positive_for_every_prompt_and_template(ioi, ioi_run):
    ld = ioi_run["ld"]
    templates = sorted(set(ioi.template_ids))
    assert len(templates) == 14  # "mixed" = templates 1-7 of each form
    for template in templates:
        rows = [i for i, t in enumerate(ioi.template_ids) if t == template]
        assert ld[rows].min() > LD_MIN, (template, ld[rows].min())
    assert ld.mean() > 3.0
    documented = planted.PLANTED_BEHAVIOUR["ioi_ld_mean"]
    assert abs(float(ld.mean()) - documented) < 0.3, (float(ld.mean()), documented)


@pytest.mark.parametrize("kwargs", [{"all_templates": True}, {"prepend_bos": True}],
                         ids=["all-15-templates", "bos"])
def test_logit_difference_other_settings(model, kwargs):
    """Not tuned to the paper code's 7+7 templates or to the absence of BOS."""
    ds = IOIDataset("mixed", N=60, seed=11, **kwargs)
    ld = logit_diff(end_logits(model, run_capture(model, ds.toks), ds.word_idx["END"]), ds)
    assert ld.min() > LD_MIN, float(ld.min())


def test_io_probability(ioi, ioi_run):
    probs = ioi_run["logits"].softmax(-1)
    rows = torch.arange(len(ioi))
    p_io, p_s = probs[rows, ioi.io_token_ids], probs[rows, ioi.s_token_ids]
    assert 0.2 < p_io.mean() < 0.7
    assert (p_io > 5 * p_s).all()
    assert (probs.argmax(-1) == ioi.io_token_ids).float().mean() > 0.95


def test_abc_logit_difference_near_zero(abc_run):
    ld = abc_run["ld"]
    assert abs(float(ld.mean())) < 0.3
    assert float(ld.std()) < 2.0


def test_processing_does_not_change_logit_differences(model, ioi):
    """The bridge's fold_ln / center_writing_weights / center_unembed keep every LD of the raw
    Hugging Face checkpoint."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(str(planted.ensure_checkpoint()), local_files_only=True,
                                         attn_implementation="eager").eval()
    part = ioi[:10]
    rows, end = torch.arange(len(part)), part.word_idx["END"]
    ld_hf = logit_diff(hf(part.toks).logits[rows, end], part)
    ld = logit_diff(end_logits(model, run_capture(model, part.toks), end), part)
    torch.testing.assert_close(ld, ld_hf, atol=1e-3, rtol=0)


# ---------------------------------------------------------------------- attention patterns


def _attention(ioi, ioi_run, query: str, key: str) -> torch.Tensor:
    """Mean attention query -> key for every head, [layer, head]."""
    rows = torch.arange(len(ioi))
    q, k = ioi.word_idx[query], ioi.word_idx[key]
    layers = [ioi_run[f"blocks.{layer}.attn.hook_pattern"][rows, :, q, k].mean(0)
              for layer in range(planted.N_LAYERS)]
    return torch.stack(layers)


@pytest.mark.parametrize(
    "cls, query, key, minimum",
    [
        ("name mover", "END", "IO", 0.5),
        ("negative name mover", "END", "IO", 0.5),
        ("s-inhibition", "END", "S2", 0.7),
        ("induction", "S2", "S1+1", 0.9),
        ("duplicate token", "S2", "S1", 0.9),
        ("previous token", "S1+1", "S1", 0.9),
    ],
)
def test_attention_at_documented_positions(ioi, ioi_run, cls, query, key, minimum):
    head = _head(cls)
    scores = _attention(ioi, ioi_run, query, key)
    assert scores[head] > minimum, (cls, head, float(scores[head]))
    # The two name movers share their query/key circuit, so each ignores the other when ranking.
    twins = {"name mover": [_head("negative name mover")],
             "negative name mover": [_head("name mover")]}
    _assert_top(scores, head, margin=0.25, exclude=twins.get(cls, []), what=f"{cls} {query}->{key}")


def test_name_movers_avoid_the_subject(ioi, ioi_run):
    for cls in ("name mover", "negative name mover"):
        head = _head(cls)
        for s_pos in ("S1", "S2"):
            assert _attention(ioi, ioi_run, "END", s_pos)[head] < 0.05


def test_repeated_random_tokens(model):
    """Paper App. H/I (Figs. 17/18): 4 x (100 random tokens repeated once), no BOS."""
    generator = torch.Generator().manual_seed(0)
    half = torch.randint(1000, 10000, (4, 100), generator=generator)
    toks = torch.cat([half, half], dim=1)
    store = run_capture(model, toks, [f"blocks.{l}.attn.hook_pattern" for l in range(4)])
    total, seq = toks.shape[1], 100

    def stripe(offset: int, first: int) -> torch.Tensor:
        q = torch.arange(first, total)
        return torch.stack([store[f"blocks.{l}.attn.hook_pattern"][:, :, q, q - offset].mean((0, 2))
                            for l in range(planted.N_LAYERS)])

    _assert_top(stripe(1, 1), _head("previous token"), 0.5, what="previous-token score")
    _assert_top(stripe(seq, seq), _head("duplicate token"), 0.5, what="duplicate-token score")
    _assert_top(stripe(seq - 1, seq), _head("induction"), 0.5, what="induction score")


# -------------------------------------------------------------------------------- ablation


def _z_hook(replacement_fn, head_index):
    def hook(z, hook):
        z = z.clone()
        z[:, :, head_index] = replacement_fn(z[:, :, head_index])
        return z
    return hook


def test_ablating_the_name_mover_destroys_the_logit_difference(model, ioi, abc, abc_run, ioi_run):
    layer, head = _head("name mover")
    n = 100
    ioi, abc = ioi[:n], abc[:n]
    clean = float(ioi_run["ld"][:n].mean())
    name = f"blocks.{layer}.attn.hook_z"
    end = ioi.word_idx["END"]

    zero = run_capture(model, ioi.toks, fwd_hooks=[(name, _z_hook(torch.zeros_like, head))])
    ld_zero = float(logit_diff(end_logits(model, zero, end), ioi).mean())

    # Mean over p_ABC prompts of the same template, per position (paper §2.1).
    z_abc = abc_run[name][:n, :, head]
    means = torch.zeros_like(z_abc)
    for template in set(abc.template_ids):
        rows = [i for i, t in enumerate(abc.template_ids) if t == template]
        means[rows] = z_abc[rows].mean(0, keepdim=True)
    mean = run_capture(model, ioi.toks, fwd_hooks=[(name, _z_hook(lambda z: means, head))])
    ld_mean = float(logit_diff(end_logits(model, mean, end), ioi).mean())

    assert ld_zero < 0.1 * clean and ld_mean < 0.1 * clean, (clean, ld_zero, ld_mean)

    idle_layer, idle_head = next(h for h in planted.IDLE_HEADS if h[0] == layer)
    idle = run_capture(model, ioi.toks, fwd_hooks=[(f"blocks.{idle_layer}.attn.hook_z",
                                                    _z_hook(torch.zeros_like, idle_head))])
    ld_idle = float(logit_diff(end_logits(model, idle, end), ioi).mean())
    assert abs(ld_idle - clean) < 0.01 * clean


# ------------------------------------------------------------------------ activation patching


class EndLogitsOnly:
    """The bridge as seen by ``transformer_lens.patching``, returning logits at END only.

    ``run_with_hooks`` runs the real bridge with the patching hook and stops after the final
    LayerNorm; the unembedding is applied at each prompt's END (the only place the metric reads),
    which skips ~90% of the CPU time. Same numbers: ``test_end_logits_are_the_model_logits``.
    """

    def __init__(self, model, end):
        self.model, self.end, self.cfg = model, end, model.cfg

    def run_with_hooks(self, tokens, fwd_hooks=()):
        store = run_capture(self.model, tokens, fwd_hooks=fwd_hooks)
        return end_logits(self.model, store, self.end)


@pytest.fixture(scope="module")
def patching_setup(model):
    small = IOIDataset("mixed", N=20, seed=3)
    small_abc = small.abc_dataset(seed=3)
    rows = torch.arange(len(small))
    proxy = EndLogitsOnly(model, small.word_idx["END"])

    def metric(logits_at_end):  # LD of the clean prompt's IO and S, at END
        return (logits_at_end[rows, small.io_token_ids]
                - logits_at_end[rows, small.s_token_ids]).mean()

    only_z = lambda name: name.endswith("hook_z")  # noqa: E731
    _, ioi_cache = model.run_with_cache(small.toks, names_filter=only_z)
    _, abc_cache = model.run_with_cache(small_abc.toks, names_filter=only_z)
    return proxy, small.toks, small_abc.toks, ioi_cache, abc_cache, metric


def test_activation_patching_denoising_finds_the_direct_heads(patching_setup):
    """Clean p_IOI head outputs patched into p_ABC runs, metric = LD (clean IO - clean S) at END.

    The clean names appear nowhere in a p_ABC prompt, so only heads that write names to the
    logits can restore the LD: the name mover (up), the negative name mover (down). Upstream
    circuit heads only steer attention between the p_ABC names, and score ~0 like idle heads.
    """
    proxy, _, abc_toks, ioi_cache, _, metric = patching_setup
    effect = patching.get_act_patch_attn_head_out_all_pos(proxy, abc_toks, ioi_cache, metric)
    _assert_top(effect, _head("name mover"), margin=2.0, what="denoising")
    _assert_top(-effect, _head("negative name mover"), margin=0.5, what="denoising (negative)")
    for head in planted.IDLE_HEADS:
        assert abs(float(effect[head])) < 0.05


def test_activation_patching_noising_ranks_circuit_above_idle(patching_setup):
    """p_ABC head outputs patched into p_IOI runs (the paper's knockout direction): every
    planted head changes the LD more than any idle head."""
    proxy, toks, _, _, abc_cache, metric = patching_setup
    clean = float(metric(proxy.run_with_hooks(toks)))
    change = patching.get_act_patch_attn_head_out_all_pos(proxy, toks, abc_cache, metric) - clean
    circuit = [h for hs in planted.CIRCUIT.values() for h in hs]
    weakest_circuit = min(abs(float(change[h])) for h in circuit)
    strongest_idle = max(abs(float(change[h])) for h in planted.IDLE_HEADS)
    assert weakest_circuit > 0.2 * clean and strongest_idle < 0.01 * clean, (
        weakest_circuit, strongest_idle)
    assert float(change[_head("negative name mover")]) > 0  # removing it helps
    for cls in ("name mover", "s-inhibition"):  # removing these flips the answer to S
        assert float(change[_head(cls)]) < -clean


# ------------------------------------------------------------------ direct logit attribution


def test_direct_logit_attribution(model, ioi, ioi_run):
    """Per-head output at END / cached ln_final scale, dotted with W_U[:, IO] - W_U[:, S]."""
    rows, end = torch.arange(len(ioi)), ioi.word_idx["END"]
    direction = model.W_U[:, ioi.io_token_ids] - model.W_U[:, ioi.s_token_ids]  # [d_model, batch]
    scale = ioi_run["ln_final.hook_scale"][rows, end]  # [batch, 1]
    dla = torch.zeros(planted.N_LAYERS, planted.N_HEADS)
    for layer in range(planted.N_LAYERS):
        z = ioi_run[f"blocks.{layer}.attn.hook_z"][rows, end]  # [batch, head, d_head]
        out = torch.einsum("bhd,hdm->bhm", z, model.W_O[layer])
        out = out - out.mean(-1, keepdim=True)
        dla[layer] = torch.einsum("bhm,mb->bh", out / scale[:, :, None], direction).mean(0)
    _assert_top(dla, _head("name mover"), margin=2.0, what="DLA")
    _assert_top(-dla, _head("negative name mover"), margin=0.5, what="DLA (most negative)")
    # Nothing else writes to the names' unembedding: the heads' sum is the logit difference.
    assert abs(float(dla.sum()) - float(ioi_run["ld"].mean())) < 0.05


def test_documented_behaviour_keys():
    for key in ("ioi_ld_mean", "ioi_ld_min", "abc_ld_mean", "ioi_io_prob_mean"):
        assert key in planted.PLANTED_BEHAVIOUR

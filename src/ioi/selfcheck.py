"""The fast engine proves itself on the weights a run analyses (issue 10 §5).

The fast paths are tested against their hook-based twins on random and planted models (tests/), but
GPT-2's real activations differ (a very large residual norm on the first token, sharp attention),
so every run first checks them again **on its own weights**, on a small sample, at the tests'
tolerance (1e-4 absolute, float32):

* **path patching** (:mod:`ioi.patching.path`) against the seed-style hooked loops
  (:mod:`ioi.patching.reference`), the raw logit difference IO - S at END (the mean over the
  prompts, the quantity the figures plot and the tests compare; the largest per-prompt difference
  is recorded too), for a few head
  senders and one MLP sender, into every receiver input kind: the logits (senders at END), a
  late head's queries (receivers at END), a middle head's keys (at S1+1) and values (at S2), and
  the logits with a knockout (heads mean-ablated at END and an MLP mean-ablated everywhere: the
  paper's Fig. 15 setting);
* **activation patching** (:mod:`ioi.patching.activation`) against ``transformer_lens.patching``
  (restricted by ``index_df`` to a sample of cells): ``resid_pre`` at two positions, and head
  ``z``/``q``/``k``/``v``/pattern by position at one position;
* **knockouts** (:mod:`ioi.ablation`'s public API: F(C), F(C\\K), F(M\\K), head and MLP
  knockouts, template-wise p_ABC means) against a hooked reference: one ``run_with_hooks``
  forward of the bridge with ``torch.where(keep, z, means)`` on ``hook_z`` / ``hook_mlp_out``.

Prompts: ``n`` p_IOI prompts (and their p_ABC) drawn with the run's own dataset settings (BOS as
configured) and seed. The report (:class:`SelfCheckReport`) gives each comparison's maximum absolute
difference; :func:`run_selfcheck` raises :class:`SelfCheckError` naming every comparison over the
tolerance, so a workflow run stops before any figure is drawn from a wrong engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from typing import Any, Callable, Iterator, Mapping

import pandas as pd
import torch
from torch import Tensor

# Called through their modules (never imported by name), so a test can perturb one of them.
from ioi import ablation as ablation_module
from ioi.patching import activation as activation_module
from ioi.patching import path as path_module
from ioi.patching import reference as reference_module

TOLERANCE = 1e-4
DEFAULT_N_PROMPTS = 4
HEAD_KINDS = ("z", "q", "k", "v", "pattern")
TL_HEAD_BY_POS = {
    "z": "get_act_patch_attn_head_out_by_pos",
    "q": "get_act_patch_attn_head_q_by_pos",
    "k": "get_act_patch_attn_head_k_by_pos",
    "v": "get_act_patch_attn_head_v_by_pos",
    "pattern": "get_act_patch_attn_head_pattern_by_pos",
}


class SelfCheckError(RuntimeError):
    """A fast path disagrees with its hook-based reference on the configured model's weights."""


@dataclasses.dataclass
class Comparison:
    """One fast path against its reference: the largest absolute difference over ``n_values``."""

    name: str
    fast: str
    reference: str
    max_abs_diff: float
    n_values: int
    tolerance: float = TOLERANCE
    error: str = ""  # the fast path raised instead of answering (e.g. its own forward check)
    per_prompt_max_abs_diff: float | None = None  # before the mean over prompts (information)

    @property
    def passed(self) -> bool:
        return math.isfinite(self.max_abs_diff) and self.max_abs_diff <= self.tolerance

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "passed": self.passed}


@dataclasses.dataclass
class SelfCheckReport:
    comparisons: list[Comparison]
    n_prompts: int
    sample: dict[str, Any]
    tolerance: float = TOLERANCE

    @property
    def max_abs_diff(self) -> float:
        return max(c.max_abs_diff for c in self.comparisons)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    @property
    def failures(self) -> list[Comparison]:
        return [c for c in self.comparisons if not c.passed]

    def as_dict(self) -> dict[str, Any]:
        return {
            "tolerance": self.tolerance,
            "max_abs_diff": self.max_abs_diff,
            "passed": self.passed,
            "n_prompts": self.n_prompts,
            "n_comparisons": len(self.comparisons),
            "sample": self.sample,
            "comparisons": [c.as_dict() for c in self.comparisons],
        }

    def failure_message(self, model_label: str = "") -> str:
        lines = [
            f"Self-check FAILED on {model_label or 'the configured model'}: the fast engine disagrees "
            f"with its hook-based reference by more than {self.tolerance:g} on these weights, so no "
            "figure of this run would be trustworthy. Mismatches:"
        ]
        for c in self.failures:
            detail = f"raised: {c.error}" if c.error else f"max |{c.fast} - {c.reference}| = {c.max_abs_diff:.3g}"
            lines.append(f"  - {c.name}: {detail}")
        lines.append(
            "Run the equality tests (pytest tests/test_path_patching.py tests/test_activation_patching.py "
            "tests/test_ablation.py) and report the model; do not use this run's figures."
        )
        return "\n".join(lines)


def _max_diff(fast: Tensor, reference: Tensor) -> tuple[float, int]:
    fast, reference = torch.as_tensor(fast).float().cpu(), torch.as_tensor(reference).float().cpu()
    if fast.shape != reference.shape:
        raise SelfCheckError(f"shape mismatch: fast {tuple(fast.shape)} vs reference {tuple(reference.shape)}")
    if fast.numel() == 0:
        return 0.0, 0
    nan_mismatch = torch.isnan(fast) != torch.isnan(reference)
    if bool(nan_mismatch.any()):
        return math.inf, fast.numel()
    both = ~torch.isnan(fast)
    return float((fast[both] - reference[both]).abs().max()) if bool(both.any()) else 0.0, int(both.sum())


# ----------------------------------------------------------------------------------------------
# The sample: prompts, senders, receivers, a circuit
# ----------------------------------------------------------------------------------------------


def _sample_datasets(n: int, seed: int, dataset_settings: Mapping[str, Any] | None):
    from ioi.data import IOIDataset
    from ioi.pipeline import dataset_kwargs

    settings = dict(dataset_settings or {})
    ioi = IOIDataset(N=n, seed=seed, **dataset_kwargs(settings))
    abc = ioi.abc_dataset(paper_collisions=bool(settings.get("paper_collisions", False)))
    return ioi, abc


def _sample_senders(n_layers: int, n_heads: int, below: int) -> list[tuple[int, int]]:
    """Up to three distinct heads spread over the layers ``< below``."""
    layers = sorted({0, (below - 1) // 2, below - 1})
    heads = [(layer, (i * (n_heads // 2 + 1)) % n_heads) for i, layer in enumerate(layers)]
    return list(dict.fromkeys(heads))


def _sample_circuit(model, model_spec: str, word_idx: Mapping[str, Tensor]) -> dict:
    """The run's circuit ``{head: positions}`` when it fits the model, else four heads kept at
    END / S2 (a random model of a small shape)."""
    from ioi.ablation import circuit_positions
    from ioi.circuits import circuit_for_model

    L, H = model.cfg.n_layers, model.cfg.n_heads
    try:
        circuit = circuit_for_model(model_spec)
        circuit.validate(L, H)
        return circuit_positions(circuit, word_idx)
    except (ValueError, KeyError):
        heads = {(L - 1, 0): "END", (L - 1, H - 1): "END", (max(0, L - 2), H // 2): "S2", (0, 0): "S2"}
        return {head: word_idx[key] for head, key in heads.items()}


# ----------------------------------------------------------------------------------------------
# Path patching
# ----------------------------------------------------------------------------------------------


def _path_comparisons(model, ioi, abc, metric, means, mlp_means, progress: bool) -> tuple[list[Comparison], dict]:
    L, H = model.cfg.n_layers, model.cfg.n_heads
    word_idx = ioi.word_idx
    out: list[Comparison] = []
    sample: dict[str, Any] = {}

    def compare(name: str, fast_fn: Callable, ref_fn: Callable, senders: list, **kwargs) -> None:
        subset = [*senders, (0, None)]
        fast = fast_fn(model, ioi.toks, abc.toks, metric, senders="both", progress=progress, **kwargs)
        ref = ref_fn(model, ioi.toks, abc.toks, metric, senders="both", sender_subset=subset,
                     progress=progress, **kwargs)
        heads_idx = torch.tensor(senders, device="cpu")  # a CPU index serves tensors on any device
        fast_values = torch.cat([fast.heads[heads_idx[:, 0], heads_idx[:, 1]], fast.mlps[:1]])
        ref_values = torch.cat([ref.heads[heads_idx[:, 0], heads_idx[:, 1]], ref.mlps[:1]])
        diff, count = _max_diff(fast_values.mean(-1), ref_values.mean(-1))
        out.append(Comparison(name, f"ioi.patching.path.{fast_fn.__name__}",
                              f"ioi.patching.reference.{ref_fn.__name__}", diff, count,
                              per_prompt_max_abs_diff=_max_diff(fast_values, ref_values)[0]))
        sample[name] = {"senders": [list(s) for s in senders] + ["mlp0"],
                        **{k: v for k, v in kwargs.items() if k in ("receivers", "receiver_input")}}

    end = word_idx["END"]
    to_logits = (path_module.path_patch_to_logits, reference_module.ref_path_patch_to_logits)
    to_heads = (path_module.path_patch_to_heads, reference_module.ref_path_patch_to_heads)
    compare("path -> logits (senders at END)", *to_logits, _sample_senders(L, H, L), sender_positions=end)
    if L >= 2:
        receivers = {
            "q": ([(L - 1, H - 1)], end, "END"),
            "k": ([(max(1, L // 2), 0)], word_idx["S1+1"], "S1+1"),
            "v": ([(max(1, L // 2), H - 1)], word_idx["S2"], "S2"),
        }
        for which, (heads, positions, label) in receivers.items():
            below = heads[0][0]
            compare(f"path -> {which} of {heads[0][0]}.{heads[0][1]} at {label}", *to_heads,
                    _sample_senders(L, H, below)[-2:], receivers=heads, receiver_input=which,
                    receiver_positions=positions)
    else:
        sample["path -> heads"] = "skipped: a one-layer model has no sender below a receiver"
    knockout = ablation_module.head_knockout(
        means, {(L - 1, 0): end, (max(0, L - 2), H - 1): end}, seq=ioi.toks.shape[1]
    ).combine(ablation_module.mlp_knockout(mlp_means, [L - 1], seq=ioi.toks.shape[1]))
    compare("path -> logits with a knockout (2 heads at END, last MLP)", *to_logits,
            _sample_senders(L, H, L), knockout=knockout)
    return out, sample


# ----------------------------------------------------------------------------------------------
# Activation patching
# ----------------------------------------------------------------------------------------------


def _activation_comparisons(model, ioi, abc, metric, progress: bool) -> tuple[list[Comparison], dict]:
    import transformer_lens.patching as tl_patching

    L, H = model.cfg.n_layers, model.cfg.n_heads
    _, clean_cache = model.run_with_cache(ioi.toks)
    corrupted = abc.toks
    # Positions common to every prompt: the last token before any padding, and one early one.
    last_common = int(ioi.word_idx["END"].min())
    positions = sorted({max(0, last_common - 3), last_common})
    layers = sorted({0, L // 2, L - 1})
    out: list[Comparison] = []

    fast = activation_module.get_act_patch_resid_pre(
        model, corrupted, clean_cache, metric, positions=positions, progress=progress)
    cells = [(layer, j, p) for layer in layers for j, p in enumerate(positions)]
    index = pd.DataFrame([(layer, p) for layer, _, p in cells], columns=["layer", "pos"])
    ref = tl_patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric,
                                                         index_axis_names=None, index_df=index)
    fast_values = torch.stack([fast[layer, j] for layer, j, _ in cells])
    diff, count = _max_diff(fast_values, ref)
    out.append(Comparison("activation: resid_pre", "ioi.patching.get_act_patch_resid_pre",
                          "transformer_lens.patching.get_act_patch_resid_pre", diff, count))

    pos = last_common
    every = activation_module.get_act_patch_attn_head_by_pos_every(
        model, corrupted, clean_cache, metric, positions=[pos], progress=progress)  # [5, L, 1, H]
    head_cells = [(layer, (i * 5 + 1) % H) for i, layer in enumerate(layers)]
    for t, kind in enumerate(HEAD_KINDS):
        if kind == "pattern":
            index = pd.DataFrame([(l, h, pos) for l, h in head_cells], columns=["layer", "head_index", "dest_pos"])
        else:
            index = pd.DataFrame([(l, pos, h) for l, h in head_cells], columns=["layer", "pos", "head"])
        ref = getattr(tl_patching, TL_HEAD_BY_POS[kind])(model, corrupted, clean_cache, metric,
                                                         index_axis_names=None, index_df=index)
        fast_values = torch.stack([every[t, l, 0, h] for l, h in head_cells])
        diff, count = _max_diff(fast_values, ref)
        out.append(Comparison(f"activation: head {kind} by position",
                              "ioi.patching.get_act_patch_attn_head_by_pos_every",
                              f"transformer_lens.patching.{TL_HEAD_BY_POS[kind]}", diff, count))
    sample = {"resid_pre": {"layers": layers, "positions": positions},
              "head_by_pos": {"heads": [list(c) for c in head_cells], "position": pos},
              "fast_path": activation_module.unsupported_reason(model) or "fast engine"}
    return out, sample


# ----------------------------------------------------------------------------------------------
# Knockouts
# ----------------------------------------------------------------------------------------------


def hooked_knockout_logits(model, toks: Tensor, ablation) -> Tensor:
    """The hooked reference: one bridge forward with ``torch.where(keep, act, means)`` on every
    ablated layer's ``hook_z`` / ``hook_mlp_out`` (:meth:`ioi.ablation.Ablation.hooks`)."""
    return model.run_with_hooks(toks, fwd_hooks=ablation.hooks())


def _knockout_comparisons(model, ioi, metric, means, mlp_means, circuit: dict) -> tuple[list[Comparison], dict]:
    toks, seq = ioi.toks, ioi.toks.shape[1]
    L = model.cfg.n_layers
    k_set = list(circuit)[:2]
    end = ioi.word_idx["END"]
    cases = [
        ("F(C)", lambda: ablation_module.evaluate_circuit(model, toks, metric, means, circuit),
         lambda: ablation_module.ablate_circuit(means, circuit, seq=seq)),
        ("F(C\\K)", lambda: ablation_module.evaluate_circuit(
            model, toks, metric, means, circuit, knockout=k_set, knockout_mode="all_positions"),
         lambda: ablation_module.ablate_circuit(means, circuit, knockout=k_set,
                                                knockout_mode="all_positions", seq=seq)),
        ("F(M\\K)", lambda: ablation_module.evaluate_circuit(
            model, toks, metric, means, circuit, knockout=k_set, knockout_mode="relevant_positions"),
         lambda: ablation_module.ablate_circuit(means, circuit, knockout=k_set,
                                                knockout_mode="relevant_positions", seq=seq)),
        ("head knockout at END", lambda: ablation_module.knockout_heads(
            model, toks, metric, means, {h: end for h in k_set}),
         lambda: ablation_module.head_knockout(means, {h: end for h in k_set}, seq=seq)),
        ("MLP knockout", lambda: ablation_module.knockout_mlps(model, toks, metric, mlp_means, [L - 1]),
         lambda: ablation_module.mlp_knockout(mlp_means, [L - 1], seq=seq)),
    ]
    out = []
    for name, fast_fn, ablation_fn in cases:
        fast = torch.as_tensor(fast_fn())
        ref = torch.as_tensor(metric(hooked_knockout_logits(model, toks, ablation_fn())))
        diff, count = _max_diff(fast.mean(-1), ref.mean(-1))
        out.append(Comparison(f"knockout: {name}", "ioi.ablation", "hooked bridge forward (Ablation.hooks)",
                              diff, count, per_prompt_max_abs_diff=_max_diff(fast, ref)[0]))
    sample = {"circuit_heads": [list(h) for h in circuit], "K": [list(h) for h in k_set], "mlp": L - 1}
    return out, sample


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def _guarded(group: str, fn: Callable, *args) -> tuple[list[Comparison], dict]:
    """``fn(*args)``; a fast path that raises (its own consistency check, an unsupported model)
    counts as a failed comparison of the whole group, with the error quoted."""
    try:
        return fn(*args)
    except (RuntimeError, ValueError, NotImplementedError) as err:
        if isinstance(err, SelfCheckError):
            raise
        return [Comparison(f"{group} all (the fast path raised)", group, "reference", math.inf, 0,
                           error=f"{type(err).__name__}: {err}")], {"error": str(err)}


@contextlib.contextmanager
def _quiet_tqdm(quiet: bool) -> Iterator[None]:
    """Silence every tqdm bar created inside (tqdm reads ``TQDM_DISABLE`` at each bar)."""
    previous = os.environ.get("TQDM_DISABLE")
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous


@torch.no_grad()
def run_selfcheck(
    model,
    *,
    model_spec: str,
    n: int = DEFAULT_N_PROMPTS,
    seed: int = 0,
    dataset_settings: Mapping[str, Any] | None = None,
    tolerance: float = TOLERANCE,
    progress: bool = False,
    raise_on_failure: bool = True,
) -> SelfCheckReport:
    """Compare every fast path with its reference on ``model`` (see the module docstring).

    Raises :class:`SelfCheckError` (with :meth:`SelfCheckReport.failure_message`) when any
    comparison exceeds ``tolerance`` and ``raise_on_failure``; returns the report otherwise.
    """
    from ioi.metrics import LogitDiff

    device = next(model.parameters()).device
    ioi, abc = _sample_datasets(n, seed, dataset_settings)
    ioi, abc = ioi.to(device), abc.to(device)
    per_prompt = LogitDiff.from_dataset(ioi, per_prompt=True)
    mean_ld = LogitDiff.from_dataset(ioi)
    means = ablation_module.compute_template_means(model, abc.toks, ioi.groups)
    mlp_means = ablation_module.compute_template_means(model, abc.toks, ioi.groups, component="mlp_out")
    circuit = _sample_circuit(model, model_spec, ioi.word_idx)

    path, path_sample = _guarded("path ->", _path_comparisons,
                                 model, ioi, abc, per_prompt, means, mlp_means, progress)
    with _quiet_tqdm(not progress):  # transformer_lens.patching draws its own bars
        act, act_sample = _guarded("activation:", _activation_comparisons,
                                   model, ioi, abc, mean_ld, progress)
    knock, knock_sample = _guarded("knockout:", _knockout_comparisons,
                                   model, ioi, per_prompt, means, mlp_means, circuit)
    comparisons = path + act + knock
    for comparison in comparisons:
        comparison.tolerance = tolerance
    report = SelfCheckReport(
        comparisons=comparisons,
        n_prompts=n,
        sample={"path": path_sample, "activation": act_sample, "knockout": knock_sample,
                "seed": seed, "prepend_bos": bool(ioi.prepend_bos)},
        tolerance=tolerance,
    )
    if raise_on_failure and not report.passed:
        raise SelfCheckError(report.failure_message(model_spec))
    return report

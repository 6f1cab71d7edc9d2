"""Forward passes that unembed only the rows a metric reads.

The IOI metrics read one position per prompt (its END). A full forward pass unembeds every
position against the whole vocabulary (``batch * seq * d_model * d_vocab`` multiply-adds, and a
``batch * seq * d_vocab`` float array: most of the cost for a small model, a third of it for
GPT-2 small). Here the forward pass stops at the unembedding's input (``unembed.hook_in``, the
residual stream after ``ln_final``) and only the END rows are unembedded, with the model's own
``W_U`` and ``b_U``:

    end_logits(model, toks, end)[i] == model(toks)[i, end[i]]        (up to fp32 rounding; tested)

Any forward hooks (ablations, patches) run as usual on the way.

Without hooks, on the models :func:`ioi.plain_forward.unavailable_reason` accepts (GPT-2
architecture, float32), ``end_logits``, ``final_residual`` and ``cache_activations`` run the
plain-tensor forward of :mod:`ioi.plain_forward` (the same numbers, no bridge modules, only END rows
after the last layer's attention). ``engine="bridge"`` (or ``IOI_FORWARD=bridge`` in the
environment) forces the hooked bridge pass, which stays the reference the plain forward is tested
against; ``engine="plain"`` requires the plain forward (an error says why it cannot run).
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ioi import plain_forward
from ioi.validation import check_tokens

UNEMBED_INPUT = "unembed.hook_in"

Engine = Literal["auto", "plain", "bridge"]
ENGINES = ("auto", "plain", "bridge")


def use_plain_forward(model, engine: Engine = "auto", fwd_hooks: Sequence = ()) -> bool:
    """Whether a forward without the bridge serves the call: no ``fwd_hooks`` and a model the plain
    forward reproduces (``engine="auto"``); ``"bridge"`` never; ``"plain"`` always, or an error."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}; got {engine!r}.")
    if engine == "bridge":
        return False
    reason = "forward hooks were given (hooks run on the bridge)" if fwd_hooks else \
        plain_forward.unavailable_reason(model)
    if engine == "plain" and reason is not None:
        raise ValueError(f"engine='plain' cannot run this forward: {reason}. Use engine='auto' or 'bridge'.")
    return reason is None


class _StopForward(Exception):
    """Raised from the unembedding-input hook: nothing after it is needed."""


@torch.no_grad()
def final_residual(
    model, toks: Int[Tensor, "batch seq"], *, fwd_hooks: Sequence = (), engine: Engine = "auto"
) -> Float[Tensor, "batch seq d_model"]:
    """The residual stream entering the unembedding (after ``ln_final``), with ``fwd_hooks`` on.

    The forward pass is cut at ``unembed.hook_in``, so no logits are computed (without hooks: the
    plain forward, see the module docstring).
    """
    toks = check_tokens(model, toks, "toks")
    if use_plain_forward(model, engine, fwd_hooks):
        return plain_forward.cache(plain_forward.weights(model), toks, [UNEMBED_INPUT])[UNEMBED_INPUT]
    captured: dict[str, Tensor] = {}

    def capture(x, hook):
        captured["x"] = x
        raise _StopForward

    try:
        model.run_with_hooks(toks, fwd_hooks=[*fwd_hooks, (UNEMBED_INPUT, capture)])
    except _StopForward:
        pass
    if "x" not in captured:
        raise RuntimeError(f"The model has no {UNEMBED_INPUT!r} hook point, or it did not fire.")
    return captured["x"]


@torch.no_grad()
def cache_activations(
    model,
    toks: Int[Tensor, "batch seq"],
    names: Sequence[str],
    *,
    fwd_hooks: Sequence = (),
    engine: Engine = "auto",
) -> dict[str, Tensor]:
    """The activations at hook points ``names`` (a dict name -> tensor).

    The forward pass stops as soon as the last of ``names`` has fired (so caching
    ``blocks.0.hook_resid_post`` runs one block), and never unembeds. ``run_with_cache`` on the
    bridge always computes the full logits (``stop_at_layer`` is not honoured by it).

    Without hooks, when every name is one :mod:`ioi.plain_forward` serves
    (``plain_forward.SERVED_HOOKS``: residual stream, ``attn_out``/``mlp_out``, ``q``/``k``/``v``/
    ``z``/``pattern``, embeddings, ``ln_final``), the plain forward computes them (same values,
    shapes, dtype and device); any other name sends the whole call to the bridge.
    """
    toks = check_tokens(model, toks, "toks")
    if use_plain_forward(model, engine, fwd_hooks):
        unserved = [n for n in names if plain_forward.parse_hook(n, model.cfg.n_layers) is None]
        if not unserved:
            return plain_forward.cache(plain_forward.weights(model), toks, list(dict.fromkeys(names)))
        if engine == "plain":
            raise ValueError(f"engine='plain' does not serve the hook points {unserved[:5]}.")
    wanted = set(names)
    store: dict[str, Tensor] = {}

    def keeper(name: str):
        # stored under the name asked for: the bridge's hook.name is the canonical point, and
        # several TransformerLens names (hook_resid_pre, hook_in, ...) alias one point
        def keep(x, hook):
            store[name] = x.detach()
            if wanted.issubset(store):
                raise _StopForward
            return x

        return keep

    try:
        model.run_with_hooks(toks, fwd_hooks=[*fwd_hooks, *((name, keeper(name)) for name in wanted)])
    except _StopForward:
        pass
    missing = sorted(wanted - set(store))
    if missing:
        raise KeyError(f"Hook points that did not fire: {missing[:5]}")
    return store


def unembed_rows(model, rows: Float[Tensor, "... d_model"]) -> Float[Tensor, "... vocab"]:
    """``rows @ W_U + b_U``: the logits of residual rows already through ``ln_final``."""
    logits = rows @ model.W_U
    b_U = getattr(model, "b_U", None)
    return logits if b_U is None else logits + b_U


def batch_size_for(model, seq_len: int, memory_budget_mb: float) -> int:
    """Prompts per forward pass so that the activations stay within ``memory_budget_mb``."""
    cfg = model.cfg
    floats_per_prompt = seq_len * (16 * cfg.d_model + 4 * cfg.d_mlp + cfg.n_heads * seq_len * 2) + cfg.d_vocab
    return max(1, int(memory_budget_mb * 2**20 / (4 * floats_per_prompt)))


@torch.no_grad()
def end_logits(
    model,
    toks: Int[Tensor, "batch seq"],
    end_idx: Int[Tensor, "batch"],
    *,
    fwd_hooks: Sequence = (),
    memory_budget_mb: float | None = 2048,
    engine: Engine = "auto",
) -> Float[Tensor, "batch vocab"]:
    """Logits at each prompt's own END, ``[batch, vocab]`` (float32, on CPU).

    Without hooks, prompts are run in chunks that fit ``memory_budget_mb`` (``None``: no limit),
    grouped by END and each chunk cut after its last END: with causal attention nothing after a
    prompt's END changes its END logits, so right padding is never computed. The plain forward
    (module docstring) also ends a chunk where END changes once it is large enough
    (:func:`ioi.plain_forward.length_chunks`), so each length runs unpadded. Hooks see the batch
    as given (one chunk, full length, on the bridge), since they may hold per-prompt tensors.
    """
    device = model.W_U.device
    toks = check_tokens(model, toks, "toks")
    end_idx = torch.as_tensor(end_idx).long()
    if end_idx.shape != toks.shape[:1]:
        raise ValueError(f"end_idx must have one entry per prompt: {tuple(end_idx.shape)} vs {tuple(toks.shape)}.")
    n = toks.shape[0]
    end_cpu = end_idx.cpu()  # chunk lengths are read on the host: one copy, before the loop
    if n and (int(end_cpu.min()) < 0 or int(end_cpu.max()) >= toks.shape[1]):
        raise ValueError(f"end_idx holds positions {int(end_cpu.min())}..{int(end_cpu.max())} outside the "
                         f"{toks.shape[1]} token positions: pass each prompt's END index (word_idx['END']).")
    if use_plain_forward(model, engine, fwd_hooks):
        step = n if memory_budget_mb is None else batch_size_for(model, toks.shape[1], memory_budget_mb)
        return plain_forward.end_logits(plain_forward.weights(model), toks, end_cpu, max(1, step))
    if fwd_hooks:
        resid = final_residual(model, toks.to(device), fwd_hooks=fwd_hooks)
        rows = torch.arange(n, device=device)
        return unembed_rows(model, resid[rows, end_idx.to(device)]).float().cpu()
    step = n if memory_budget_mb is None else batch_size_for(model, toks.shape[1], memory_budget_mb)
    order = torch.argsort(end_cpu, stable=True)
    out = torch.empty(n, model.cfg.d_vocab, dtype=torch.float32, device="cpu")  # the result is on the CPU
    for start in range(0, n, step):
        chunk = order[start : start + step]
        ends = end_cpu[chunk]
        part = toks[chunk, : int(ends.max()) + 1].to(device)
        resid = final_residual(model, part, engine="bridge")
        rows = torch.arange(part.shape[0], device=device)
        out[chunk] = unembed_rows(model, resid[rows, ends.to(device)]).float().cpu()
    return out

"""Position tables, shared prefixes and memory-based chunk sizes for the activation-patching sweeps."""

from __future__ import annotations

from typing import Mapping, Sequence, Union

import torch
from jaxtyping import Int
from torch import Tensor

PositionsArg = Union[
    None,
    Sequence[int],
    Int[Tensor, "n_pos"],
    Int[Tensor, "n_pos batch"],
    Mapping[str, Union[int, Int[Tensor, "batch"]]],
    Sequence[Int[Tensor, "batch"]],
]

DEFAULT_MEMORY_BUDGET_MB = {"cpu": 1024, "cuda": 4096}
# On CPU, float32 matmuls run fastest with a few thousand rows (measured: 2-core x86, d_model 768);
# bigger batches only add memory traffic. On GPU, bigger is better (up to the memory budget).
TARGET_ROWS = {"cpu": 2048}


def position_table(
    positions: PositionsArg, n_batch: int, n_pos: int, device: torch.device
) -> tuple[Int[Tensor, "n_entries batch"], list[str]]:
    """Normalise ``positions=`` to a ``[n_entries, batch]`` table of per-prompt positions + labels.

    * ``None``: every position ``0 .. n_pos - 1`` (TransformerLens's position axis);
    * ints (list, tuple or 1-D tensor): those absolute positions, the same for every prompt;
    * a mapping ``label -> int | LongTensor[batch]`` (e.g. ``{"S2": ds.word_idx["S2"], ...}``) or
      a ``[n_entries, batch]`` tensor / list of ``[batch]`` tensors: per-prompt positions (prompt
      ``n`` is patched at its own position ``table[i, n]``).
    """
    labels: list[str]
    if positions is None:
        table = torch.arange(n_pos, device=device)[:, None].expand(n_pos, n_batch)
        labels = [str(p) for p in range(n_pos)]
    elif isinstance(positions, Mapping):
        labels = [str(key) for key in positions]
        rows = []
        for value in positions.values():
            value = torch.as_tensor(value, device=device).long()
            rows.append(value.expand(n_batch) if value.ndim == 0 else value)
        table = torch.stack(rows) if rows else torch.zeros(0, n_batch, dtype=torch.long, device=device)
    elif isinstance(positions, Tensor):
        positions = positions.to(device).long()
        if positions.ndim == 1:
            table = positions[:, None].expand(len(positions), n_batch)
            labels = [str(int(p)) for p in positions]
        elif positions.ndim == 2:
            table = positions
            labels = [f"entry{i}" for i in range(len(positions))]
        else:
            raise ValueError(f"positions tensor must be 1-D or 2-D, got shape {tuple(positions.shape)}")
    else:
        items = list(positions)
        if all(isinstance(p, int) or (isinstance(p, Tensor) and p.ndim == 0) for p in items):
            ints = [int(p) for p in items]
            table = torch.tensor(ints, device=device, dtype=torch.long)[:, None].expand(len(ints), n_batch)
            labels = [str(p) for p in ints]
        else:
            table = torch.stack([torch.as_tensor(p, device=device).long() for p in items])
            labels = [f"entry{i}" for i in range(len(items))]
    table = table.contiguous()
    if table.ndim != 2 or table.shape[1] != n_batch:
        raise ValueError(
            f"positions must give one position per prompt ({n_batch} prompts); got a table of shape "
            f"{tuple(table.shape)}"
        )
    if table.numel() and (int(table.min()) < 0 or int(table.max()) >= n_pos):
        raise ValueError(
            f"positions must lie in [0, {n_pos}) (negative indices are not accepted); got "
            f"[{int(table.min())}, {int(table.max())}]"
        )
    return table, labels


def shared_prefix_lengths(
    clean_tokens: Int[Tensor, "batch pos"] | None,
    corrupted_tokens: Int[Tensor, "batch pos"],
    clean_embed: Tensor | None = None,
    corrupted_embed: Tensor | None = None,
) -> Int[Tensor, "batch"]:
    """Per prompt, how many leading tokens the clean and corrupted inputs share.

    Causal attention makes every activation at those positions identical in the two runs, so a
    patch changes nothing there. From the tokens when known; otherwise from the two runs'
    ``blocks.0.hook_resid_pre`` (equal rows = equal tokens); zeros when neither is available.
    """
    n_batch, n_pos = corrupted_tokens.shape
    if clean_tokens is not None:
        clean_tokens = clean_tokens.to(corrupted_tokens.device)
        if clean_tokens.shape != corrupted_tokens.shape:
            raise ValueError(
                f"clean_tokens {tuple(clean_tokens.shape)} and corrupted_tokens "
                f"{tuple(corrupted_tokens.shape)} must have the same shape"
            )
        same = clean_tokens == corrupted_tokens
    elif clean_embed is not None and corrupted_embed is not None and clean_embed.shape == corrupted_embed.shape:
        diff = (clean_embed.to(corrupted_embed.device) - corrupted_embed).abs().amax(-1)
        same = diff <= 1e-6 * (1.0 + corrupted_embed.abs().amax(-1))
    else:
        return torch.zeros(n_batch, dtype=torch.long, device=corrupted_tokens.device)
    return same.long().cumprod(1).sum(1)


def bytes_per_patch(
    *, n_rows: int, n_batch: int, n_pos: int, d_model: int, n_heads: int, d_head: int, d_mlp: int
) -> int:
    """A generous estimate of the peak float32 memory one patched stream needs in the resume pass."""
    hd = n_heads * d_head
    floats = (
        n_rows * (5 * d_model + 3 * hd + 3 * max(d_mlp, 1))  # residual, LN, qkv, MLP hidden (+ act)
        + n_batch * n_pos * (3 * hd + hd)  # full-layout q|k|v and z
        + n_batch * n_heads * n_pos * n_pos * 2  # attention scores / pattern
    )
    return 4 * floats


def chunk_size(
    *,
    batch_size: int | None,
    memory_budget_mb: float | None,
    device: torch.device,
    per_patch_bytes: int,
    rows_per_patch: int,
) -> int:
    """Patches per resume pass: ``batch_size`` if given, else as many as fit the memory budget
    (on CPU also at most about ``TARGET_ROWS`` rows per matmul)."""
    if batch_size is not None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return int(batch_size)
    if memory_budget_mb is None:
        memory_budget_mb = DEFAULT_MEMORY_BUDGET_MB.get(device.type, 1024)
    k = max(1, int(memory_budget_mb * 2**20 // max(per_patch_bytes, 1)))
    target = TARGET_ROWS.get(device.type)
    if target is not None:
        k = min(k, max(1, -(-target // max(rows_per_patch, 1))))
    return k

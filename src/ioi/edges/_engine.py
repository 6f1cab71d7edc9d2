"""The plain-tensor forward behind edge patching and edge attribution.

A GPT-2 forward (the activation engine's :class:`ioi.patching._fast_forward.NetWeights`: same
weights, LayerNorms, MLP and unembedding) in which every receiver has its own input:

    x_r = resid(r) + sum_slot sum_s M[slot, r, s] * delta_s   (at the slot's token positions)

``resid(r)`` is the residual stream where ``r`` reads it in *this* run (``resid_pre`` of the head's
layer for q/k/v, ``resid_mid`` for an MLP, the final residual for the logits), ``delta_s`` the
sender's difference: ``target_s - out_s`` with ``out_s`` the sender's output in this run (edge
patching; ``target`` = the corrupted run's outputs or means) or a fixed tensor (attribution).
``K`` masks ``M`` run side by side as a leading batch axis. With ``M = 0`` this is the plain
forward. Each head projects its own q, k and v input (batched over heads); a layer whose receivers
carry no difference in any of the ``K`` sets takes the fused projection of the shared input.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from typing import Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from ioi.edges.graph import EdgeGraph
from ioi.patching._fast_forward import NetWeights


def slot_token_index(
    graph: EdgeGraph, word_idx: dict | None, n_prompts: int, n_pos: int, device: torch.device
) -> list[Tensor | None]:
    """Per position slot of ``graph``, the flat ``[prompt * n_pos + pos]`` indices of its tokens
    (``None``: every token). ``"other"`` is every position no other label of the graph names.
    Positions at or after ``n_pos`` (the forward is cut after the last position a metric reads)
    are dropped: causal attention makes them irrelevant."""
    if graph.positions is None:
        return [None]
    if word_idx is None:
        raise ValueError(f"{graph!r} has position-specific edges: pass word_idx (e.g. dataset.word_idx) "
                         "with a LongTensor[N] per label.")
    rows = torch.arange(n_prompts, device=device)
    named: dict[str, Tensor] = {}
    for label in graph.positions:
        if label == "other":
            continue
        if label not in word_idx:
            raise ValueError(f"word_idx has no {label!r} (has {sorted(word_idx)}): the graph's positions "
                             f"are {graph.positions}.")
        pos = torch.as_tensor(word_idx[label], device=device).long()
        if pos.shape != (n_prompts,):
            raise ValueError(f"word_idx[{label!r}] must be LongTensor[{n_prompts}], got {tuple(pos.shape)}.")
        if int(pos.min()) < 0:
            raise ValueError(f"word_idx[{label!r}] has negative positions.")
        inside = pos < n_pos  # positions after the metric's last read position cannot matter
        named[label] = (rows * n_pos + pos)[inside]
    out: list[Tensor | None] = []
    for label in graph.positions:
        if label == "other":
            taken = torch.zeros(n_prompts * n_pos, dtype=torch.bool, device=device)
            for idx in named.values():
                taken[idx] = True
            out.append((~taken).nonzero()[:, 0])
        else:
            out.append(named[label])
    return out


_HEAD_SUMS_LOCK = threading.Lock()


class EdgeForward:
    """The receiver-input forward of one model on one graph (see the module docstring)."""

    def __init__(self, net: NetWeights, graph: EdgeGraph):
        if graph.n_layers != net.n_layers or graph.n_heads != net.n_heads or graph.attn_only != net.attn_only:
            raise ValueError(f"{graph!r} does not match the model ({net.n_layers} layers x {net.n_heads} heads"
                             f"{', attention only' if net.attn_only else ''}): build it with "
                             "EdgeGraph.from_model(model).")
        self.net, self.graph = net, graph
        L, H, D, dh = net.n_layers, net.n_heads, net.d_model, net.d_head
        # per-head q|k|v weights [L, H, 3, D, dh] and biases [L, H, 3, dh]
        self.W_hqkv = net.W_qkv.view(L, D, 3, H, dh).permute(0, 3, 2, 1, 4).contiguous()
        self.b_hqkv = net.b_qkv.view(L, 3, H, dh).permute(0, 2, 1, 3).contiguous()
        self.head_senders = [graph.sender_of(f"a{layer}.h0") for layer in range(L)]
        self.head_receivers = [graph.receiver_of(f"a{layer}.h0.q") for layer in range(L)]
        self.mlp_senders = [None if net.attn_only else graph.sender_of(f"m{layer}") for layer in range(L)]
        self.mlp_receivers = [None if net.attn_only else graph.receiver_of(f"m{layer}") for layer in range(L)]
        self.n_senders = len(graph.senders)
        self.n_receivers = len(graph.receivers)
        # how many senders precede each receiver (the columns its mask block has)
        reads = torch.full((self.n_receivers,), self.n_senders, dtype=torch.long, device="cpu")
        for layer in range(L):
            reads[self.head_receivers[layer] : self.head_receivers[layer] + 3 * H] = self.head_senders[layer]
            if not net.attn_only:
                reads[self.mlp_receivers[layer]] = self.mlp_senders[layer]
        self._senders_read = reads
        # the stage at which each receiver reads (see n_stages) and at which each sender writes
        stage = torch.full((self.n_receivers,), 2 * L, dtype=torch.long, device="cpu")
        writes = torch.full((self.n_senders,), -1, dtype=torch.long, device="cpu")  # embed: before all
        for layer in range(L):
            r0, s0 = self.head_receivers[layer], self.head_senders[layer]
            stage[r0 : r0 + 3 * H] = 2 * layer
            writes[s0 : s0 + H] = 2 * layer
            if not net.attn_only:
                stage[self.mlp_receivers[layer]] = 2 * layer + 1
                writes[self.mlp_senders[layer]] = 2 * layer + 1
        self.receiver_stage, self.sender_stage = stage, writes

    @property
    def device(self) -> torch.device:
        return self.net.device

    @property
    def n_stages(self) -> int:
        """Stages of a run: each layer's head inputs (``2 * layer``) and MLP input (``2 * layer + 1``),
        then the logits (``2 * n_layers``); an attention-only model skips the odd ones."""
        return 2 * self.net.n_layers + 1

    def stage_of(self, g: int) -> tuple[int, str]:
        """``(layer, "attn" | "mlp" | "final")`` of stage ``g``."""
        if g == 2 * self.net.n_layers:
            return self.net.n_layers, "final"
        return g // 2, ("mlp" if g % 2 else "attn")

    def senders_before(self, g: int) -> int:
        """How many senders write before stage ``g`` reads (a prefix of ``graph.senders``)."""
        layer, stage = self.stage_of(g)
        if stage == "final":
            return self.n_senders
        return self.mlp_senders[layer] if stage == "mlp" else self.head_senders[layer]

    # -- pieces ---------------------------------------------------------------------------------

    def head_target_sums(self, target: Float[Tensor, "senders n pos d"]) -> Float[Tensor, "n_layers T d"]:
        """Per layer, the sum over its heads of ``target`` ``[L, n * pos, d]``: kept while ``target``
        is the same unmodified tensor (every set chunk of one :func:`patch_edges` call shares it;
        a few targets at once, as the prompt chunks on parallel workers)."""
        version = None if target.is_inference() else target._version  # inference tensors keep no counter
        key = (id(target), version, target.data_ptr(), tuple(target.shape))
        cache = getattr(self, "_head_sums", None)
        if not isinstance(cache, dict):
            cache = self._head_sums = {}
        cached = cache.get(key)
        if cached is not None and cached[0]() is target:
            return cached[1]
        flat = target.reshape(self.n_senders, -1, self.net.d_model)
        H = self.net.n_heads
        sums = torch.stack([flat[s0 : s0 + H].sum(0) for s0 in self.head_senders])
        with _HEAD_SUMS_LOCK:  # worker threads share the engine
            for old in [k for k, (ref, _) in cache.items() if ref() is None]:
                del cache[old]  # targets no longer alive
            while len(cache) >= 8:
                del cache[next(iter(cache))]
            cache[key] = (weakref.ref(target), sums)
        return sums

    def embed(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        return self.net.W_E[tokens] + self.net.W_pos[: tokens.shape[1]]

    @staticmethod
    def mix_add(
        masks: Float[Tensor, "k slots r s"],
        delta: Float[Tensor, "kd s T d"],
        slot_idx: Sequence[Tensor | None],
        differentiable: bool = False,
    ) -> Tensor | None:
        """``[k, r, T, d]``: each receiver's masked sum of sender differences (None when all zero)."""
        k, _, n_r, n_s = masks.shape
        T, d = delta.shape[-2:]
        if n_s == 0:
            return None
        total = None
        for j, idx in enumerate(slot_idx):
            m = masks[:, j]
            part = delta if idx is None else delta.index_select(2, idx)
            width = part.shape[2]
            if part.shape[0] == 1:
                add = (m.reshape(k * n_r, n_s) @ part[0].reshape(n_s, width * d)).view(k, n_r, width, d)
            else:
                add = torch.bmm(m, part.reshape(k, n_s, width * d)).view(k, n_r, width, d)
            if idx is not None:
                total = add.new_zeros(k, n_r, T, d) if total is None else total
                total = total.index_add(2, idx, add)
            else:
                total = add if total is None else total + add
        return total

    def senders_read(self, hmasks: Tensor, slot_idx: Sequence[Tensor | None]) -> Tensor:
        """``BoolTensor[senders]`` (CPU): the senders whose own difference some receiver of some set
        reads in the grouped (no-autograd) path. A receiver reads the senders its mask row names,
        or, when the row names more than half of its senders (one slot, every token), the running
        sum of every difference and the senders the row leaves out (see :meth:`_distinct_inputs`)."""
        S = hmasks.shape[-1]
        nonzero = hmasks != 0  # [k, slots, R, S]
        if hmasks.shape[1] == 1 and slot_idx[0] is None:
            rows = nonzero[:, 0]
            n_s = self._senders_read[None, :, None]
            complement = rows.sum(-1, keepdim=True) > n_s / 2
            before = torch.arange(S, device="cpu")[None, None, :] < n_s  # host masks
            used = torch.where(complement, ~rows & before, rows)
            return used.any(0).any(0)
        return nonzero.any(0).any(0).any(0)

    # -- the forward ------------------------------------------------------------------------------

    def run(
        self,
        tokens: Int[Tensor, "n pos"],
        masks: Float[Tensor, "k slots receivers senders"],
        slot_idx: Sequence[Tensor | None],
        *,
        target: Float[Tensor, "senders n pos d"] | None = None,
        fixed_delta: Float[Tensor, "senders n pos d"] | None = None,
        embed: Float[Tensor, "n pos d"] | None = None,
        keep_outputs: bool = False,
        differentiable: bool = False,
        start: "EngineState | None" = None,
        end_pos: Int[Tensor, "n"] | None = None,
        host_masks: Float[Tensor, "k slots receivers senders"] | None = None,
        trail: "Trail | None" = None,
    ) -> tuple[Float[Tensor, "k n pos d"], Tensor | None]:
        """Final residual streams (the logits receiver's input) of the ``k`` mask sets.

        ``target``: differences are ``target - this run's outputs``; ``fixed_delta``: given
        differences. ``embed`` overrides the embedding sender's output (the clean tokens'
        embedding by default). ``keep_outputs`` also returns every sender's output
        ``[k, senders, n, pos, d]`` (senders before ``start`` are left zero). ``start`` resumes
        from a saved state (:meth:`clean_states`): every mask must be zero before it.

        ``end_pos`` (each prompt's END position; not with ``keep_outputs``): only those rows are
        returned (``[k, n, 1, d]``), and the work that can reach nothing else is done only there:
        after the last layer's attention (its keys and values still read every position), the
        heads' outputs, the last MLP, the logits' input and the differences they carry are
        computed at the END rows alone. Causal attention and the per-token MLP make this exact.

        ``host_masks``: ``masks`` on the CPU (when ``masks`` is on an accelerator; else copied once
        here). Which receivers are patched, their distinct rows and the senders they read are
        decided from it, so the loops over layers and sets never wait on the device.

        ``trail`` (one set, ``k = 1``, with ``target``; see :class:`Trail`): resume from the previous
        run on the same ``tokens`` and ``target``. Receivers are in topological order; if this
        set's mask rows equal the previous set's for every receiver before stage ``g`` (the head
        inputs of a layer, its MLP input, the logits), the residual stream, every sender output and
        every difference before ``g`` are those of the previous run: the run starts at ``g`` from
        the residual saved there and the previous run's difference store (entries of senders
        before ``g`` kept, the rest overwritten in place, no copy). It starts earlier where a
        receiver at or after ``g`` reads a sender before ``g`` whose difference the previous runs
        left unwritten (heads no receiver read on their own), and at most at the last layer's
        attention when ``end_pos`` is given (after it only END rows are kept). The same numbers
        as a run from scratch up to float32 rounding (a layer's heads may have been summed by the
        fused or the per-head product, depending on which set computed them).
        """
        if end_pos is not None and keep_outputs:
            raise ValueError("end_pos restricts the last layer to END rows: it cannot keep every output.")
        net = self.net
        H, D = net.n_heads, net.d_model
        n, P = tokens.shape
        T = n * P
        k = masks.shape[0]
        if masks.device.type == "cpu":
            hmasks = masks
        else:
            hmasks = masks.detach().cpu() if host_masks is None else host_masks
            if hmasks.shape != masks.shape:
                raise ValueError(f"host_masks {tuple(hmasks.shape)} must be masks {tuple(masks.shape)} on the CPU.")
        deltas = _Deltas(k, self.n_senders, T, D, masks, fixed_delta=fixed_delta, target=target,
                         head_target_sums=None if target is None else self.head_target_sums(target))
        outputs = masks.new_zeros(k, self.n_senders, T, D) if keep_outputs else None
        # heads whose own difference nobody reads: only their sum is computed (the fused output)
        read = (self.senders_read(hmasks, slot_idx)
                if deltas.can_fuse_heads and not keep_outputs and not differentiable else None)
        first_layer, stage = 0, "attn"
        begin = 0  # the stage this run starts at (2 * layer, + 1 for the MLP; 2 * n_layers: the logits)
        if trail is not None:
            if k != 1 or target is None or start is not None or read is None or fixed_delta is not None:
                raise ValueError("trail= resumes one set (k = 1) with target=, from scratch (no start=, "
                                 "keep_outputs, fixed_delta or autograd).")
            begin = trail.begin(self, tokens, target, hmasks[0], read, end_pos is not None)
            deltas.continue_trail(trail, self.senders_before(begin) if begin else 0, begin)
            for s in trail.fill:
                lay = int(self.sender_stage[s]) // 2
                h = s - self.head_senders[lay]
                torch.addmm(deltas.target[s], trail.z[lay][0, h], net.W_O[lay][h], alpha=-1.0, out=trail.store[0, s])
                trail.unwritten[s] = False
        if begin > 0:
            first_layer, stage = self.stage_of(begin)
            resid = trail.resid[begin]
        elif start is None:
            emb = (self.embed(tokens) if embed is None else embed).reshape(1, T, D)
            deltas.computed(0, 1, emb[:, None])
            if outputs is not None:
                outputs[:, 0] = emb[0]
            resid = emb  # [1 or k, T, D]
        else:
            first_layer, stage, resid = start.layer, start.stage, start.resid
            deltas.resume(start.delta, start.n_senders, start.delta_sum())

        rows = None if end_pos is None else torch.arange(n, device=tokens.device) * P + end_pos.to(tokens.device).long()
        restricted = False

        def restrict(x: Tensor) -> Tensor:
            """From here on only the END rows: ``x`` ``[b, T, D]`` and the differences."""
            nonlocal restricted, slot_idx, T
            restricted, T = True, len(rows)
            slot_idx = deltas.restrict(rows, slot_idx)
            return x.index_select(1, rows)

        if rows is not None and (first_layer == net.n_layers or (first_layer == net.n_layers - 1 and stage == "mlp")):
            resid = restrict(resid)

        def receivers_input(base: Tensor, r0: int, r1: int, n_s: int) -> Tensor:
            """Every receiver's own input (autograd path: no structure read off the mask)."""
            add = deltas.mix_add(masks[:, :, r0:r1, :n_s], slot_idx, True)
            return None if add is None else base[:, None] + add

        for layer in range(first_layer, net.n_layers):
            if not (layer == first_layer and stage == "mlp") and stage != "final":
                if trail is not None:
                    trail.save(2 * layer, resid, deltas.total)
                r0, s0 = self.head_receivers[layer], self.head_senders[layer]
                block = hmasks[:, :, r0 : r0 + 3 * H, :s0]
                grouped = not differentiable and bool(block.any())
                x = receivers_input(resid, r0, r0 + 3 * H, s0) if differentiable else None  # [k, 3H, T, D]
                if grouped:
                    q, kk, v = self._grouped_qkv(layer, resid, block, deltas, slot_idx, n, P)
                    kz = k
                elif x is not None:
                    y = net.ln(x, net.ln1[layer]).view(k, H, 3, T, D)
                    qkv = torch.einsum("khitd,hide->khite", y, self.W_hqkv[layer]) + self.b_hqkv[layer][None, :, :, None]
                    q, kk, v = (qkv[:, :, i].reshape(k * H, n, P, -1) for i in range(3))
                    kz = k
                else:
                    kz = resid.shape[0]
                    flat = net.linear(net.ln(resid, net.ln1[layer]), net.W_qkv[layer], net.b_qkv[layer])
                    q, kk, v = (t.reshape(kz, n, P, H, -1).permute(0, 3, 1, 2, 4).reshape(kz * H, n, P, -1)
                                for t in flat.view(kz, T, 3, H * net.d_head).unbind(2))
                z = F.scaled_dot_product_attention(q, kk, v, is_causal=True, scale=net.attn_scales[layer])
                z = z.view(kz, H, T, net.d_head)
                if trail is not None:
                    trail.z[layer] = z
                if rows is not None and layer == net.n_layers - 1:
                    resid = restrict(resid)
                    z = z.index_select(2, rows)
                if deltas.can_fuse_heads and outputs is None and not differentiable:
                    # differences target - z @ W_O straight into the store (one GEMM per set), and
                    # the heads' summed output as sum(target) - sum(differences)
                    heads_read = None if read is None else read[s0 : s0 + H].nonzero()[:, 0].tolist()
                    if heads_read is not None and len(heads_read) <= H // 2:
                        z_flat = z.permute(0, 2, 1, 3).reshape(z.shape[0], z.shape[2], H * net.d_head)
                        attn_out = deltas.computed_heads_sum(layer, s0, s0 + H, z, z_flat, net.W_O[layer],
                                                             net.W_O_flat[layer], heads_read) + net.b_O[layer]
                    else:
                        attn_out = deltas.computed_heads(layer, s0, s0 + H, z, net.W_O[layer]) + net.b_O[layer]
                elif deltas.needs_outputs or outputs is not None:
                    head_out = torch.matmul(z, net.W_O[layer])  # [kz, H, T, D]
                    deltas.computed(s0, s0 + H, head_out)
                    if outputs is not None:
                        outputs[:, s0 : s0 + H] = head_out
                    attn_out = head_out.sum(1) + net.b_O[layer]
                else:
                    attn_out = net.linear(z.permute(0, 2, 1, 3).reshape(kz, T, H * net.d_head),
                                          net.W_O_flat[layer], net.b_O[layer])
                resid = resid + attn_out
            if net.attn_only or stage == "final":
                continue
            if trail is not None and not restricted:
                trail.save(2 * layer + 1, resid, deltas.total)
            rm, sm = self.mlp_receivers[layer], self.mlp_senders[layer]
            x = self._single_input(resid, masks[:, :, rm : rm + 1, :sm], hmasks[:, :, rm : rm + 1, :sm], deltas,
                                   slot_idx, differentiable)
            mlp_out = net.mlp(layer, resid if x is None else x)
            deltas.computed(sm, sm + 1, mlp_out[:, None])
            if outputs is not None:
                outputs[:, sm] = mlp_out
            resid = resid + mlp_out
        if trail is not None and not restricted:
            trail.save(2 * net.n_layers, resid, deltas.total)
        x = self._single_input(resid, masks[:, :, -1:, :], hmasks[:, :, -1:, :], deltas, slot_idx, differentiable)
        resid = resid if x is None else x
        if resid.shape[0] != k:
            resid = resid.expand(k, T, D)
        final = resid.reshape(k, n, 1, D) if restricted else resid.reshape(k, n, P, D)
        if outputs is not None:
            outputs = outputs.view(k, self.n_senders, n, P, D)
        return final, outputs

    # -- grouped receiver inputs (no autograd) ---------------------------------------------------
    #
    # Receivers of one block whose mask rows are equal read the same input, so each distinct row
    # is built once (and LayerNorm-ed once). A row is built from the senders it names, or, when
    # it names more than half of them (circuit evaluation: most edges patched), as
    # ``base + sum(all differences) - sum(differences of the senders it leaves out)``, with the
    # running sum of every difference so far; only the senders some row uses are read.

    def _distinct_inputs(self, base: Tensor, m: Tensor, deltas: "_Deltas", kk: int, slot_idx) -> tuple[Tensor, Tensor]:
        """For set ``kk`` with mask block ``m`` on the CPU: ``([U, T, D] inputs of the distinct rows
        (on the model's device), [R] row of each receiver (CPU))``."""
        n_slots, n_r, n_s = m.shape
        rows = m.permute(1, 0, 2).reshape(n_r, n_slots * n_s)
        uniq, inverse = torch.unique(rows, dim=0, return_inverse=True)
        U = uniq.shape[0]
        T, D = base.shape[-2:]
        if n_slots == 1 and slot_idx[0] is None:
            coef = uniq
            complement = coef.sum(1) > n_s / 2
            if bool(complement.any()):
                coef = torch.where(complement[:, None], coef - 1.0, coef)
            total = deltas.running_total(kk).reshape(1, T * D) if bool(complement.any()) else None
            out = deltas.combine(kk, coef, base.reshape(1, T * D), complement, total).view(U, T, D)
            return out, inverse
        out = base.expand(U, T, D).clone()
        for j, idx in enumerate(slot_idx):
            coef = uniq[:, j * n_s : (j + 1) * n_s]
            used = coef.abs().sum(0).nonzero()[:, 0]
            if not len(used):
                continue
            cols = deltas.columns(kk, used)
            c = coef[:, used].to(base.device)
            if idx is None:
                out.view(U, T * D).addmm_(c, cols.view(len(used), T * D))
            else:
                part = cols.index_select(1, idx)
                add = (c @ part.reshape(len(used), -1)).view(U, len(idx), D)
                out.index_add_(1, idx, add)
        return out, inverse

    def _grouped_qkv(self, layer: int, resid: Tensor, block: Tensor, deltas: "_Deltas", slot_idx, n: int, P: int):
        """q, k and v of every head of ``layer`` (``[k * H, n, P, d_head]`` each) from each receiver's
        own input: the distinct inputs of the block are built once (:meth:`_distinct_inputs`) and
        LayerNorm-ed once, and each receiver's projection ``LN1(x_u) @ W_r + b_r`` is one GEMM
        written straight into its slot of the output (``W_r`` a contiguous ``[d_model, d_head]``
        block of the per-head weights: no weight gather, no copy of the weights, no scatter)."""
        net = self.net
        H, dh = net.n_heads, net.d_head
        k = block.shape[0]
        T, D = resid.shape[-2:]
        W = self.W_hqkv[layer].reshape(3 * H, D, dh)
        b = self.b_hqkv[layer].reshape(3 * H, dh)
        out = resid.new_empty(k, 3 * H, T, dh)
        for kk in range(k):
            base = resid[min(kk, resid.shape[0] - 1)]
            x, inverse = self._distinct_inputs(base, block[kk], deltas, kk, slot_idx)
            y = net.ln(x, net.ln1[layer])
            counts = torch.bincount(inverse, minlength=x.shape[0])
            largest = int(counts.argmax())
            # fused only when few receivers are overwritten: each overwritten one is a wasted
            # [T, D] @ [D, d_head] GEMM (the rule was measured against per-group GEMMs with gathered
            # weights, at T ~ 830, D 768: 24 of 36 in one group, 37 ms fused vs 31 ms; 30 of 36
            # equal; 35 of 36 26 vs 29 ms)
            fuse = 6 * (3 * H - int(counts[largest])) <= 3 * H
            if fuse:
                # a group of at least five sixths of the receivers takes the fused projection of
                # every receiver (no weight copy); the other receivers are then overwritten
                fused = torch.addmm(net.b_qkv[layer], y[largest], net.W_qkv[layer])  # [T, (3, H, dh)]
                out[kk].view(H, 3, T, dh).copy_(fused.view(T, 3, H, dh).permute(2, 1, 0, 3))
            for r, u in enumerate(inverse.tolist()):
                if not (fuse and u == largest):
                    torch.addmm(b[r], y[u], W[r], out=out[kk, r])
        qkv = out.view(k, H, 3, n, P, dh)
        return tuple(qkv[:, :, i].reshape(k * H, n, P, dh) for i in range(3))

    def _single_input(self, resid: Tensor, block: Tensor, host_block: Tensor, deltas: "_Deltas", slot_idx,
                      differentiable: bool):
        """The input ``[k, T, D]`` of a one-receiver block (MLP, logits), None when unpatched
        (``host_block``: ``block`` on the CPU)."""
        if differentiable:
            add = deltas.mix_add(block, slot_idx, True)
            return resid + add[:, 0]
        if not bool(host_block.any()):
            return None
        k = block.shape[0]
        xs = [self._distinct_inputs(resid[min(kk, resid.shape[0] - 1)], host_block[kk], deltas, kk, slot_idx)[0][0]
              for kk in range(k)]
        return torch.stack(xs)


    def clean_states(self, tokens: Int[Tensor, "n pos"], target: Float[Tensor, "senders n pos d"]) -> dict:
        """Resumable states of the unpatched run on ``tokens``: ``{(layer, "attn" | "mlp"): state}``
        and ``{(n_layers, "final"): state}``, each with the residual stream where that stage reads
        it and every earlier sender's difference ``target - output``."""
        net = self.net
        n, P = tokens.shape
        T, D = n * P, net.d_model
        none = torch.zeros(1, 1, self.n_receivers, self.n_senders, device=self.device)
        _, outputs = self.run(tokens, none, [None], keep_outputs=True)
        outputs = outputs[0].reshape(self.n_senders, T, D)
        delta = (target.reshape(self.n_senders, T, D) - outputs)[None]
        states = {}
        resid = outputs[0][None].clone()
        for layer in range(net.n_layers):
            s0 = self.head_senders[layer]
            states[(layer, "attn")] = EngineState(layer, "attn", resid.clone(), delta, s0)
            resid = resid + outputs[s0 : s0 + net.n_heads].sum(0) + net.b_O[layer]
            if not net.attn_only:
                sm = self.mlp_senders[layer]
                states[(layer, "mlp")] = EngineState(layer, "mlp", resid.clone(), delta, sm)
                resid = resid + outputs[sm]
        states[(net.n_layers, "final")] = EngineState(net.n_layers, "final", resid, delta, self.n_senders)
        return states

    def sender_outputs(self, tokens: Int[Tensor, "n pos"]) -> Float[Tensor, "senders n pos d"]:
        """Every sender's output in the plain forward on ``tokens``."""
        none = torch.zeros(1, 1, self.n_receivers, self.n_senders, device=self.device)
        _, outputs = self.run(tokens, none, [None], keep_outputs=True)
        return outputs[0]


class Trail:
    """What one run leaves for the next set on the same prompts (:meth:`EdgeForward.run`'s
    ``trail``): the difference store ``[1, senders, T, d]`` (reused in place by every run),
    which of its entries are unwritten, the residual stream and the running sum of differences
    at the start of every stage and each layer's attention output (full token rows only), and
    the last run's mask. A head's difference that a resumed set reads but no earlier set wrote
    is computed from its layer's saved attention output (``target - z_h @ W_O[h]``).

    ``stages_run`` / ``stages_skipped`` count the stages computed and resumed over (per run,
    :attr:`EdgeForward.n_stages` in all)."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.mask: Tensor | None = None
        self.store: Tensor | None = None
        self.unwritten: Tensor | None = None
        self.resid: dict[int, Tensor] = {}
        self.total: dict[int, Tensor | None] = {}
        self.z: dict[int, Tensor] = {}  # layer -> its heads' attention output [1, H, T, d_head]
        self.fill: list[int] = []  # heads whose difference this run computes from self.z first
        self.runs = self.stages_run = self.stages_skipped = 0

    def begin(self, engine: EdgeForward, tokens: Tensor, target: Tensor, mask: Tensor, read: Tensor,
              restricted_end: bool) -> int:
        """The stage the run of ``mask`` ``[slots, R, S]`` (host) starts at, and record it."""
        key = (tokens.data_ptr(), tuple(tokens.shape), target.data_ptr(), tuple(target.shape))
        g = 0
        if self.mask is not None and self.key == key:
            differs = (mask != self.mask).any(-1).any(0)  # [R]
            changed = differs.nonzero()[:, 0]
            g = int(engine.receiver_stage[changed].min()) if len(changed) else engine.n_stages - 1
            g = max(0, min(g, max(self.resid) if self.resid else 0))
            if restricted_end:  # the last layer's MLP and the logits read END rows only
                g = min(g, 2 * (engine.net.n_layers - 1))
            while g > 0 and g not in self.resid:  # attention only: no MLP stages
                g -= 1
            # heads before g that some receiver reads on their own but whose difference the store
            # lacks (no earlier set read them): filled from their layer's saved attention output,
            # or, without one, the run starts at their layer
            missing = (read & self.unwritten & (engine.sender_stage < g)).nonzero()[:, 0]
            no_z = [int(s) for s in missing if int(engine.sender_stage[s]) // 2 not in self.z]
            if no_z:
                g = min(g, int(engine.sender_stage[torch.tensor(no_z, device="cpu")].min()))
            self.fill = [int(s) for s in missing if int(engine.sender_stage[s]) < g]
        else:
            self.fill = []
        if self.key != key:
            self.store, self.unwritten, self.resid, self.total, self.z = None, None, {}, {}, {}
        self.key, self.mask = key, mask
        self.runs += 1
        self.stages_skipped += g
        self.stages_run += engine.n_stages - g
        return g

    def save(self, g: int, resid: Tensor, total: Tensor | None) -> None:
        """The residual ``[1, T, d]`` and running sum of differences where stage ``g`` starts
        (references: the run never writes into either)."""
        self.resid[g], self.total[g] = resid, total


@dataclasses.dataclass
class EngineState:
    """Where a resumed forward starts: ``layer``/``stage`` (``"attn"``: before the heads of
    ``layer``; ``"mlp"``: before its MLP; ``"final"``: the logits), the residual stream there
    ``[1, T, d]`` and the differences ``[1, senders, T, d]`` of the first ``n_senders`` senders."""

    layer: int
    stage: str
    resid: Tensor
    delta: Tensor
    n_senders: int
    _sum: Tensor | None = None

    def delta_sum(self) -> Tensor:
        """Sum of the first ``n_senders`` differences ``[1, T, d]`` (computed once)."""
        if self._sum is None:
            self._sum = self.delta[:, : self.n_senders].sum(1)
        return self._sum


class _Deltas:
    """Sender differences: a part shared by every set (``[1, ...]``: senders computed before any
    set diverged, or given) and a per-set part from the first sender where the sets differ."""

    def __init__(self, k: int, n_senders: int, T: int, d: int, like: Tensor, *,
                 fixed_delta: Tensor | None, target: Tensor | None, head_target_sums: Tensor | None = None):
        self.k, self.n_senders, self.T, self.d = k, n_senders, T, d
        self.head_sums = head_target_sums
        self.can_fuse_heads = head_target_sums is not None and not (target.requires_grad or like.requires_grad)
        self.like = like
        self.fixed = fixed_delta is not None
        self.target = None if target is None else target.reshape(n_senders, T, d)
        self.needs_outputs = self.target is not None
        self.n_shared = 0
        # senders whose store entry was never written (no receiver reads them on their own)
        self.unwritten = torch.zeros(n_senders, dtype=torch.bool, device="cpu")
        self.shared: Tensor | None = None
        self.perk: Tensor | None = None
        self.total: Tensor | None = None
        if self.fixed:
            self.shared = fixed_delta.reshape(1, n_senders, T, d)
            self.n_shared = n_senders

    def continue_trail(self, trail: Trail, n_senders: int, g: int) -> None:
        """Use ``trail``'s store in place (allocated on the first run): the differences of the
        first ``n_senders`` senders are kept, every later one is overwritten by this run; the
        running sum is the one saved at stage ``g``."""
        if trail.store is None:
            trail.store = self.like.new_empty(1, self.n_senders, self.T, self.d)
            trail.unwritten = torch.zeros(self.n_senders, dtype=torch.bool, device="cpu")
        if trail.store.shape != (1, self.n_senders, self.T, self.d):
            raise ValueError(f"trail store {tuple(trail.store.shape)} does not fit this run.")
        self.shared, self.n_shared, self.unwritten = trail.store, n_senders, trail.unwritten
        self.total = trail.total[g] if g else None
        self.borrowed = False

    def resume(self, delta: Tensor, n_senders: int, delta_sum: Tensor | None = None) -> None:
        """Start from a saved state's differences (borrowed: copied before any write)."""
        if self.fixed:
            return
        self.shared, self.n_shared, self.borrowed = delta, n_senders, True
        self.total = delta_sum

    def restrict(self, rows: Tensor, slot_idx):
        """Keep only the tokens ``rows`` (flat indices) from here on; returns ``slot_idx``
        re-indexed into them (a slot's tokens outside ``rows`` are dropped)."""
        if self.shared is not None:
            self.shared, self.borrowed = self.shared.index_select(2, rows), False
        if self.perk is not None:
            self.perk = self.perk.index_select(2, rows)
        if self.total is not None:
            self.total = self.total.index_select(1, rows)
        if self.target is not None:
            self.target = self.target.index_select(1, rows)
        if self.head_sums is not None:
            self.head_sums = self.head_sums.index_select(1, rows)
        where = torch.full((self.T,), -1, dtype=torch.long, device=rows.device)
        where[rows] = torch.arange(len(rows), device=rows.device)
        self.T = len(rows)
        out = []
        for idx in slot_idx:
            if idx is None:
                out.append(None)
            else:
                mapped = where[idx]
                out.append(mapped[mapped >= 0])
        return out

    def running_total(self, kk: int) -> Tensor:
        """Sum of every difference computed so far, for set ``kk`` ``[T, d]``."""
        if self.total is None:  # resumed without a saved sum
            self.total = self.shared[:, : self.n_shared].sum(1)
        return self.total[min(kk, self.total.shape[0] - 1)]

    def combine(self, kk: int, coef: Tensor, base: Tensor, with_total: Tensor | None = None,
                total: Tensor | None = None) -> Tensor:
        """``base + coef @ differences`` for set ``kk``: ``[U, T * d]`` (``coef`` ``[U, n_s]``),
        plus ``total`` ``[1, T * d]`` in the rows ``with_total`` (``BoolTensor[U]``, CPU) marks.

        Reads only the senders some row uses: gathered when few, else the contiguous views
        between the first and last used sender (no copy)."""
        U, n_s = coef.shape
        Td = self.T * self.d
        out = base.new_empty(U, Td)
        n_total = 0 if with_total is None or total is None else int(with_total.sum())
        if n_total == U:  # every row: base + total (one broadcast add, the same numbers as row by row)
            torch.add(base.expand(U, Td), total, out=out)
        else:
            out.copy_(base.expand(U, Td))
            if n_total:
                rows = with_total.nonzero()[:, 0].to(out.device)
                out.index_add_(0, rows, total.expand(n_total, Td))  # base + total in those rows
        used = coef.abs().sum(0).nonzero()[:, 0]
        if not len(used):
            return out
        if len(used) <= 8:
            out.addmm_(coef[:, used].to(out.device), self.columns(kk, used).view(len(used), Td))
            return out
        split = self.n_shared if self.perk is None else self.perk_from
        pieces = [(0, min(split, n_s), self.shared[0], 0)]
        if self.perk is not None and n_s > split:
            pieces.append((split, n_s, self.perk[kk], split))
        for lo, hi, store, offset in pieces:
            inside = used[(used >= lo) & (used < hi)]
            if not len(inside):
                continue
            # runs of used senders with no unwritten store entry between them, each read as one
            # contiguous view; a run is also cut where more than 2 U unused senders lie between two
            # used ones (reading them would cost more than another pass over ``out``'s U rows)
            gaps = torch.cumsum(self.unwritten.long(), 0)[inside]
            far = (inside[1:] - inside[:-1] - 1) > 2 * U
            cuts = ((gaps[1:] != gaps[:-1]) | far).nonzero()[:, 0] + 1
            for run in torch.tensor_split(inside, cuts):
                a, b = int(run[0]), int(run[-1]) + 1
                out.addmm_(coef[:, a:b].to(out.device), store[a - offset : b - offset].reshape(b - a, Td))
        return out

    def columns(self, kk: int, idx: Tensor) -> Tensor:
        """The differences of senders ``idx`` (CPU) for set ``kk``: ``[len(idx), T, d]``."""
        device = self.like.device
        if self.perk is None:
            return self.shared[0].index_select(0, idx.to(device))
        low, high = idx[idx < self.perk_from], idx[idx >= self.perk_from]
        parts = []
        if len(low):
            parts.append(self.shared[0].index_select(0, low.to(device)))
        if len(high):
            parts.append(self.perk[kk].index_select(0, (high - self.perk_from).to(device)))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def computed(self, s0: int, s1: int, out: Tensor) -> None:
        """Senders ``s0:s1`` produced ``out`` ``[1 or k, s1 - s0, T, d]`` in this run.

        The difference ``target - out`` is written straight into the store (no temporary); a
        store resumed from a saved state is never copied: what this run computes goes to the
        per-set part."""
        if self.target is None:
            return
        target = self.target[s0:s1]
        dst = self._store(s0, s1, out.shape[0])
        if out.requires_grad or target.requires_grad:
            dst.copy_(target - out)
        else:
            torch.sub(target, out, out=dst) if dst.shape == out.shape else dst.copy_(target - out)
        if self.total is not None or s0 == 0:
            added = dst.sum(1)
            self.total = added if self.total is None else self.total + added

    def _store(self, s0: int, s1: int, b: int) -> Tensor:
        """Where the differences of senders ``s0:s1`` computed with batch ``b`` (1 or k) go:
        ``[1 or k, s1 - s0, T, d]`` (the shared part while every set agrees, else the per-set part)."""
        borrowed = getattr(self, "borrowed", False)
        self.unwritten[s0:s1] = False  # (re)written now; computed_heads_sum marks the heads it skips
        if b == 1 and self.perk is None and not borrowed:
            if self.shared is None:
                self.shared = self.like.new_empty(1, self.n_senders, self.T, self.d)
            self.n_shared = s1
            return self.shared[:, s0:s1]
        if self.perk is None:
            self.perk_from = self.n_shared
            self.perk = self.like.new_empty(self.k, self.n_senders - self.perk_from, self.T, self.d)
        return self.perk[:, s0 - self.perk_from : s1 - self.perk_from]

    def computed_heads(self, layer: int, s0: int, s1: int, z: Tensor, W_O: Tensor) -> Tensor:
        """Heads ``s0:s1`` of ``layer`` with ``z`` ``[b, H, T, d_head]``: their differences
        ``target - z[h] @ W_O[h]`` are written into the store by one GEMM per set and one in-place
        subtraction (no output tensor). Returns the heads' summed output ``[b', T, d]``
        (``sum_h target_h - sum_h delta_h``; b' the store's batch)."""
        b = z.shape[0]
        dst = self._store(s0, s1, b)
        target = self.target[s0:s1]
        for kk in range(b):
            # the products into the store, then target - product in place: ``baddbmm`` with
            # ``out`` would first copy ``target`` into ``out`` (a pass as long as this one)
            torch.bmm(z[kk], W_O, out=dst[kk])
            torch.sub(target, dst[kk], out=dst[kk])
        if dst.shape[0] > b:  # a shared input, differences stored per set
            dst[b:].copy_(dst[:b].expand(dst.shape[0] - b, -1, -1, -1))
        added = dst.sum(1) if dst.shape[0] == b else dst[:b].sum(1)
        if self.total is not None or s0 == 0:
            self.total = added if self.total is None else self.total + added
        return self.head_sums[layer] - added

    def computed_heads_sum(self, layer: int, s0: int, s1: int, z: Tensor, z_flat: Tensor, W_O: Tensor,
                           W_O_flat: Tensor, heads_read: list[int]) -> Tensor:
        """As :meth:`computed_heads` when only the heads ``heads_read`` (offsets from ``s0``) have
        a difference some receiver reads on its own: their differences are stored (one GEMM each per
        set), the others' store entries are left unwritten (never read: :attr:`unwritten`), and the
        heads' summed output is one fused GEMM ``z_flat [b, T, H * d_head] @ W_O_flat``."""
        b = z.shape[0]
        dst = self._store(s0, s1, b)
        target = self.target[s0:s1]
        for h in heads_read:
            for kk in range(b):
                torch.addmm(target[h], z[kk, h], W_O[h], alpha=-1.0, out=dst[kk, h])
            if dst.shape[0] > b:
                dst[b:, h].copy_(dst[:b, h].expand(dst.shape[0] - b, -1, -1))
        unread = [s0 + h for h in range(s1 - s0) if h not in heads_read]
        if unread:
            self.unwritten[unread] = True
        summed = torch.matmul(z_flat, W_O_flat)  # [b, T, d]
        added = self.head_sums[layer] - summed
        if self.total is not None or s0 == 0:
            self.total = added if self.total is None else self.total + added
        return summed

    def mix_add(self, masks: Tensor, slot_idx, differentiable: bool) -> Tensor | None:
        n_s = masks.shape[-1]
        a = min(n_s, self.n_shared if self.perk is None else self.perk_from)
        total = EdgeForward.mix_add(masks[..., :a], self.shared[:, :a], slot_idx, differentiable) if a else None
        if n_s > a:
            more = EdgeForward.mix_add(masks[..., a:n_s], self.perk[:, : n_s - a], slot_idx, differentiable)
            total = more if total is None else (total if more is None else total + more)
        return total


# ----------------------------------------------------------------------------------------------
# Attribution: the clean forward with receiver probes (gradients of a zero mask, by hand)
# ----------------------------------------------------------------------------------------------


def _ln_vjp(x: Tensor, grad_y: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """Vector-Jacobian product of ``layer_norm(x) * weight + bias`` at ``x`` ``[T, d]`` for a stack
    of output gradients ``[R, T, d]``."""
    var, mean = torch.var_mean(x, -1, unbiased=False, keepdim=True)
    inv = torch.rsqrt(var + eps)
    x_hat = (x - mean) * inv
    g = grad_y if weight is None else grad_y * weight
    return inv * (g - g.mean(-1, keepdim=True) - x_hat * (g * x_hat).mean(-1, keepdim=True))


def _ln_projection_vjp(x: Tensor, grad_out: Tensor, W: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """``_ln_vjp(x, grad_out @ W^T, weight, eps)`` ``[R, T, d]`` for the projections
    ``out_r = layer_norm(x) @ W_r + b_r`` with fewer passes over the big tensor: the LayerNorm
    weight is folded into ``W``, ``1 / std`` into ``grad_out`` (``[R, T, dh]``, d/dh times smaller),
    and the two means of the LayerNorm VJP come from small products (``mean_d(g)`` =
    ``grad_out . mean_d(W)``; ``mean_d(g * x_hat)`` = ``grad_out . (x_hat @ W) / d``)."""
    d = x.shape[-1]
    var, mean = torch.var_mean(x, -1, unbiased=False, keepdim=True)
    inv = torch.rsqrt(var + eps)  # [T, 1]
    x_hat = (x - mean) * inv
    Wf = W if weight is None else W * weight[:, None]  # [R, d, dh]
    go = grad_out * inv
    grad_x = torch.bmm(go, Wf.transpose(1, 2))  # inv * g
    mean_g = torch.bmm(go, Wf.mean(1)[:, :, None])  # [R, T, 1]
    mean_gx = (go * torch.matmul(x_hat, Wf)).sum(-1, keepdim=True) / d
    grad_x.sub_(mean_g)
    return grad_x.addcmul_(mean_gx, x_hat, value=-1)


def _mask_grad(grad_x: Tensor, delta: Tensor, slot_idx) -> Tensor:
    """``[slots, R, S]``: sum over each slot's tokens of ``grad_x[r] . delta[s]``."""
    R, T, d = grad_x.shape
    S = delta.shape[0]
    out = []
    for idx in slot_idx:
        g = grad_x if idx is None else grad_x.index_select(1, idx)
        dl = delta if idx is None else delta.index_select(1, idx)
        out.append(g.reshape(R, -1) @ dl.reshape(S, -1).T)
    return torch.stack(out)


class _HeadInputsProbe(torch.autograd.Function):
    """q|k|v of every head from the shared ``resid`` (``LN1`` then per-head projections), with a
    zero mask ``M`` whose gradient is ``sum_t (d metric / d x_r) . delta_s`` per receiver."""

    @staticmethod
    def forward(ctx, resid, mask, W, b, ln_w, ln_b, eps, delta, slot_idx):
        y = F.layer_norm(resid, (resid.shape[-1],), ln_w, ln_b, eps)
        out = torch.baddbmm(b[:, None], y.expand(W.shape[0], -1, -1), W)  # [R, T, dh]
        ctx.save_for_backward(resid, W, ln_w)
        ctx.eps, ctx.slot_idx = eps, slot_idx
        ctx.delta = delta  # a constant (no gradient); may be a view of a buffer still being filled
        return out

    @staticmethod
    def backward(ctx, grad_out):
        resid, W, ln_w = ctx.saved_tensors
        delta = ctx.delta
        grad_x = _ln_projection_vjp(resid, grad_out, W, ln_w, ctx.eps)
        grad_mask = _mask_grad(grad_x, delta, ctx.slot_idx)
        return grad_x.sum(0), grad_mask, None, None, None, None, None, None, None


class _InputProbe(torch.autograd.Function):
    """The identity on one receiver's input, with the zero-mask gradient (MLP, logits)."""

    @staticmethod
    def forward(ctx, x, mask, delta, slot_idx):
        ctx.delta = delta  # a constant (no gradient); may be a view of a buffer still being filled
        ctx.slot_idx = slot_idx
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, _mask_grad(grad[None], ctx.delta, ctx.slot_idx), None, None


def probed_forward(engine: EdgeForward, tokens: Tensor, mask: Tensor, slot_idx, delta: Tensor | None,
                   embed: Tensor | None = None, target: Tensor | None = None,
                   return_delta: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """The plain forward on ``tokens`` (embedding ``embed`` when given) whose receivers read
    ``resid + mask . delta`` with ``mask`` ``[slots, receivers, senders]`` = 0: the forward is the
    unpatched one, and ``d metric / d mask`` is the EAP table. Returns the final residual
    ``[n, pos, d]``.

    ``delta=None`` with ``target`` (``[senders, n, pos, d]``): the differences are
    ``target - this forward's sender outputs``, filled in as the forward computes them (EAP: no
    separate clean forward; only with ``embed=None``, the clean run). ``return_delta``: also
    return the differences ``[senders, n, pos, d]`` (the filled ones: EAP-IG reuses them)."""
    net = engine.net
    H, D = net.n_heads, net.d_model
    n, P = tokens.shape
    T = n * P
    fill = delta is None
    if fill:
        if target is None or embed is not None:
            raise ValueError("probed_forward: delta=None needs target and the clean embedding (embed=None).")
        target = target.reshape(engine.n_senders, T, D)
        delta = torch.empty_like(target)
    else:
        delta = delta.reshape(engine.n_senders, T, D)
    resid = (engine.embed(tokens) if embed is None else embed).reshape(T, D)
    if fill:
        with torch.no_grad():
            torch.sub(target[0], resid.detach(), out=delta[0])
    for layer in range(net.n_layers):
        r0, s0 = engine.head_receivers[layer], engine.head_senders[layer]
        W = engine.W_hqkv[layer].reshape(3 * H, D, -1)
        b = engine.b_hqkv[layer].reshape(3 * H, -1)
        ln_w, ln_b = net.ln1[layer]
        qkv = _HeadInputsProbe.apply(resid, mask[:, r0 : r0 + 3 * H, :s0], W, b, ln_w, ln_b, net.eps,
                                     delta[:s0], tuple(slot_idx))
        q, k, v = (t.reshape(H, n, P, -1) for t in qkv.view(H, 3, T, -1).unbind(1))
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=net.attn_scales[layer])
        z = z.reshape(H, T, -1)
        if fill:
            with torch.no_grad():
                torch.sub(target[s0 : s0 + H], torch.matmul(z.detach(), net.W_O[layer]), out=delta[s0 : s0 + H])
        z = z.permute(1, 0, 2).reshape(T, -1)
        resid = resid + net.attn_out_from_z(layer, z)
        if not net.attn_only:
            rm, sm = engine.mlp_receivers[layer], engine.mlp_senders[layer]
            x = _InputProbe.apply(resid, mask[:, rm, :sm][:, None], delta[:sm], tuple(slot_idx))
            mlp_out = net.mlp(layer, x)
            if fill:
                with torch.no_grad():
                    torch.sub(target[sm], mlp_out.detach(), out=delta[sm])
            resid = resid + mlp_out
    final = _InputProbe.apply(resid, mask[:, -1, :][:, None], delta, tuple(slot_idx))
    if return_delta:
        return final.view(n, P, D), delta.view(engine.n_senders, n, P, D)
    return final.view(n, P, D)

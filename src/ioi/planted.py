"""A GPT-2-architecture model whose IOI circuit is known by construction ("planted-ioi").

GPT-2 small's weights cannot be downloaded on every machine this repository runs on, so the
offline demo, CI and the analysis tests use a model that solves the IOI task through a circuit
written in by hand: every weight is *set*, not trained, and the build takes a few seconds. It is a
Hugging Face :class:`~transformers.GPT2LMHeadModel` with the real GPT-2 vocabulary (50,257 BPE
tokens, unembedding tied to the token embedding, learned positional embeddings, pre-LN blocks with
LayerNorm, GELU MLPs), so everything that loads GPT-2 small loads it too
(``ioi.models.load_model("planted-ioi")``).

The circuit follows the story of Wang et al. 2022 (arXiv 2211.00593, §3), one head per class
(``CIRCUIT``; ``RELEVANT_POSITIONS`` gives the position where each class's node is kept):

========================  ======  ==========  ===============================================
class                     head    kept at     what the head does
========================  ======  ==========  ===============================================
previous token            0.1     S1+1        attends i -> i-1; writes the previous token's
                                              identity into PREV
duplicate token           0.3     S2          attends to an earlier copy of the current token
                                              (not itself); writes a "duplicated" flag (DUP)
                                              and the duplicated name's identity (DUPID)
induction                 1.2     S2          attends to the token after an earlier copy (key
                                              PREV = query token); writes DUP, DUPID (read
                                              from PREV) and copies that token's identity
s-inhibition              2.0     END         attends to duplicated names (key DUP + FLAG,
                                              i.e. S2); copies their DUPID into INHIB
name mover                3.1     END         attends to names except those in INHIB (query
                                              INHIB vs key NAME_ID), i.e. to IO, and copies
                                              the name (NAME_ID + FLAG) into the logits
negative name mover       3.3     END         attends like the name mover; writes -0.3 x the
                                              name mover's copy (against IO)
========================  ======  ==========  ===============================================

So the duplicate-token and induction heads reach the S-inhibition head through its keys (DUP)
and its values (DUPID), the previous-token head reaches the induction head through its keys and
values (PREV), and the S-inhibition head reaches the name movers through their queries (INHIB),
as in the paper's path-patching story. The other 10 heads are idle: small random query/key/value
weights whose output goes only to a JUNK subspace that no circuit head and no unembedding vector
reads (they act only through the LayerNorm scales, negligibly). The MLPs are zero. There is no
backup name mover.

Residual stream: d_model = 640, 4 layers x 4 heads of d_head = 160, n_positions = 512. Every
direction used is orthogonal to the all-ones vector (a Householder basis), so LayerNorm's
centring is the identity on the stream, and a constant component of norm ~25 at every position
keeps every LayerNorm scale within ~1% of 1. Subspaces (dimensions):

* CONST (1); SINK (1, position 0 only: the attention sink where every head that finds nothing
  attends; the DUP/DUPID-writing heads have zero value there);
* POS (32): sinusoids at 16 fixed frequencies; the kernel ``K(d) = mean_f cos(w_f d)`` is 1 at
  d = 0 and within [-0.41, 0.41] for 0 < |d| < 512 (rotating by one step gives the previous-token
  query; ``-K(i - j)`` keeps the duplicate-token head off itself);
* NAME_ID (99, orthonormal, one per name of ``ioi.data.NAMES``); FLAG (1, "is a name");
  TOK_ID (28, a seeded random unit vector for every other token);
* PREV (127), DUP (1), DUPID (99), INHIB (99); JUNK (151, idle heads' output).

Token embedding (= the tied unembedding): a name is ``1.0 NAME_ID[n] + 2.0 FLAG``, any other
token ``1.0 TOK_ID[t]``. Because the name mover copies NAME_ID and FLAG, every name gets a boost
at END and the attended name (IO) ~5 more logits. The bridge's fold_ln / center_writing_weights
/ center_unembed change logit differences by < 1e-4.

Measured (``measure_behaviour``: load_model("planted-ioi"), CPU fp32, IOIDataset("mixed",
N=1000, seed=0) and its ``abc_dataset(seed=0)``): p_IOI logit difference mean 4.20, min 3.73,
max 4.53 (per-template means 4.15-4.28; every template's minimum > 3.7); IO probability 0.383
(S 0.006; IO > S for 100% of prompts); p_ABC logit difference (A - B) mean 0.06 (per prompt
|LD| <= 2.8, from a fixed per-name salience in the name movers' keys). Attention (N=200): name
mover END->IO 0.90, S-inhibition END->S2 0.99, induction S2->S1+1 1.00, duplicate S2->S1 1.00,
previous token S1+1->S1 1.00. Repeated random tokens (4 x 100, no BOS): previous-token score of
0.1 = 1.00, duplicate score of 0.3 = 1.00, induction score of 1.2 = 0.98 (idle heads < 0.04).
Copy score (paper and ARENA variants): name mover 100%, negative name mover 100% negative, every
other head 0%. Patching the p_ABC output of the previous-token, duplicate-token or induction head
into p_IOI costs ~40% of the logit difference each (duplicate and induction are partly
redundant); of the S-inhibition or the name mover head, > 100% (the answer flips to S).
Build: ~3-6 s on 2 CPU cores; model.safetensors 157.6 MB (150 MiB).

Limitations (by construction): one head per class and no backup name mover; the logit
difference is nearly constant across prompts (GPT-2's varies far more); position 0 is the
attention sink, so a *name* at position 0 (no BOS and a prompt starting with a name) is not
seen as a duplicate source -- no IOI template starts with a name, and ``prepend_bos=True``
avoids it; names outside ``ioi.data.NAMES`` are ordinary tokens; positions are reliable up to
512; non-name identity lives in 28 dimensions, so duplicate/induction matching on random tokens
is noisier than on names (exactly orthogonal); the name movers attend to names from every
position, not only END; p_ABC's logit difference is ~0 by symmetry (GPT-2's is slightly
negative).

Measured behaviour: :data:`PLANTED_BEHAVIOUR` (re-measured by ``tests/test_planted.py``).

The circuit as edges (:data:`CIRCUIT_EDGES`, :func:`circuit_edges`; the graph of
:mod:`ioi.edges.graph`: senders ``embed``, ``a{L}.h{H}``, ``m{L}``; receivers ``a{L}.h{H}.q|k|v``,
``m{L}``, ``logits``). An edge is planted when its receiver's weights read a subspace that its
sender writes AND that subspace differs between p_IOI and p_ABC (whose IO, S1, S2 are three fresh
names, every other token and position the same). Read off the weights in ``_build_weights``:

* 0.1 (previous token): q and k read only POS / SINK (identical in both runs); v reads the token
  identity -> ``embed->a0.h1.v`` at S1 (the name it copies into PREV at S1+1).
* 0.3 (duplicate token): q and k read identity (and POS); v reads CONST/SINK (the DUP flag) and
  NAME_ID (DUPID) -> ``embed->a0.h3.q`` at S2, ``embed->a0.h3.k`` and ``.v`` at S1.
* 1.2 (induction): q reads identity -> ``embed->a1.h2.q`` at S2; k reads PREV (and SINK) ->
  ``a0.h1->a1.h2.k`` at S1+1; v reads PREV (-> DUPID) -> ``a0.h1->a1.h2.v`` at S1+1 (its other
  value reads, CONST/SINK and the next token's TOK_ID, are the same in both runs).
* 2.0 (S-inhibition): q is a bias only; k reads DUP (+ FLAG, SINK: the same in both runs) and v
  reads DUPID, both written at S2 by 0.3 and 1.2 -> ``a0.h3->a2.h0.k|v``, ``a1.h2->a2.h0.k|v``
  at S2 (the two writers are redundant: each key edge alone costs only ~4% of the LD).
* 3.1 / 3.3 (name mover / negative): q reads INHIB -> ``a2.h0->a3.h{1,3}.q`` at END; k reads
  NAME_ID (+ FLAG, SINK) -> ``embed->a3.h{1,3}.k`` at S1 and S2 (a fresh name there is no longer
  inhibited); v reads NAME_ID, FLAG -> ``embed->a3.h{1,3}.v`` at IO (the attended name).
* logits read NAME_ID, FLAG, TOK_ID at END, written there only by 3.1 and 3.3 ->
  ``a3.h1->logits``, ``a3.h3->logits`` at END.

Everything else is inert: MLPs are exactly zero (no edge into or out of them carries anything),
idle heads write only JUNK, and no circuit head reads another circuit head's subspace except as
listed. Second-order edges (:data:`WEAK_EDGES`, not in the circuit): the name movers' keys at IO
(the fixed per-name salience, ~0.03 logits) and their values at S1/S2 (attention there is ~0.2%,
~0.01 logits). Measured by exact edge patching (``patch_edges``, p_ABC into p_IOI, N=40, mixed,
seed 0; clean LD 4.24): the 19 planted edges move the mean LD by 0.15-8.3 logits, every other
edge of the 479-edge graph by < 0.003; per position, the 21 planted edges by >= 0.15 and every
other position of them by <= 0.03. :data:`EDGE_MATTERS_LD` / :data:`EDGE_INERT_LD` are the
thresholds ``tests/test_planted_edges.py`` checks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase

from ioi.data import NAMES
from ioi.tokenizer import GPT2_EOS_TOKEN_ID, GPT2_VOCAB_SIZE, get_gpt2_tokenizer

__all__ = [
    "CIRCUIT",
    "CIRCUIT_EDGES",
    "EDGE_INERT_LD",
    "EDGE_MATTERS_LD",
    "IDLE_HEADS",
    "PlantedEdge",
    "WEAK_EDGES",
    "circuit_edges",
    "PLANTED_BEHAVIOUR",
    "PLANTED_VERSION",
    "RELEVANT_POSITIONS",
    "Layout",
    "PlantedParams",
    "build_planted_model",
    "checkpoint_dir",
    "construction_fingerprint",
    "describe",
    "ensure_checkpoint",
    "layout",
    "measure_behaviour",
    "save_planted_checkpoint",
]

PLANTED_VERSION = 1
_MARKER = "planted_ioi.json"

# Architecture.
D_MODEL = 640
N_HEADS = 4
D_HEAD = D_MODEL // N_HEADS
N_LAYERS = 4
N_POSITIONS = 512
D_MLP = 64  # the MLPs are all-zero; a small width keeps the checkpoint small

PREVIOUS_TOKEN_HEAD = (0, 1)
DUPLICATE_TOKEN_HEAD = (0, 3)
INDUCTION_HEAD = (1, 2)
S_INHIBITION_HEAD = (2, 0)
NAME_MOVER_HEAD = (3, 1)
NEGATIVE_NAME_MOVER_HEAD = (3, 3)

CIRCUIT: dict[str, list[tuple[int, int]]] = {
    "name mover": [NAME_MOVER_HEAD],
    "negative name mover": [NEGATIVE_NAME_MOVER_HEAD],
    "s-inhibition": [S_INHIBITION_HEAD],
    "induction": [INDUCTION_HEAD],
    "duplicate token": [DUPLICATE_TOKEN_HEAD],
    "previous token": [PREVIOUS_TOKEN_HEAD],
}

# Where each class's node is kept (the paper code's RELEVANT_TOKENS).
RELEVANT_POSITIONS: dict[str, str] = {
    "name mover": "END",
    "negative name mover": "END",
    "s-inhibition": "END",
    "induction": "S2",
    "duplicate token": "S2",
    "previous token": "S1+1",
}

_CIRCUIT_HEADS = {head for heads in CIRCUIT.values() for head in heads}
IDLE_HEADS: list[tuple[int, int]] = [
    (layer, head)
    for layer in range(N_LAYERS)
    for head in range(N_HEADS)
    if (layer, head) not in _CIRCUIT_HEADS
]

# ----------------------------------------------------------------------------------------------
# The circuit as edges (derived from _build_weights; see the module docstring)
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PlantedEdge:
    """One planted edge: ``sender -> receiver``, the positions (``ioi.data`` word labels) where the
    sender's p_IOI / p_ABC difference reaches what the receiver reads, and why."""

    sender: str
    receiver: str
    positions: tuple[str, ...]
    carries: str  # the subspace the receiver reads from the sender
    reason: str

    @property
    def name(self) -> str:
        return f"{self.sender}->{self.receiver}"


def _h(head: tuple[int, int]) -> str:
    return f"a{head[0]}.h{head[1]}"


_PT, _DT, _IND = _h(PREVIOUS_TOKEN_HEAD), _h(DUPLICATE_TOKEN_HEAD), _h(INDUCTION_HEAD)
_SI, _NM, _NNM = _h(S_INHIBITION_HEAD), _h(NAME_MOVER_HEAD), _h(NEGATIVE_NAME_MOVER_HEAD)

CIRCUIT_EDGES: tuple[PlantedEdge, ...] = (
    PlantedEdge("embed", f"{_PT}.v", ("S1",), "NAME_ID",
                "previous-token head's value reads the token identity it copies into PREV at S1+1"),
    PlantedEdge("embed", f"{_DT}.q", ("S2",), "NAME_ID",
                "duplicate-token head's query: the identity matched against earlier tokens"),
    PlantedEdge("embed", f"{_DT}.k", ("S1",), "NAME_ID",
                "duplicate-token head's key: the earlier copy of S2's name"),
    PlantedEdge("embed", f"{_DT}.v", ("S1",), "NAME_ID",
                "duplicate-token head's value: the duplicated name's identity (DUPID)"),
    PlantedEdge("embed", f"{_IND}.q", ("S2",), "NAME_ID",
                "induction head's query: the identity matched against PREV"),
    PlantedEdge(_PT, f"{_IND}.k", ("S1+1",), "PREV",
                "induction head's key: PREV written by the previous-token head"),
    PlantedEdge(_PT, f"{_IND}.v", ("S1+1",), "PREV",
                "induction head's value: PREV, written out as DUPID"),
    PlantedEdge(_DT, f"{_SI}.k", ("S2",), "DUP",
                "S-inhibition key: the duplicated flag (redundant with the induction head's)"),
    PlantedEdge(_DT, f"{_SI}.v", ("S2",), "DUPID",
                "S-inhibition value: the duplicated name it copies into INHIB"),
    PlantedEdge(_IND, f"{_SI}.k", ("S2",), "DUP",
                "S-inhibition key: the duplicated flag (redundant with the duplicate head's)"),
    PlantedEdge(_IND, f"{_SI}.v", ("S2",), "DUPID",
                "S-inhibition value: the duplicated name it copies into INHIB"),
    PlantedEdge(_SI, f"{_NM}.q", ("END",), "INHIB",
                "name mover's query: which name to avoid"),
    PlantedEdge(_SI, f"{_NNM}.q", ("END",), "INHIB",
                "negative name mover's query: which name to avoid"),
    PlantedEdge("embed", f"{_NM}.k", ("S1", "S2"), "NAME_ID",
                "name mover's keys: S1 and S2 carry the inhibited name"),
    PlantedEdge("embed", f"{_NNM}.k", ("S1", "S2"), "NAME_ID",
                "negative name mover's keys: S1 and S2 carry the inhibited name"),
    PlantedEdge("embed", f"{_NM}.v", ("IO",), "NAME_ID, FLAG",
                "name mover's value: the attended name (IO) it copies to the logits"),
    PlantedEdge("embed", f"{_NNM}.v", ("IO",), "NAME_ID, FLAG",
                "negative name mover's value: the attended name, written negatively"),
    PlantedEdge(_NM, "logits", ("END",), "NAME_ID, FLAG",
                "the name mover's copy is the logit difference"),
    PlantedEdge(_NNM, "logits", ("END",), "NAME_ID, FLAG",
                "the negative name mover writes -0.3 x the name mover's copy"),
)

# Second-order edges (read by the weights, but carrying ~0.01-0.03 logits): not in the circuit.
WEAK_EDGES: tuple[PlantedEdge, ...] = (
    PlantedEdge("embed", f"{_NM}.k", ("IO",), "NAME_ID",
                "only the fixed per-name salience (+-1 nat) of the IO key changes"),
    PlantedEdge("embed", f"{_NNM}.k", ("IO",), "NAME_ID", "as for the name mover"),
    PlantedEdge("embed", f"{_NM}.v", ("S1", "S2"), "NAME_ID", "attention to S1/S2 is ~0.2%"),
    PlantedEdge("embed", f"{_NNM}.v", ("S1", "S2"), "NAME_ID", "attention to S1/S2 is ~0.2%"),
)

# |change of the mean LD| (logits; p_ABC into p_IOI, clean LD ~4.2) above which an edge matters
# and below which it is inert (tests/test_planted_edges.py). Measured: planted >= 0.15, other <= 0.03.
EDGE_MATTERS_LD = 0.1
EDGE_INERT_LD = 0.05


def circuit_edges(positions=None, *, weak: bool = False) -> list:
    """The planted circuit's edges as :class:`ioi.edges.graph.Edge` objects.

    ``positions=None``: one position-free edge per :data:`CIRCUIT_EDGES` entry (19 edges). With a
    graph's position labels (e.g. ``("IO", "S1", "S1+1", "S2", "END", "other")``): one edge per
    entry and position where it matters (21 edges); each of those labels must be in
    ``positions``. ``weak=True`` returns :data:`WEAK_EDGES` instead."""
    from ioi.edges.graph import Edge

    table = WEAK_EDGES if weak else CIRCUIT_EDGES
    if positions is None:
        out, seen = [], set()
        for e in table:
            if e.name not in seen:
                seen.add(e.name)
                out.append(Edge(e.sender, e.receiver))
        return out
    positions = tuple(positions)
    needed = sorted({p for e in table for p in e.positions} - set(positions))
    if needed:
        raise ValueError(f"The planted edges need position labels {needed}, which the graph's "
                         f"positions {positions} lack: build the graph with them.")
    return [Edge(e.sender, e.receiver, p) for e in table for p in e.positions]


# Positional frequencies (radians per token): a fixed random draw (numpy PCG64, seed 1234, the best
# of 20,000 for max_{0<d<512} |mean_f cos(w_f d)|), rounded and written out so the build never
# depends on a search. Kernel: K(0) = 1, max_{0<d<512} K = 0.412, min = -0.408.
FREQUENCIES: tuple[float, ...] = (
    0.2646, 0.4817, 0.5481, 0.5813, 1.3090, 1.4217, 1.7056, 1.7173,
    1.7924, 1.9299, 1.9500, 2.1103, 2.2800, 2.5679, 2.7857, 2.9305,
)

# Measured with measure_behaviour() on load_model("planted-ioi") (CPU, fp32), PLANTED_VERSION 1:
# IOIDataset("mixed", N=1000, seed=0) and its abc_dataset(seed=0); LD = logit(IO) - logit(S) at
# END (for p_ABC: A - B, the dataset's own labels).
PLANTED_BEHAVIOUR: dict[str, float] = {
    "ioi_ld_mean": 4.204,
    "ioi_ld_min": 3.733,
    "ioi_ld_max": 4.527,
    "ioi_template_ld_mean_min": 4.149,
    "ioi_template_ld_mean_max": 4.275,
    "ioi_io_prob_mean": 0.383,
    "ioi_s_prob_mean": 0.006,
    "ioi_s_over_io_rate": 0.0,
    "abc_ld_mean": 0.062,
    "abc_ld_abs_max": 2.806,
    "abc_io_prob_mean": 0.051,
}


# ----------------------------------------------------------------------------------------------
# Residual-stream layout and magnitudes
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
    """Coordinates of each feature in the ``d_model - 1`` mean-zero basis directions."""

    n_names: int
    n_tok: int
    const: int
    sink: int
    flag: int
    dup: int
    pos: slice
    name_id: slice
    tok_id: slice
    prev: slice
    dupid: slice
    inhib: slice
    junk: slice

    @property
    def n_id(self) -> int:
        return self.n_names + self.n_tok


def layout(n_names: int = len(NAMES)) -> Layout:
    """The residual-stream layout for ``n_names`` names (all sizes fit one 160-dim head)."""
    n_pos = 2 * len(FREQUENCIES)
    # The duplicate-token head matches identity (names + tokens), kernel (POS) and sink in d_head.
    n_tok = D_HEAD - n_names - n_pos - 1
    if n_tok < 8:
        raise ValueError(f"{n_names} names leave too few token-identity dimensions ({n_tok}).")
    sizes = [("const", 1), ("sink", 1), ("flag", 1), ("dup", 1), ("pos", n_pos),
             ("name_id", n_names), ("tok_id", n_tok), ("prev", n_names + n_tok),
             ("dupid", n_names), ("inhib", n_names)]
    start, fields = 0, {}
    for name, size in sizes:
        fields[name] = start if size == 1 else slice(start, start + size)
        start += size
    if start > D_MODEL - 1:
        raise ValueError(f"Layout needs {start} dimensions, d_model - 1 = {D_MODEL - 1}.")
    return Layout(n_names=n_names, n_tok=n_tok, junk=slice(start, D_MODEL - 1), **fields)


@dataclasses.dataclass(frozen=True)
class PlantedParams:
    """Magnitudes of the construction (attention scores are in nats, before softmax)."""

    # Embeddings.
    a_pos: float = 1.0  # norm of each position's POS (or SINK) component
    a_tok: float = 1.0  # norm of a non-name token's TOK_ID component
    a_name: float = 1.0  # norm of a name's NAME_ID component
    b_flag: float = 2.0  # a name's FLAG component
    # Previous-token head: score beta*K(i-1-j); position 0 (the sink) scores sigma.
    pt_beta: float = 24.0
    pt_sink: float = 16.0
    # Duplicate-token head: beta*[same token] - gamma*K(i-j) (excludes itself); sink sigma.
    dt_beta: float = 32.0
    dt_gamma: float = 24.0
    dt_sink: float = 16.0
    dt_out: float = 1.0  # DUP written when attending a non-sink position
    dt_id_out: float = 0.5  # DUPID: the attended (duplicate) name's identity
    # Induction head: beta*[PREV_j == token_i]; sink sigma.
    ind_beta: float = 16.0
    ind_sink: float = 8.0
    ind_out: float = 1.0
    ind_id_out: float = 0.5  # DUPID: the attended token's PREV (= the duplicated name)
    ind_copy: float = 2.0  # copies the attended (next) token's TOK_ID identity
    # S-inhibition head: lambda_dup*DUP + lambda_name*[name]; sink sigma.
    si_dup: float = 4.0
    si_name: float = 7.0
    si_sink: float = 9.5
    si_out: float = 1.0  # INHIB = attention-weighted DUPID of the attended positions
    # Name movers: lambda_name*[name] - gamma*<INHIB, identity_j>; sink sigma.
    nm_name: float = 6.0
    nm_gamma: float = 7.0
    nm_sink: float = 3.0
    nm_id_out: float = 7.0  # NAME_ID written per unit attention
    nm_flag_out: float = 7.0  # FLAG written per unit attention on names
    nm_salience: float = 1.0  # each name's key gets a fixed extra score, uniform in +-this
    nnm_ratio: float = 0.3  # negative name mover writes -ratio x the name mover's output
    # Idle heads.
    idle_qk: float = 0.5
    idle_out: float = 0.3


# ----------------------------------------------------------------------------------------------
# Building the weights
# ----------------------------------------------------------------------------------------------


def _mean_zero_basis(d: int) -> np.ndarray:
    """``[d, d-1]`` orthonormal columns orthogonal to the all-ones vector (a Householder basis)."""
    u = np.full(d, 1.0 / np.sqrt(d))
    v = -u.copy()
    v[0] += 1.0
    householder = np.eye(d) - 2.0 * np.outer(v, v) / (v @ v)  # maps e_0 to u
    return householder[:, 1:]


def _name_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = []
    for name in NAMES:
        tok = tokenizer(" " + name).input_ids
        if len(tok) != 1:
            raise ValueError(f"Name {name!r} is not one GPT-2 token with a leading space.")
        ids.append(tok[0])
    if len(set(ids)) != len(ids):
        raise ValueError("Duplicate name tokens in ioi.data.NAMES.")
    return ids


class _Head:
    """One head's Q/K/V/O in the mean-zero coordinates; columns are filled feature by feature."""

    def __init__(self, n_coef: int):
        self.wq = np.zeros((n_coef, D_HEAD))
        self.bq = np.zeros(D_HEAD)
        self.wk = np.zeros((n_coef, D_HEAD))
        self.wv = np.zeros((n_coef, D_HEAD))
        self.wo = np.zeros((D_HEAD, n_coef))
        self._qk = 0
        self._ov = 0

    def qk(self, q: dict[int, float], k: dict[int, float], q_bias: float = 0.0) -> None:
        """Add the score term ``(sum q[c] y_i[c] + q_bias) * (sum k[c] y_j[c])``.

        ``y`` is the LayerNorm output in the mean-zero coordinates; the sqrt(d_head) divisor of
        GPT-2's attention is folded into the query weights."""
        col = self._qk
        if col >= D_HEAD:
            raise ValueError("query/key dimensions exhausted")
        scale = np.sqrt(D_HEAD)
        for c, w in q.items():
            self.wq[c, col] = w * scale
        self.bq[col] = q_bias * scale
        for c, w in k.items():
            self.wk[c, col] = w
        self._qk += 1

    def ov(self, v: dict[int, float], out: dict[int, float]) -> None:
        """Add an OV channel: value ``sum v[c]*y_j[c]`` written along ``out``."""
        col = self._ov
        if col >= D_HEAD:
            raise ValueError("value dimensions exhausted")
        for c, w in v.items():
            self.wv[c, col] = w
        for c, w in out.items():
            self.wo[col, c] = w
        self._ov += 1


def _sl(s: slice) -> range:
    return range(s.start, s.stop)


def _build_weights(seed: int, params: PlantedParams, tokenizer) -> dict[str, np.ndarray]:
    lay = layout()
    p = params
    n_coef = D_MODEL - 1
    rng = np.random.default_rng(seed)
    basis = _mean_zero_basis(D_MODEL)  # [d_model, n_coef]

    # ---- embeddings (coefficients) ----
    name_ids = _name_token_ids(tokenizer)
    wte = np.zeros((GPT2_VOCAB_SIZE, n_coef))
    tok_vectors = rng.standard_normal((GPT2_VOCAB_SIZE, lay.n_tok))
    tok_vectors /= np.linalg.norm(tok_vectors, axis=1, keepdims=True)
    wte[:, lay.tok_id] = p.a_tok * tok_vectors
    for n, token in enumerate(name_ids):
        wte[token, :] = 0.0
        wte[token, lay.name_id.start + n] = p.a_name
        wte[token, lay.flag] = p.b_flag
    # Constant component: the non-name tokens' LayerNorm input has norm exactly sqrt(d_model).
    big = np.sqrt(D_MODEL - p.a_pos**2 - p.a_tok**2)
    wpe = np.zeros((N_POSITIONS, n_coef))
    wpe[:, lay.const] = big
    freqs = np.asarray(FREQUENCIES)
    positions = np.arange(N_POSITIONS)[:, None]
    amp = p.a_pos / np.sqrt(len(freqs))
    wpe[:, lay.pos.start:lay.pos.stop:2] = amp * np.cos(positions * freqs)
    wpe[:, lay.pos.start + 1:lay.pos.stop:2] = amp * np.sin(positions * freqs)
    wpe[0, lay.pos] = 0.0
    wpe[0, lay.sink] = p.a_pos

    name_cols = list(_sl(lay.name_id))
    tok_cols = list(_sl(lay.tok_id))
    prev_cols = list(_sl(lay.prev))
    inhib_cols = list(_sl(lay.inhib))
    dupid_cols = list(_sl(lay.dupid))
    pos_cols = list(_sl(lay.pos))
    sink_key = {lay.sink: 1.0 / p.a_pos}  # = 1 at position 0 (LayerNorm scale ~1)
    not_sink = {lay.const: 1.0 / big, lay.sink: -1.0 / p.a_pos}  # = 1 everywhere but position 0

    heads = {(layer, h): _Head(n_coef) for layer in range(N_LAYERS) for h in range(N_HEADS)}

    # ---- previous token head: q = rotated position, k = position ----
    pt = heads[PREVIOUS_TOKEN_HEAD]
    g = p.pt_beta / p.a_pos**2
    for f, w in enumerate(freqs):
        c, s = lay.pos.start + 2 * f, lay.pos.start + 2 * f + 1
        pt.qk({c: g * np.cos(w), s: g * np.sin(w)}, {c: 1.0})
        pt.qk({c: -g * np.sin(w), s: g * np.cos(w)}, {s: 1.0})
    pt.qk({}, sink_key, q_bias=p.pt_sink)
    for n in range(lay.n_names):
        pt.ov({name_cols[n]: 1.0 / p.a_name}, {prev_cols[n]: 1.0})
    for t in range(lay.n_tok):
        pt.ov({tok_cols[t]: 1.0 / p.a_tok}, {prev_cols[lay.n_names + t]: 1.0})

    # ---- duplicate token head: same identity, not itself (kernel), else sink ----
    dt = heads[DUPLICATE_TOKEN_HEAD]
    for c in name_cols:
        dt.qk({c: p.dt_beta / p.a_name**2}, {c: 1.0})
    for c in tok_cols:
        dt.qk({c: p.dt_beta / p.a_tok**2}, {c: 1.0})
    for c in pos_cols:
        dt.qk({c: -p.dt_gamma / p.a_pos**2}, {c: 1.0})
    dt.qk({}, sink_key, q_bias=p.dt_sink)
    dt.ov({c: p.dt_out * w for c, w in not_sink.items()}, {lay.dup: 1.0})
    for n in range(lay.n_names):
        dt.ov({name_cols[n]: 1.0 / p.a_name}, {dupid_cols[n]: p.dt_id_out})

    # ---- induction head: key PREV matches the query's identity ----
    ind = heads[INDUCTION_HEAD]
    for n in range(lay.n_names):
        ind.qk({name_cols[n]: p.ind_beta / p.a_name}, {prev_cols[n]: 1.0})
    for t in range(lay.n_tok):
        ind.qk({tok_cols[t]: p.ind_beta / p.a_tok}, {prev_cols[lay.n_names + t]: 1.0})
    ind.qk({}, sink_key, q_bias=p.ind_sink)
    ind.ov({c: p.ind_out * w for c, w in not_sink.items()}, {lay.dup: 1.0})
    for n in range(lay.n_names):
        ind.ov({prev_cols[n]: 1.0}, {dupid_cols[n]: p.ind_id_out})
    for c in tok_cols:
        ind.ov({c: 1.0 / p.a_tok}, {c: p.ind_copy})

    # ---- S-inhibition head: attends to duplicated names, writes their identity to INHIB ----
    si = heads[S_INHIBITION_HEAD]
    si.qk({}, {lay.dup: p.si_dup, lay.flag: p.si_name / p.b_flag, lay.sink: p.si_sink / p.a_pos},
          q_bias=1.0)
    for n in range(lay.n_names):
        si.ov({dupid_cols[n]: 1.0}, {inhib_cols[n]: p.si_out})

    # ---- name mover and negative name mover ----
    salience = rng.uniform(-p.nm_salience, p.nm_salience, lay.n_names)
    for head, sign in ((NAME_MOVER_HEAD, 1.0), (NEGATIVE_NAME_MOVER_HEAD, -p.nnm_ratio)):
        nm = heads[head]
        for n in range(lay.n_names):
            nm.qk({inhib_cols[n]: -p.nm_gamma}, {name_cols[n]: 1.0 / p.a_name})
        key = {lay.flag: p.nm_name / p.b_flag, lay.sink: p.nm_sink / p.a_pos}
        key.update({c: s / p.a_name for c, s in zip(name_cols, salience)})
        nm.qk({}, key, q_bias=1.0)
        for n in range(lay.n_names):
            nm.ov({name_cols[n]: 1.0 / p.a_name}, {name_cols[n]: sign * p.nm_id_out})
        nm.ov({lay.flag: 1.0 / p.b_flag}, {lay.flag: sign * p.nm_flag_out})

    # ---- idle heads: random reads of everything but CONST, writes to JUNK only ----
    read = np.ones(n_coef, dtype=bool)
    read[lay.const] = False
    n_read, n_junk = int(read.sum()), lay.junk.stop - lay.junk.start
    for head in IDLE_HEADS:
        h = heads[head]
        h.wq[read] = rng.standard_normal((n_read, D_HEAD)) * p.idle_qk
        h.wk[read] = rng.standard_normal((n_read, D_HEAD)) * p.idle_qk
        h.wv[read] = rng.standard_normal((n_read, D_HEAD)) / np.sqrt(n_read)
        h.wo[:, lay.junk] = rng.standard_normal((D_HEAD, n_junk)) * p.idle_out / np.sqrt(D_HEAD)

    # ---- to the model's coordinates ----
    used = np.flatnonzero(np.any(wte != 0.0, axis=0))  # 128 of 639 columns: 5x faster
    state: dict[str, np.ndarray] = {
        "transformer.wte.weight": wte[:, used] @ basis[:, used].T,
        "transformer.wpe.weight": wpe @ basis.T,
        "transformer.ln_f.weight": np.ones(D_MODEL),
        "transformer.ln_f.bias": np.zeros(D_MODEL),
    }
    for layer in range(N_LAYERS):
        prefix = f"transformer.h.{layer}."
        blocks = [heads[(layer, h)] for h in range(N_HEADS)]
        wq = np.concatenate([basis @ b.wq for b in blocks], axis=1)
        wk = np.concatenate([basis @ b.wk for b in blocks], axis=1)
        wv = np.concatenate([basis @ b.wv for b in blocks], axis=1)
        bq = np.concatenate([b.bq for b in blocks])
        state[prefix + "attn.c_attn.weight"] = np.concatenate([wq, wk, wv], axis=1)
        state[prefix + "attn.c_attn.bias"] = np.concatenate([bq, np.zeros(2 * D_MODEL)])
        state[prefix + "attn.c_proj.weight"] = np.concatenate([b.wo @ basis.T for b in blocks])
        state[prefix + "attn.c_proj.bias"] = np.zeros(D_MODEL)
        for ln in ("ln_1", "ln_2"):
            state[prefix + ln + ".weight"] = np.ones(D_MODEL)
            state[prefix + ln + ".bias"] = np.zeros(D_MODEL)
        state[prefix + "mlp.c_fc.weight"] = np.zeros((D_MODEL, D_MLP))
        state[prefix + "mlp.c_fc.bias"] = np.zeros(D_MLP)
        state[prefix + "mlp.c_proj.weight"] = np.zeros((D_MLP, D_MODEL))
        state[prefix + "mlp.c_proj.bias"] = np.zeros(D_MODEL)
    return state


def planted_config() -> GPT2Config:
    """The GPT-2 configuration of the planted model."""
    return GPT2Config(
        vocab_size=GPT2_VOCAB_SIZE,
        n_positions=N_POSITIONS,
        n_embd=D_MODEL,
        n_layer=N_LAYERS,
        n_head=N_HEADS,
        n_inner=D_MLP,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        bos_token_id=GPT2_EOS_TOKEN_ID,
        eos_token_id=GPT2_EOS_TOKEN_ID,
        tie_word_embeddings=True,
    )


def build_planted_model(
    seed: int = 0, params: PlantedParams | None = None
) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerBase]:
    """Build the planted-circuit GPT-2 (deterministic for a given ``seed`` and ``params``).

    ``seed`` only affects the random parts: non-name token identities and the idle heads.
    """
    tokenizer = get_gpt2_tokenizer()
    state = _build_weights(seed, params or PlantedParams(), tokenizer)
    config = planted_config()
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(torch.float32)
               for k, v in state.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" and not k.endswith(".attn.bias")
               and not k.endswith(".attn.masked_bias")]
    if missing or unexpected:
        raise RuntimeError(f"State dict mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config.pad_token_id = GPT2_EOS_TOKEN_ID
    return model.eval(), tokenizer


# ----------------------------------------------------------------------------------------------
# Checkpoint on disk
# ----------------------------------------------------------------------------------------------


def checkpoint_dir() -> Path:
    """Default checkpoint folder: ``$IOI_CACHE/planted-ioi-v{VERSION}`` (else ``~/.cache/ioi``)."""
    root = Path(os.environ.get("IOI_CACHE", Path.home() / ".cache" / "ioi"))
    return root / f"planted-ioi-v{PLANTED_VERSION}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def construction_fingerprint() -> str:
    """sha256 of this module's source: a cached checkpoint built by other code is rebuilt."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def save_planted_checkpoint(directory: str | Path, seed: int = 0) -> Path:
    """Write config.json, model.safetensors, the tokenizer and a marker file to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model, tokenizer = build_planted_model(seed=seed)
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    marker = {
        "spec": "planted-ioi",
        "planted_version": PLANTED_VERSION,
        "construction_sha256": construction_fingerprint(),
        "seed": seed,
        "model_sha256": _sha256(directory / "model.safetensors"),
        "circuit": {k: [list(h) for h in v] for k, v in CIRCUIT.items()},
        "relevant_positions": RELEVANT_POSITIONS,
        "build_seconds": round(time.perf_counter() - started, 2),
    }
    (directory / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return directory


def _is_complete(directory: Path) -> bool:
    marker = directory / _MARKER
    if not (marker.exists() and (directory / "config.json").exists()
            and (directory / "model.safetensors").exists()):
        return False
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return (
        meta.get("planted_version") == PLANTED_VERSION
        and meta.get("construction_sha256") == construction_fingerprint()
        and meta.get("seed", 0) == 0
    )


def ensure_checkpoint(directory: str | Path | None = None) -> Path:
    """The planted checkpoint folder, built (atomically: temp folder + rename) if missing."""
    target = Path(directory) if directory is not None else checkpoint_dir()
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        save_planted_checkpoint(tmp)
        if target.exists() and not _is_complete(target):  # stale or partial: move it aside
            stale = Path(tempfile.mkdtemp(prefix=target.name + ".stale", dir=target.parent))
            try:
                os.replace(target, stale / "old")
            except OSError:
                pass
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not _is_complete(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------------
# Description and measurement
# ----------------------------------------------------------------------------------------------


def describe() -> str:
    """A plain-text description of the construction (for the docs and result metadata)."""
    lay = layout()
    p = PlantedParams()
    lines = [
        f"planted-ioi v{PLANTED_VERSION}: GPT-2 architecture, {N_LAYERS} layers x {N_HEADS} heads, "
        f"d_model {D_MODEL}, d_head {D_HEAD}, n_positions {N_POSITIONS}, MLP width {D_MLP} "
        "(all-zero MLPs), GPT-2 vocabulary (50257), unembedding tied to the token embedding.",
        "Weights are set by construction (no training); every residual direction is orthogonal to "
        "the all-ones vector, and a constant component keeps every LayerNorm scale near 1.",
        "Residual subspaces: CONST 1, SINK 1 (position 0), FLAG 1 (is a name), DUP 1, "
        f"POS {lay.pos.stop - lay.pos.start} ({len(FREQUENCIES)} sinusoid frequencies), "
        f"NAME_ID {lay.n_names} (orthonormal, one per name), TOK_ID {lay.n_tok} (random unit "
        f"vectors for all other tokens), PREV {lay.n_id}, DUPID {lay.n_names}, "
        f"INHIB {lay.n_names}, "
        f"JUNK {lay.junk.stop - lay.junk.start} (idle heads' output).",
        f"Embedding of a name: {p.a_name} NAME_ID + {p.b_flag} FLAG; of any other token: "
        f"{p.a_tok} TOK_ID. Positions: constant + {p.a_pos} POS (position 0: SINK instead).",
        "Heads (layer.head):",
        f"  previous token {PREVIOUS_TOKEN_HEAD[0]}.{PREVIOUS_TOKEN_HEAD[1]}: query = position "
        f"rotated back one step, key = position: score {p.pt_beta} K(i-1-j), sink {p.pt_sink}; "
        "writes the previous token's identity to PREV.",
        f"  duplicate token {DUPLICATE_TOKEN_HEAD[0]}.{DUPLICATE_TOKEN_HEAD[1]}: score "
        f"{p.dt_beta} [same token] - {p.dt_gamma} K(i-j) (so not itself), sink {p.dt_sink}; "
        f"writes {p.dt_out} DUP unless attending the sink, and {p.dt_id_out} x the attended "
        "name's identity to DUPID.",
        f"  induction {INDUCTION_HEAD[0]}.{INDUCTION_HEAD[1]}: score {p.ind_beta} "
        f"[PREV_j = token_i], sink {p.ind_sink}; writes {p.ind_out} DUP, {p.ind_id_out} x the "
        f"attended PREV (names) to DUPID, and copies the attended token's TOK_ID identity "
        f"(x{p.ind_copy}).",
        f"  s-inhibition {S_INHIBITION_HEAD[0]}.{S_INHIBITION_HEAD[1]}: score {p.si_dup} DUP + "
        f"{p.si_name} [name], sink {p.si_sink}; copies the attended DUPID to INHIB "
        f"(x{p.si_out}).",
        f"  name mover {NAME_MOVER_HEAD[0]}.{NAME_MOVER_HEAD[1]}: score {p.nm_name} [name] - "
        f"{p.nm_gamma} <INHIB, identity_j> + fixed per-name salience in +-{p.nm_salience}, "
        f"sink {p.nm_sink}; writes {p.nm_id_out} NAME_ID and "
        f"{p.nm_flag_out} FLAG per unit attention (copies the name into the logits).",
        f"  negative name mover {NEGATIVE_NAME_MOVER_HEAD[0]}.{NEGATIVE_NAME_MOVER_HEAD[1]}: "
        f"attends like the name mover, writes -{p.nnm_ratio} x its output.",
        f"  idle ({len(IDLE_HEADS)} heads): random small Q/K/V, output only to JUNK.",
        "K(d) = mean_f cos(w_f d) is the positional kernel (1 at d = 0, |K| <= 0.41 otherwise).",
    ]
    if PLANTED_BEHAVIOUR:
        lines.append("Measured: " + ", ".join(f"{k} {v}" for k, v in PLANTED_BEHAVIOUR.items()))
    return "\n".join(lines)


@torch.no_grad()
def measure_behaviour(model, n: int = 1000, seed: int = 0, batch_size: int = 100) -> dict:
    """LD / IO probability on p_IOI (mixed) and p_ABC, per template; the numbers we document."""
    from ioi.data import IOIDataset
    from ioi.metrics import end_logits, logit_diff_from_end_logits

    ioi = IOIDataset("mixed", N=n, seed=seed)
    abc = ioi.abc_dataset(seed=seed)

    def stats(dataset):
        lds, probs, s_probs = [], [], []
        for start in range(0, len(dataset), batch_size):
            part = dataset[start:start + batch_size]
            logits = model(part.toks)
            final = end_logits(logits, part.word_idx["END"])
            lds.append(logit_diff_from_end_logits(final, part.io_token_ids, part.s_token_ids))
            soft = final.float().softmax(-1)
            rows = torch.arange(len(part))
            probs.append(soft[rows, part.io_token_ids])
            s_probs.append(soft[rows, part.s_token_ids])
        return torch.cat(lds), torch.cat(probs), torch.cat(s_probs)

    ld, p_io, p_s = stats(ioi)
    abc_ld, abc_p_io, _ = stats(abc)
    templates = sorted(set(ioi.template_ids))
    per_template = {
        t: ld[[i for i, x in enumerate(ioi.template_ids) if x == t]] for t in templates
    }
    return {
        "ioi_ld_mean": float(ld.mean()),
        "ioi_ld_min": float(ld.min()),
        "ioi_ld_max": float(ld.max()),
        "ioi_template_ld_mean_min": float(min(v.mean() for v in per_template.values())),
        "ioi_template_ld_mean_max": float(max(v.mean() for v in per_template.values())),
        "ioi_io_prob_mean": float(p_io.mean()),
        "ioi_s_prob_mean": float(p_s.mean()),
        "ioi_s_over_io_rate": float((ld < 0).float().mean()),
        "abc_ld_mean": float(abc_ld.mean()),
        "abc_ld_abs_max": float(abc_ld.abs().max()),
        "abc_io_prob_mean": float(abc_p_io.mean()),
        "per_template_ld_mean": {t: float(v.mean()) for t, v in per_template.items()},
        "per_template_ld_min": {t: float(v.min()) for t, v in per_template.items()},
    }

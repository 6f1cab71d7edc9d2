"""Patching engine.

* Activation patching (:mod:`ioi.patching.activation`): drop-in replacements for
  ``transformer_lens.patching``'s functions (same names, arguments and output shapes), computed by
  resuming the forward pass from the patched layer, many patches per batched pass.
* Path patching (:mod:`ioi.patching.path`, the paper's Appendix B): ``path_patch_to_logits`` and
  ``path_patch_to_heads``, with per-prompt sender / receiver positions, MLP senders, knockouts and a
  reusable ``prepare_path_patching`` cache.
* Seed-notebook-style slow references of both: :mod:`ioi.patching.reference`.
"""

from ioi.patching.activation import *  # noqa: F401,F403
from ioi.patching.activation import __all__ as _activation_all
from ioi.patching.path import (
    PathPatchCache,
    PathPatchResult,
    path_patch_to_heads,
    path_patch_to_logits,
    positions_mask,
    prepare_path_patching,
)

__all__ = [
    *_activation_all,
    "PathPatchCache",
    "PathPatchResult",
    "path_patch_to_heads",
    "path_patch_to_logits",
    "positions_mask",
    "prepare_path_patching",
]

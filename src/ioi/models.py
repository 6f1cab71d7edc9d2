"""Model loading: GPT-2 small, local GPT-2 checkpoints, seeded random GPT-2 shapes, the planted model.

Everything returns a TransformerLens 4 :class:`TransformerBridge` in compatibility mode, processed
like the seed notebook (``fold_ln``, ``center_writing_weights``, ``center_unembed``; each optional).
``fold_value_biases`` defaults to **False**, as in the paper's own code (Easy-Transformer): per-head
outputs then keep their ``b_V @ W_O`` term, which the copy score needs. Logits, logit differences,
probabilities, mean ablation, path patching and activation patching of whole activations
(residual streams, head outputs ``z``, queries, keys, values, and whole attention patterns) do not
depend on any of these settings (up to float error): LayerNorm folding and centring are exact
rewrites, and value-bias folding moves ``sum_j pattern[i, j] * b_V = b_V`` into ``b_O``, which
holds whenever every pattern row sums to 1.

One exception, as in TransformerLens: **single-entry pattern patching**
(``get_act_patch_attn_head_pattern_dest_src_pos``, which replaces one ``pattern[dest, src]`` of one
head) leaves that row summing to ``1 + (clean - corrupted)``, not 1. With
``fold_value_biases=False`` the head's output then carries ``(row sum) * b_V @ W_O``; with value
biases folded, ``b_V @ W_O`` sits in ``b_O`` with weight exactly 1. Its results therefore differ
between the two settings (by ``(clean - corrupted) * b_V @ W_O`` at the destination); ours match
TransformerLens's for the same processing. Per-head attributions (direct logit attribution of a
head, the copy score) also depend on it, by that head's ``b_V @ W_O`` term.

Specs accepted by :func:`load_model`:

* ``"gpt2-small"`` (aliases ``"gpt2"``, ``"openai-community/gpt2"``): GPT-2 small from the local
  Hugging Face cache, else downloaded from the hub; offline with no weights, a clear error.
* a path to a local Hugging Face GPT-2 checkpoint directory (``config.json`` + weights, tokenizer
  files optional): loaded with no network access at all.
* ``"planted-ioi"``: the planted-circuit checkpoint from :mod:`ioi.planted` (built and cached).
* ``"random-gpt2-small"`` (GPT-2 small's shape), ``"random-tiny"`` (2 layers, 4 heads, d_model 64)
  and ``"random-L{layers}-H{heads}-D{d_head}"``: seeded random GPT-2 weights with the real tokenizer.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast, PreTrainedTokenizerBase

from ioi.tokenizer import GPT2_VOCAB_SIZE, get_gpt2_tokenizer

GPT2_SMALL_ALIASES = ("gpt2-small", "gpt2", "openai-community/gpt2")
GPT2_HUB_IDS = ("openai-community/gpt2", "gpt2")
PLANTED_SPEC = "planted-ioi"
RANDOM_PREFIX = "random-"

# (n_layers, n_heads, d_head) of the named random shapes.
RANDOM_SHAPES: dict[str, tuple[int, int, int]] = {
    "gpt2-small": (12, 12, 64),
    "tiny": (2, 4, 16),
}
_RANDOM_PATTERN = re.compile(r"^L(\d+)-H(\d+)-D(\d+)$")


class ModelNotAvailableError(RuntimeError):
    """The requested weights are not on this machine and cannot be downloaded."""


class ModelSpecError(ValueError):
    """A model spec, checkpoint or device that cannot be used as given; the message names the fix.
    (A ValueError, as before; the workflow prints its message alone, without a traceback.)"""


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """Provenance of a loaded model, recorded in every result's metadata."""

    spec: str
    source: str
    n_layers: int
    n_heads: int
    d_head: int
    d_model: int
    device: str
    dtype: str
    processing: dict[str, bool]
    seed: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Devices and numerics
# ----------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when present, else CPU; anything else is taken as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelSpecError(
            f"device={device!s} was asked for but no CUDA GPU is visible; use device='cpu' or 'auto'."
        )
    return device


def disable_tf32() -> None:
    """Full-precision fp32 matmuls on GPU, so GPU and CPU results agree to our 1e-4 tolerance."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


# ----------------------------------------------------------------------------------------------
# Building the Hugging Face model for each kind of spec
# ----------------------------------------------------------------------------------------------


def random_gpt2_config(n_layers: int, n_heads: int, d_head: int, n_ctx: int = 1024) -> GPT2Config:
    """A GPT-2 architecture config with the given shape and GPT-2's vocabulary."""
    d_model = n_heads * d_head
    return GPT2Config(
        vocab_size=GPT2_VOCAB_SIZE,
        n_positions=n_ctx,
        n_embd=d_model,
        n_layer=n_layers,
        n_head=n_heads,
        n_inner=4 * d_model,
        activation_function="gelu_new",
        attn_implementation="eager",
    )


def parse_random_spec(spec: str) -> tuple[int, int, int]:
    """``"random-gpt2-small"`` -> (12, 12, 64); ``"random-L3-H4-D8"`` -> (3, 4, 8)."""
    shape = spec[len(RANDOM_PREFIX) :]
    if shape in RANDOM_SHAPES:
        return RANDOM_SHAPES[shape]
    match = _RANDOM_PATTERN.match(shape)
    if match is None:
        known = ", ".join(f"random-{name}" for name in RANDOM_SHAPES)
        raise ModelSpecError(
            f"Unknown random model spec {spec!r}. Use one of {known}, or "
            "'random-L{layers}-H{heads}-D{d_head}' (e.g. 'random-L3-H4-D16')."
        )
    n_layers, n_heads, d_head = (int(g) for g in match.groups())
    if min(n_layers, n_heads, d_head) < 1:
        raise ModelSpecError(f"Random model spec {spec!r} needs layers, heads and d_head >= 1.")
    return n_layers, n_heads, d_head


def build_random_hf_model(spec: str, seed: int = 0) -> GPT2LMHeadModel:
    """Seeded random GPT-2 weights (Hugging Face's own initialisation) of the spec's shape."""
    n_layers, n_heads, d_head = parse_random_spec(spec)
    config = random_gpt2_config(n_layers, n_heads, d_head)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model.eval()


def _hf_cache_snapshot(repo_ids: tuple[str, ...] = GPT2_HUB_IDS) -> Path | None:
    """The local Hugging Face cache snapshot of GPT-2 small, if one holds config and weights."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover
        return None
    for repo_id in repo_ids:
        try:
            path = Path(snapshot_download(repo_id, local_files_only=True))
        except Exception:  # noqa: BLE001 - any failure means "not cached"
            continue
        has_weights = any((path / f).exists() for f in ("model.safetensors", "pytorch_model.bin"))
        if (path / "config.json").exists() and has_weights:
            return path
    return None


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether huggingface.co answers on port 443 (a fast check instead of the hub's ~30 s retries)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _offline_error(spec: str) -> ModelNotAvailableError:
    return ModelNotAvailableError(
        f"Cannot load {spec!r}: GPT-2 small's weights are not on this machine and the Hugging Face "
        "hub is unreachable. Looked for a local Hugging Face cache snapshot of "
        f"{' or '.join(GPT2_HUB_IDS)} (under {os.environ.get('HF_HOME', '~/.cache/huggingface')}) "
        "containing config.json and model.safetensors/pytorch_model.bin. Three ways out: "
        "(1) run once with network access so the weights are downloaded and cached; "
        "(2) point at a local GPT-2 checkpoint directory, e.g. load_model('/path/to/gpt2') or "
        "model_path: /path/to/gpt2 in the Snakemake config (a folder saved by "
        "GPT2LMHeadModel.save_pretrained); "
        "(3) run the offline demo on the planted-circuit model instead: make demo "
        "(snakemake --cores --configfile config/offline.yaml)."
    )


def _load_local_checkpoint(path: Path) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerBase]:
    """A GPT-2-architecture checkpoint directory, loaded strictly from disk."""
    if not path.is_dir():
        raise ModelNotAvailableError(f"Model path {str(path)!r} is not a directory.")
    if not (path / "config.json").exists():
        raise ModelNotAvailableError(
            f"{str(path)!r} has no config.json: save a checkpoint there with "
            "GPT2LMHeadModel.save_pretrained(path) (and tokenizer.save_pretrained(path))."
        )
    config = GPT2Config.from_pretrained(str(path), local_files_only=True)
    if config.model_type != "gpt2":
        raise ModelSpecError(
            f"{str(path)!r} holds a {config.model_type!r} model; only GPT-2-architecture "
            "checkpoints are supported."
        )
    model = GPT2LMHeadModel.from_pretrained(
        str(path), local_files_only=True, attn_implementation="eager"
    )
    has_tokenizer = any((path / f).exists() for f in ("tokenizer.json", "vocab.json"))
    if has_tokenizer:
        tokenizer = GPT2TokenizerFast.from_pretrained(str(path), local_files_only=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
    else:
        tokenizer = get_gpt2_tokenizer()
    return model.eval(), tokenizer


def _load_gpt2_small() -> tuple[GPT2LMHeadModel, PreTrainedTokenizerBase, str]:
    cached = _hf_cache_snapshot()
    if cached is not None:
        model, tokenizer = _load_local_checkpoint(cached)
        return model, tokenizer, f"hf-cache:{cached}"
    if not _hub_reachable():
        raise _offline_error("gpt2-small")
    model = GPT2LMHeadModel.from_pretrained(GPT2_HUB_IDS[0], attn_implementation="eager")
    return model.eval(), get_gpt2_tokenizer(), f"hub:{GPT2_HUB_IDS[0]}"


def build_hf_model(
    spec: str | Path, *, seed: int = 0
) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerBase, str]:
    """The Hugging Face model, tokenizer and a source description for any accepted spec."""
    spec_str = str(spec)
    if spec_str in GPT2_SMALL_ALIASES:
        return _load_gpt2_small()
    if spec_str == PLANTED_SPEC:
        from ioi import planted

        path = planted.ensure_checkpoint()
        model, tokenizer = _load_local_checkpoint(path)
        return model, tokenizer, f"planted:{path}"
    if spec_str.startswith(RANDOM_PREFIX):
        return build_random_hf_model(spec_str, seed=seed), get_gpt2_tokenizer(), f"random:seed={seed}"
    path = Path(spec_str).expanduser()
    if path.exists():
        model, tokenizer = _load_local_checkpoint(path)
        return model, tokenizer, f"local:{path.resolve()}"
    raise ModelSpecError(
        f"Unknown model spec {spec_str!r}: use 'gpt2-small', 'planted-ioi', "
        "'random-gpt2-small', 'random-tiny', 'random-L{layers}-H{heads}-D{d_head}', "
        "or the path of a local GPT-2 checkpoint directory (no such path exists)."
    )


# ----------------------------------------------------------------------------------------------
# The bridge
# ----------------------------------------------------------------------------------------------


def bridge_from_hf(
    hf_model: GPT2LMHeadModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    fold_value_biases: bool = False,
    refactor_factored_attn_matrices: bool = False,
):
    """Wrap a GPT-2 HF model in a TransformerBridge with compatibility mode and our processing."""
    from transformer_lens.model_bridge import TransformerBridge

    hf_model.config._attn_implementation = "eager"
    bridge = TransformerBridge.boot_transformers(
        "gpt2", hf_model=hf_model, tokenizer=tokenizer, device=str(device), dtype=dtype
    )
    any_processing = any(
        (fold_ln, center_writing_weights, center_unembed, fold_value_biases,
         refactor_factored_attn_matrices)
    )
    bridge.enable_compatibility_mode(
        disable_warnings=True,
        no_processing=not any_processing,
        fold_ln=fold_ln,
        center_writing_weights=center_writing_weights,
        center_unembed=center_unembed,
        fold_value_biases=fold_value_biases,
        refactor_factored_attn_matrices=refactor_factored_attn_matrices,
    )
    bridge.eval()
    for param in bridge.parameters():
        param.requires_grad_(False)
    return bridge


def load_model(
    spec: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    fold_value_biases: bool = False,
    refactor_factored_attn_matrices: bool = False,
    seed: int = 0,
):
    """Load ``spec`` (see the module docstring) as a processed TransformerBridge.

    The returned model has gradients disabled and carries ``model.ioi_info`` (a :class:`ModelInfo`).
    Raises :class:`ModelNotAvailableError` with the ways out when weights are missing offline.
    """
    torch_device = resolve_device(device)
    disable_tf32()
    hf_model, tokenizer, source = build_hf_model(spec, seed=seed)
    bridge = bridge_from_hf(
        hf_model,
        tokenizer,
        device=torch_device,
        dtype=dtype,
        fold_ln=fold_ln,
        center_writing_weights=center_writing_weights,
        center_unembed=center_unembed,
        fold_value_biases=fold_value_biases,
        refactor_factored_attn_matrices=refactor_factored_attn_matrices,
    )
    cfg = bridge.cfg
    bridge.ioi_info = ModelInfo(
        spec=str(spec),
        source=source,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        d_head=cfg.d_head,
        d_model=cfg.d_model,
        device=str(torch_device),
        dtype=str(dtype).replace("torch.", ""),
        processing={
            "fold_ln": fold_ln,
            "center_writing_weights": center_writing_weights,
            "center_unembed": center_unembed,
            "fold_value_biases": fold_value_biases,
            "refactor_factored_attn_matrices": refactor_factored_attn_matrices,
        },
        seed=seed if str(spec).startswith(RANDOM_PREFIX) else None,
    )
    return bridge


def model_slug(spec: str | Path) -> str:
    """A file-system-safe name for a spec, used for ``results/{model}/`` folders."""
    spec_str = str(spec)
    if spec_str in GPT2_SMALL_ALIASES:
        return "gpt2-small"
    if Path(spec_str).expanduser().exists() and not spec_str.startswith(RANDOM_PREFIX):
        return "local-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(spec_str).name)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", spec_str)

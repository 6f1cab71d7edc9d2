"""``IOIDataset``: the IOI prompt distribution p_IOI and its corruptions (p_ABC and others).

Wang et al. 2022 ("Interpretability in the Wild", arXiv 2211.00593) §2 and Appendix E define the
task: "When Mary and John went to the store, John gave a drink to" -> " Mary". This class follows
the paper code's ``IOIDataset`` (Easy-Transformer ``ioi_dataset.py``) with its defects fixed:

* seeded ``numpy.random.Generator`` only, so a dataset is byte-identical across processes;
* "mixed" = templates 1-7 of each form, as the paper code (``all_templates=True`` for all 15);
  "BABA" / "ABBA" = all 15 templates of that form, as the paper code;
* ABBA/BABA labels from token positions (IO before S1), not substring search;
* every word checked to be one GPT-2 token; corruptions checked to be token-aligned;
* fresh corruption names never collide (``distinct_names=False`` / ``paper_collisions=True``
  reproduce the paper's collision-prone draws).

Layout of a prompt (no BOS by default): ``toks[i, :prompt_lengths[i]]`` is the full sentence
including the answer ``" " + IO`` as its last token; the rest is padding (50256). Logits are read
at ``word_idx["END"]`` (the " to" before the answer). Position definitions: ``ioi.data.tokens``.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Int

from ioi.data import persistence
from ioi.data.flips import (
    ABC_CHAIN,
    NameDrawer,
    SlotRoles,
    apply_flip,
    derive_seed,
    parse_flip,
)
from ioi.data.generation import sample_prompts
from ioi.data.prompt import Prompt, prompt_from_mapping
from ioi.data.templates import (
    parse_template,
    prompt_type_for_metadata,
    resolve_templates,
    template_sort_key,
)
from ioi.data.tokens import (
    WORD_IDX_KEYS,
    WordIdx,
    canonical_word_idx,
    check_word_idx_in_bounds,
    clean_word_idx,
    pad_token_ids,
    single_token_id,
    to_word_idx,
    tokenize_prompts,
    validate_word_list,
    word_token_ids,
)
from ioi.data.words import ANIMALS, NAMES, OBJECTS, PLACES


@dataclass(frozen=True)
class DatasetSettings:
    """How a dataset was generated; inherited unchanged by its corruptions and slices."""

    prompt_type: str | tuple[str, ...] = "mixed"
    seed: int = 0
    prepend_bos: bool = False
    all_templates: bool = False
    symmetric: bool = False
    unique: bool = False
    distinct_names: bool = True
    names: tuple[str, ...] = NAMES
    places: tuple[str, ...] = PLACES
    objects: tuple[str, ...] = OBJECTS

    def to_json(self) -> dict:
        return {
            "prompt_type": prompt_type_for_metadata(self.prompt_type),
            "seed": self.seed,
            "prepend_bos": self.prepend_bos,
            "all_templates": self.all_templates,
            "symmetric": self.symmetric,
            "unique": self.unique,
            "distinct_names": self.distinct_names,
            "names": list(self.names),
            "places": list(self.places),
            "objects": list(self.objects),
        }

    @classmethod
    def from_json(cls, meta: dict) -> "DatasetSettings":
        prompt_type = meta["prompt_type"]
        return cls(
            prompt_type=prompt_type if isinstance(prompt_type, str) else tuple(prompt_type),
            seed=int(meta["seed"]),
            **{
                k: bool(meta[k])
                for k in ("prepend_bos", "all_templates", "symmetric", "unique", "distinct_names")
            },
            **{k: tuple(meta[k]) for k in ("names", "places", "objects")},
        )


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _selection(key, n: int) -> list[int]:
    """Row indices for an int, slice, list, numpy array or tensor (bool masks allowed)."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        index = int(key) + (n if key < 0 else 0)
        if not 0 <= index < n:
            raise IndexError(f"index {key} out of range for a dataset of {n} prompts")
        return [index]
    if isinstance(key, slice):
        rows = list(range(n))[key]
    else:
        array = np.asarray(key.cpu() if isinstance(key, torch.Tensor) else key)
        rows = (
            np.nonzero(array)[0].tolist()
            if array.dtype == bool
            else array.astype(np.int64).ravel().tolist()
        )
        rows = [r + n if r < 0 else r for r in rows]
        if any(not 0 <= r < n for r in rows):
            raise IndexError(f"indices out of range for a dataset of {n} prompts")
    if not rows:
        raise ValueError("Empty selection: a sub-dataset needs at least one prompt.")
    return rows


class IOIDataset:
    """Seeded IOI prompts, tokenised, with per-prompt positions and corruption methods.

    Args:
        prompt_type: "mixed" (BABA + ABBA), "BABA", "ABBA", or a list of template strings / ids
            such as "ABBA-0" (template k = paper template k+1).
        N: number of prompts (default 100; with ``prompts`` it defaults to ``len(prompts)``).
        seed: seed of the ``numpy.random.Generator`` that draws everything.
        tokenizer: a fast GPT-2 tokenizer (default ``ioi.tokenizer.get_gpt2_tokenizer()``).
        prepend_bos: prepend token 50256; all positions shift by 1.
        all_templates: with "mixed", use templates 1-15 of each form instead of the paper code's
            1-7 ("BABA"/"ABBA" always use all 15 of their form, as the paper code does).
        names, places, objects: word lists (default: the paper code's 99 / 8 / 8); each word
            must be a single token with a leading space.
        symmetric: follow each prompt by its IO/S-swapped twin (paper option).
        unique: sample without replacement (default: with replacement, like the paper).
        prompts: explicit prompts (``Prompt`` objects or dicts, see ``prompt_from_mapping``)
            instead of sampling.
        word_idx: explicit positions (needed for corrupted ``prompts``; aliases allowed).
        distinct_names: corruptions draw fresh names that never collide (False: the paper
            code's collision-prone draws; the default of ``paper_collisions`` in the flips).
        device: where the tensors live.

    Attributes:
        toks: LongTensor [N, max_len], right-padded with 50256; each row ends with the answer.
        prompt_lengths: LongTensor [N], tokens per prompt including the answer (and BOS).
        word_idx: ``{"IO", "S1", "S1+1", "S2", "END"}`` -> LongTensor [N] (aliases "S", "S+1",
            "end"); see ``ioi.data.tokens`` for the definitions.
        io_token_ids / s_token_ids: LongTensor [N], token of " " + IO / " " + S label.
        io_names / s_names / template_ids / template_forms: per-prompt lists.
        groups / group_ids: prompt indices per template id (for template-wise means).
    """

    toks: Int[torch.Tensor, "batch pos"]
    prompt_lengths: Int[torch.Tensor, " batch"]
    io_token_ids: Int[torch.Tensor, " batch"]
    s_token_ids: Int[torch.Tensor, " batch"]

    def __init__(
        self,
        prompt_type: str | Sequence[str] = "mixed",
        N: int | None = None,
        *,
        seed: int = 0,
        tokenizer=None,
        prepend_bos: bool = False,
        all_templates: bool = False,
        names: Sequence[str] | None = None,
        places: Sequence[str] | None = None,
        objects: Sequence[str] | None = None,
        symmetric: bool = False,
        unique: bool = False,
        prompts: Sequence[Prompt | dict] | None = None,
        word_idx: dict | None = None,
        distinct_names: bool = True,
        device: torch.device | str = "cpu",
    ):
        tokenizer = _default_tokenizer(tokenizer)
        settings = DatasetSettings(
            prompt_type=prompt_type if isinstance(prompt_type, str) else tuple(prompt_type),
            seed=_check_seed(seed),
            prepend_bos=bool(prepend_bos),
            all_templates=bool(all_templates),
            symmetric=bool(symmetric),
            unique=bool(unique),
            distinct_names=bool(distinct_names),
            names=tuple(NAMES if names is None else names),
            places=tuple(PLACES if places is None else places),
            objects=tuple(OBJECTS if objects is None else objects),
        )
        validate_word_list(tokenizer, settings.names, "name", minimum=2)
        validate_word_list(tokenizer, settings.places, "place")
        validate_word_list(tokenizer, settings.objects, "object")
        if prompts is None:
            templates = resolve_templates(prompt_type, all_templates)
            prompts = sample_prompts(
                np.random.default_rng(settings.seed),
                100 if N is None else int(N),
                templates,
                settings.names,
                settings.places,
                settings.objects,
                symmetric=settings.symmetric,
                unique=settings.unique,
            )
        else:
            prompts = [
                p if isinstance(p, Prompt) else prompt_from_mapping(p, _template_form)
                for p in prompts
            ]
            if not prompts or (N is not None and N != len(prompts)):
                raise ValueError(f"N={N} does not match the {len(prompts)} prompts given.")
        self._build(prompts, settings, tokenizer, word_idx, (), device)

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def _from_prompts(cls, prompts, settings, tokenizer, word_idx, history, device) -> "IOIDataset":
        dataset = cls.__new__(cls)
        dataset._build(list(prompts), settings, tokenizer, word_idx, tuple(history), device)
        return dataset

    def _build(self, prompts, settings, tokenizer, word_idx, history, device) -> None:
        """Tokenise prompts, find or validate positions, then assemble the tensors."""
        ids, slots = tokenize_prompts(tokenizer, prompts, settings.prepend_bos)
        lengths = np.array([len(row) for row in ids], dtype=np.int64)
        token_of: dict[str, int] = {}
        for word in (w for p in prompts for w in (p.io, p.s)):
            if word not in token_of:
                token_of[word] = single_token_id(tokenizer, word, "IO/S label")
        io_ids = [token_of[p.io] for p in prompts]
        s_ids = [token_of[p.s] for p in prompts]
        if word_idx is None:
            positions = clean_word_idx(ids, slots, io_ids, s_ids)
        else:
            positions = canonical_word_idx(word_idx, len(prompts))
        check_word_idx_in_bounds(positions, lengths)
        self._assemble(
            prompts, ids, slots, positions, io_ids, s_ids, settings, tokenizer, history, device
        )

    def _assemble(
        self, prompts, ids, slots, positions, io_ids, s_ids, settings, tokenizer, history, device
    ) -> None:
        """Set every attribute from already-validated parts (no tokenisation here)."""
        self.prompts: list[Prompt] = list(prompts)
        self.settings: DatasetSettings = settings
        self.tokenizer = tokenizer
        self.flip_history: tuple[dict, ...] = tuple(dict(h) for h in history)
        self.device = torch.device(device)
        self._ids = [list(row) for row in ids]
        self._slots = np.asarray(slots, dtype=np.int64)
        self._positions = {k: np.asarray(positions[k], dtype=np.int64) for k in WORD_IDX_KEYS}
        self._io_ids, self._s_ids = list(io_ids), list(s_ids)
        pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        self.toks = pad_token_ids(self._ids, pad_id, self.device)
        self.prompt_lengths = torch.tensor(
            [len(r) for r in self._ids], dtype=torch.long, device=self.device
        )
        self.word_idx: WordIdx = to_word_idx(self._positions, self.device)
        self.io_token_ids = torch.tensor(self._io_ids, dtype=torch.long, device=self.device)
        self.s_token_ids = torch.tensor(self._s_ids, dtype=torch.long, device=self.device)
        self.template_forms: list[str] = [
            "ABBA" if io < s1 else "BABA"
            for io, s1 in zip(self._positions["IO"], self._positions["S1"], strict=True)
        ]
        self.group_ids: list[str] = sorted(
            {p.template_id for p in self.prompts}, key=template_sort_key
        )
        self.groups: list[Int[torch.Tensor, " group"]] = [
            torch.tensor(
                [i for i, p in enumerate(self.prompts) if p.template_id == g],
                dtype=torch.long,
                device=self.device,
            )
            for g in self.group_ids
        ]
        self._hash: str | None = None

    # ------------------------------------------------------------------------------- basic API
    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def N(self) -> int:
        return len(self.prompts)

    @property
    def seed(self) -> int:
        return self.settings.seed

    @property
    def prompt_type(self) -> str | tuple[str, ...]:
        return self.settings.prompt_type

    @property
    def prepend_bos(self) -> bool:
        return self.settings.prepend_bos

    @property
    def all_templates(self) -> bool:
        return self.settings.all_templates

    @property
    def max_len(self) -> int:
        return int(self.toks.shape[1])

    @property
    def sentences(self) -> list[str]:
        """Full sentences, including the final answer word."""
        return [p.text for p in self.prompts]

    @property
    def prompts_without_answer(self) -> list[str]:
        """Sentences up to END (what the model sees before predicting the answer)."""
        return [p.rendered.text_without_answer for p in self.prompts]

    @property
    def io_names(self) -> list[str]:
        return [p.io for p in self.prompts]

    @property
    def s_names(self) -> list[str]:
        return [p.s for p in self.prompts]

    @property
    def template_ids(self) -> list[str]:
        return [p.template_id for p in self.prompts]

    @property
    def name_slot_positions(self) -> Int[torch.Tensor, "batch 4"]:
        """Token index of the four name slots (clause-1 first, clause-1 second, S2, answer)."""
        return torch.as_tensor(self._slots, dtype=torch.long, device=self.device)

    # Paper-code / ARENA spellings.
    @property
    def io_tokenIDs(self) -> Int[torch.Tensor, " batch"]:
        return self.io_token_ids

    @property
    def s_tokenIDs(self) -> Int[torch.Tensor, " batch"]:
        return self.s_token_ids

    @property
    def templates_by_prompt(self) -> list[str]:
        return self.template_forms

    def __getitem__(self, key) -> "IOIDataset":
        """A sub-dataset (int, slice, index list/array/tensor, or bool mask); padding is trimmed."""
        return self._subset(_selection(key, len(self)), self.device)

    def to(self, device: torch.device | str) -> "IOIDataset":
        """The same dataset with its tensors on ``device``."""
        return self._subset(list(range(len(self))), device)

    def _subset(self, rows: list[int], device) -> "IOIDataset":
        sub = IOIDataset.__new__(IOIDataset)
        sub._assemble(
            [self.prompts[i] for i in rows],
            [self._ids[i] for i in rows],
            self._slots[rows],
            {k: v[rows] for k, v in self._positions.items()},
            [self._io_ids[i] for i in rows],
            [self._s_ids[i] for i in rows],
            self.settings,
            self.tokenizer,
            self.flip_history,
            device,
        )
        return sub

    def __repr__(self) -> str:
        flips = [h["flip"] for h in self.flip_history]
        return (
            f"IOIDataset(N={len(self)}, prompt_type={self.prompt_type!r}, seed={self.seed}, "
            f"prepend_bos={self.prepend_bos}, all_templates={self.all_templates}, "
            f"templates={len(self.group_ids)}, max_len={self.max_len}, flips={flips}, "
            f"device={self.device})"
        )

    def __eq__(self, other) -> bool:
        return isinstance(other, IOIDataset) and self.content_hash() == other.content_hash()

    def __hash__(self) -> int:
        return int(self.content_hash()[:16], 16)

    # ------------------------------------------------------------------------------ corruptions
    def _slot_roles(self) -> list[SlotRoles]:
        """For each prompt, which name slot sits at word_idx IO, S1 and S2."""
        roles = []
        for row in range(len(self)):
            slot_of = {int(pos): k for k, pos in enumerate(self._slots[row][:3])}
            try:
                roles.append(
                    SlotRoles(
                        *(slot_of[int(self._positions[key][row])] for key in ("IO", "S1", "S2"))
                    )
                )
            except KeyError:
                raise ValueError(
                    f"Prompt {row}: word_idx IO/S1/S2 are not on its name slots; cannot flip it."
                ) from None
        return roles

    def gen_flipped_prompts(
        self, flip, *, seed: int | None = None, paper_collisions: bool | None = None
    ) -> "IOIDataset":
        """A corrupted copy, position-aligned with this dataset (see ``ioi.data.flips``).

        Args:
            flip: a tuple flip such as ("S2", "IO") or a name pattern "ABB->XYZ, BAB->XYZ".
            seed: seed for fresh names; default: SHA-256 of (dataset seed, flip history, flip).
            paper_collisions: reproduce the paper code's collision-prone name draws
                (default: ``not distinct_names``).

        Raises:
            ValueError: unknown flip, a pattern that does not fit a prompt, or a result that is
                not token-aligned with this dataset.
        """
        spec = parse_flip(flip)
        paper = (
            (not self.settings.distinct_names)
            if paper_collisions is None
            else bool(paper_collisions)
        )
        if seed is None:
            seed = derive_seed(self.seed, list(self.flip_history), spec.describe())
        seed = _check_seed(seed)
        animals = [a for a in ANIMALS if len(word_token_ids(self.tokenizer, a)) == 1]
        draw = NameDrawer(np.random.default_rng(seed), self.settings.names, animals)
        flipped = apply_flip(
            spec, self.prompts, self._slot_roles(), self.template_forms, draw, paper
        )
        entry = {"flip": spec.describe(), "seed": seed, "paper_collisions": paper}
        new = IOIDataset._from_prompts(
            flipped,
            self.settings,
            self.tokenizer,
            self._positions,
            self.flip_history + (entry,),
            self.device,
        )
        check_aligned(self, new)
        return new

    def abc_dataset(
        self, *, seed: int | None = None, paper_collisions: bool | None = None
    ) -> "IOIDataset":
        """p_ABC: IO -> A, both S -> B, then S1 -> C; positions (IO, S1, S2) hold (A, C, B).

        The paper code's chain ``("IO","RAND")``, ``("S","RAND")``, ``("S1","RAND")``. By default
        A, B, C are distinct and differ from the prompt's IO and S; ``paper_collisions=True``
        reproduces the paper's occasional coincidences. The answer word becomes A.
        """
        seeds = (
            [None] * 3
            if seed is None
            else [int(s) for s in np.random.SeedSequence(_check_seed(seed)).generate_state(3)]
        )
        dataset = self
        for flip, step_seed in zip(ABC_CHAIN, seeds, strict=True):
            dataset = dataset.gen_flipped_prompts(
                flip, seed=step_seed, paper_collisions=paper_collisions
            )
        return dataset

    # ------------------------------------------------------------------------------ persistence
    def to_records(self) -> list[dict]:
        """One JSON-able dict per prompt: text, template, names, token ids, positions."""
        records = []
        for i, p in enumerate(self.prompts):
            records.append({
                "index": i,
                "sentence": p.text,
                "prompt": p.rendered.text_without_answer,
                "template_id": p.template_id,
                "template": p.template,
                "form": self.template_forms[i],
                "io": p.io,
                "s": p.s,
                "names": list(p.names),
                "place": p.place,
                "object": p.object,
                "seen_names": list(p.seen_names),
                "token_ids": list(self._ids[i]),
                "length": len(self._ids[i]),
                "io_token_id": self._io_ids[i],
                "s_token_id": self._s_ids[i],
                **{f"pos_{k}": int(self._positions[k][i]) for k in WORD_IDX_KEYS},
            })  # fmt: skip
        return records

    def to_dataframe(self):
        """``to_records()`` as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame.from_records(self.to_records())

    def content_hash(self) -> str:
        """SHA-256 of the canonical serialisation (settings, flip history, every record)."""
        if self._hash is None:
            self._hash = persistence.sha256_hex({
                "settings": self.settings.to_json(),
                "flip_history": list(self.flip_history),
                "records": self.to_records(),
            })  # fmt: skip
        return self._hash

    def metadata(self) -> dict:
        """The header saved with the rows: settings, N, flip history, versions, content hash."""
        from ioi import __version__

        return {
            "format": persistence.FORMAT,
            "format_version": persistence.FORMAT_VERSION,
            "package_version": __version__,
            "N": len(self),
            **self.settings.to_json(),
            "flip_history": list(self.flip_history),
            "tokenizer": {
                "class": type(self.tokenizer).__name__,
                "vocab_size": len(self.tokenizer),
            },
            "content_hash": self.content_hash(),
        }

    def save(self, path: str | Path, fmt: str | None = None) -> Path:
        """Write to ``.parquet`` or ``.jsonl`` (or ``fmt="parquet"|"jsonl"``)."""
        return persistence.write_records(path, self.metadata(), self.to_records(), fmt)

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        tokenizer=None,
        device: torch.device | str = "cpu",
        fmt: str | None = None,
    ) -> "IOIDataset":
        """Read a saved dataset; re-tokenises and checks token ids and content hash."""
        meta, rows = persistence.read_records(path, fmt)
        persistence.check_header(meta, path)
        prompts = [prompt_from_mapping(row, _template_form) for row in rows]
        positions = {
            k: np.array([row[f"pos_{k}"] for row in rows], dtype=np.int64) for k in WORD_IDX_KEYS
        }
        dataset = cls._from_prompts(
            prompts,
            DatasetSettings.from_json(meta),
            _default_tokenizer(tokenizer),
            positions,
            meta["flip_history"],
            device,
        )
        if dataset._ids != [list(row["token_ids"]) for row in rows]:
            raise ValueError(
                f"{str(path)!r}: re-tokenising gives different token ids (another tokenizer?)."
            )
        if dataset.content_hash() != meta["content_hash"]:
            raise ValueError(f"{str(path)!r}: content hash mismatch; the file was altered.")
        return dataset


def _default_tokenizer(tokenizer):
    if tokenizer is not None:
        return tokenizer
    from ioi.tokenizer import get_gpt2_tokenizer

    return get_gpt2_tokenizer()


def _template_form(text: str) -> str:
    return parse_template(text, "custom").form


def check_aligned(source: IOIDataset, flipped: IOIDataset) -> None:
    """Raise ValueError unless ``flipped`` has the same lengths and name-slot positions as
    ``source`` and differs from it only at name-slot tokens."""
    if not torch.equal(source.prompt_lengths.cpu(), flipped.prompt_lengths.cpu()):
        raise ValueError("Flipped dataset is not position-aligned: prompt lengths differ.")
    if not np.array_equal(source._slots, flipped._slots):
        raise ValueError("Flipped dataset is not position-aligned: name slots moved.")
    changed = (source.toks.cpu() != flipped.toks.cpu()).nonzero().tolist()
    slot_cells = {(row, int(pos)) for row in range(len(source)) for pos in source._slots[row]}
    stray = [tuple(cell) for cell in changed if tuple(cell) not in slot_cells]
    if stray:
        raise ValueError(
            f"Flipped dataset changed non-name tokens at (prompt, position) {stray[:5]}."
        )


def make_abc(dataset: IOIDataset, **kwargs) -> IOIDataset:
    """p_ABC for ``dataset`` (same as ``dataset.abc_dataset(**kwargs)``)."""
    return dataset.abc_dataset(**kwargs)

"""Template parsing, template-set selection and the exact count of distinct prompts.

A template is a sentence with placeholders ``[A]`` (indirect object, IO), ``[B]`` (subject, S),
``[PLACE]`` and ``[OBJECT]``. An IOI template has exactly four name placeholders, in textual order
``A B B A`` (ABBA form) or ``B A B A`` (BABA form): the two names of the first clause, S2, and the
answer ``[A]`` that ends the sentence (``"... to [A]"``). ``[PLACE]``/``[OBJECT]`` may appear zero
or more times; repeated occurrences get the same word (paper template 8 uses ``[OBJECT]`` twice).

Template-set selection follows the paper code (``IOIDataset(prompt_type, nb_templates=15)``):
"mixed" = ``BABA[:15 // 2] + ABBA[:15 // 2]`` = templates 1-7 of each form (``all_templates=True``:
all 15 of each form); "BABA"/"ABBA" = ``BABA[:15]`` / ``ABBA[:15]`` = all 15 templates of that form
(only "mixed" halves ``nb_templates``).
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ioi.data.words import (
    ABBA_TEMPLATES,
    BABA_TEMPLATES,
    PAPER_TEMPLATES_PER_FORM,
    TEMPLATE_IDS,
    TEMPLATES_BY_ID,
)

PLACEHOLDER = re.compile(r"\[([A-Za-z]+)\]")
NAME_PLACEHOLDERS = ("A", "B")
WORD_PLACEHOLDERS = ("PLACE", "OBJECT")
NAMED_PROMPT_TYPES = ("mixed", "BABA", "ABBA")
_TEMPLATE_ID = re.compile(r"^(ABBA|BABA)-(\d+)$")


@dataclass(frozen=True)
class Template:
    """A validated IOI template.

    Attributes:
        id: "BABA-k"/"ABBA-k" (k = 0..14 = paper template k+1) or "custom-k" for user templates.
        text: the template string with placeholders.
        form: "ABBA" if the first clause reads "[A] and [B]", else "BABA".
        uses_place / uses_object: whether ``[PLACE]`` / ``[OBJECT]`` occur.
    """

    id: str
    text: str
    form: str
    uses_place: bool
    uses_object: bool


def parse_template(text: str, template_id: str) -> Template:
    """Validate an IOI template string and describe it (raises ValueError naming the problem)."""
    if not isinstance(text, str):
        raise ValueError(f"Template must be a string, got {type(text).__name__}: {text!r}")
    found = PLACEHOLDER.findall(text)
    unknown = sorted({p for p in found if p not in NAME_PLACEHOLDERS + WORD_PLACEHOLDERS})
    if unknown:
        raise ValueError(
            f"Unknown template {text!r}: placeholders {['[' + u + ']' for u in unknown]} are not "
            "supported; use [A] (IO), [B] (S), [PLACE], [OBJECT]."
        )
    pattern = "".join(p for p in found if p in NAME_PLACEHOLDERS)
    if pattern not in ("ABBA", "BABA"):
        raise ValueError(
            f"Unknown template {text!r}: its name placeholders read {pattern!r} in order; an IOI "
            "template needs exactly 'ABBA' or 'BABA' (IO and S in the first clause, then S2, "
            "then the answer [A])."
        )
    if not text.endswith(" [A]"):
        raise ValueError(
            f"Unknown template {text!r}: it must end with ' [A]' (the answer, read at END = the "
            "token before it)."
        )
    for match in PLACEHOLDER.finditer(text):
        before = text[match.start() - 1] if match.start() > 0 else ""
        after = text[match.end()] if match.end() < len(text) else ""
        if before != " " or after.isalnum():
            raise ValueError(
                f"Unknown template {text!r}: placeholder {match.group(0)} must be preceded by a "
                "space and not followed by a letter/digit, so that its word is one ' word' token."
            )
    return Template(
        id=template_id,
        text=text,
        form=pattern,
        uses_place="PLACE" in found,
        uses_object="OBJECT" in found,
    )


def builtin_template_id(text: str) -> str | None:
    """The id ("BABA-3") of a paper template string, or None if it is not one."""
    for template_id, template_text in TEMPLATES_BY_ID.items():
        if template_text == text:
            return template_id
    return None


def _named_template_ids(prompt_type: str, all_templates: bool) -> list[str]:
    """Template ids of a named prompt type, as the paper code's ``IOIDataset(prompt_type,
    nb_templates=15)``: "BABA"/"ABBA" take ``TEMPLATES[:15]`` (all 15 of the form); "mixed" takes
    ``BABA[:15 // 2] + ABBA[:15 // 2]`` (templates 1-7 of each form), or all 15 of each form with
    ``all_templates=True``."""
    if prompt_type in ("BABA", "ABBA"):
        count = len(BABA_TEMPLATES) if prompt_type == "BABA" else len(ABBA_TEMPLATES)
        return [f"{prompt_type}-{k}" for k in range(count)]
    per_form = len(BABA_TEMPLATES) if all_templates else PAPER_TEMPLATES_PER_FORM
    baba = [f"BABA-{k}" for k in range(per_form)]
    abba = [f"ABBA-{k}" for k in range(min(per_form, len(ABBA_TEMPLATES)))]
    return baba + abba


def _template_from_item(item: str, custom_index: int) -> Template:
    """One element of an explicit template list: a template id ("ABBA-0") or a template string."""
    match = _TEMPLATE_ID.match(item.strip()) if isinstance(item, str) else None
    if match:
        if item.strip() not in TEMPLATES_BY_ID:
            raise ValueError(
                f"Unknown template {item!r}: template ids run from {match.group(1)}-0 to "
                f"{match.group(1)}-{len(BABA_TEMPLATES) - 1} (paper templates 1-15)."
            )
        return parse_template(TEMPLATES_BY_ID[item.strip()], item.strip())
    known = builtin_template_id(item) if isinstance(item, str) else None
    return parse_template(item, known or f"custom-{custom_index}")


def resolve_templates(
    prompt_type: str | Sequence[str], all_templates: bool = False
) -> list[Template]:
    """The templates a prompt type samples from, in a fixed order.

    Args:
        prompt_type: "mixed", "BABA", "ABBA", or a list of template strings / template ids.
        all_templates: for "mixed", use all 15 templates of each form instead of the paper code's
            first 7 ("BABA"/"ABBA" always use all 15 of their form, as the paper code does).
    """
    if isinstance(prompt_type, str):
        if prompt_type not in NAMED_PROMPT_TYPES:
            raise ValueError(
                f"Unknown prompt_type {prompt_type!r}: expected one of {list(NAMED_PROMPT_TYPES)} "
                "or a list of template strings / ids like 'BABA-3' (the paper code's 'ABC'/'BAC' "
                "types are not supported)."
            )
        return [
            parse_template(TEMPLATES_BY_ID[t], t)
            for t in _named_template_ids(prompt_type, all_templates)
        ]
    items = list(prompt_type)
    if not items:
        raise ValueError("Unknown prompt_type []: the template list is empty.")
    if all_templates:
        raise ValueError(
            "all_templates=True only applies to prompt_type 'mixed'/'BABA'/'ABBA'; an explicit "
            "template list already says which templates to use."
        )
    templates = [_template_from_item(item, k) for k, item in enumerate(items)]
    texts = [t.text for t in templates]
    duplicates = sorted({t for t in texts if texts.count(t) > 1})
    if duplicates:
        raise ValueError(f"Template list repeats {duplicates}; give each template once.")
    return templates


def prompt_type_for_metadata(prompt_type: str | Sequence[str]) -> str | list[str]:
    """A JSON-able form of ``prompt_type``."""
    return prompt_type if isinstance(prompt_type, str) else [str(t) for t in prompt_type]


def distinct_prompts_per_template(
    template: Template, n_names: int, n_places: int, n_objects: int
) -> int:
    """Distinct sentences one template yields: ordered (IO, S) pairs x places x objects.

    A factor counts only if the template uses that placeholder (templates 5 and 13 have neither).
    Repeated placeholders take the same word, so they count once.
    """
    count = n_names * (n_names - 1)
    if template.uses_place:
        count *= n_places
    if template.uses_object:
        count *= n_objects
    return count


def count_distinct_prompts(
    templates: Sequence[Template], n_names: int, n_places: int, n_objects: int
) -> int:
    """Exact number of distinct prompts over a template set.

    Different templates never render the same sentence (their fixed words differ, or, for an
    ABBA/BABA pair of the same template, the order of the distinct IO/S names does), so the
    per-template counts add up. ``tests/test_data.py`` checks this by brute force.
    """
    return sum(distinct_prompts_per_template(t, n_names, n_places, n_objects) for t in templates)


def template_sort_key(template_id: str) -> tuple[int, int, str]:
    """Canonical order of template ids: BABA-0..14, ABBA-0..14, custom-0, custom-1, ..., others."""
    if template_id in TEMPLATE_IDS:
        return (0, TEMPLATE_IDS.index(template_id), "")
    if template_id.startswith("custom-") and template_id[7:].isdigit():
        return (1, int(template_id[7:]), "")
    return (2, 0, template_id)


def custom_template_id(text: str) -> str:
    """Id of a template given without one: its paper id, else "custom-" + 8 hex of its SHA-256."""
    import hashlib

    return builtin_template_id(text) or "custom-" + hashlib.sha256(text.encode()).hexdigest()[:8]

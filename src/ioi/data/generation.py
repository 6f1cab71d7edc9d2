"""Seeded sampling of clean IOI prompts (the paper code's ``gen_prompt_uniform``).

Each prompt draws, independently: a template uniformly from the template set; an ordered pair of
distinct names (IO, S) uniformly; one PLACE and one OBJECT uniformly (a template that repeats
``[OBJECT]`` uses the same word twice; a template without ``[PLACE]``/``[OBJECT]`` records None).

Randomness comes only from the ``numpy.random.Generator`` passed in, drawn in a fixed order of
whole vectors, so a dataset depends on nothing but the seed and the word lists.

* ``unique=False`` (paper): sampling with replacement; duplicates can occur.
* ``unique=True``: the same draws, rejecting duplicates round by round; a template whose distinct
  prompts are used up stops being drawn.
* ``symmetric=True`` (paper option): each drawn prompt is followed by its twin with IO and S
  swapped (same template, place and object); the list is cut to N.
"""

import math
from collections.abc import Sequence

import numpy as np

from ioi.data.prompt import Prompt, clean_slots
from ioi.data.templates import Template, count_distinct_prompts, distinct_prompts_per_template


def check_n_available(
    n: int, templates: Sequence[Template], n_names: int, n_places: int, n_objects: int
) -> None:
    """Raise ValueError if more prompts are asked for than distinct prompts exist."""
    if n < 1:
        raise ValueError(f"N must be at least 1, got {n}.")
    available = count_distinct_prompts(templates, n_names, n_places, n_objects)
    if n > available:
        raise ValueError(
            f"N={n} prompts requested, but only {available} distinct prompts exist for "
            f"{len(templates)} template(s), {n_names} name(s), {n_places} place(s) and "
            f"{n_objects} object(s) (per template: {n_names}*{n_names - 1} ordered IO/S pairs, "
            "times places if it has [PLACE], times objects if it has [OBJECT]). Lower N or use "
            "more templates (all_templates=True) or longer word lists."
        )


def _draw_rows(
    rng: np.random.Generator,
    size: int,
    template_choices: np.ndarray,
    n_names: int,
    n_places: int,
    n_objects: int,
) -> np.ndarray:
    """``[size, 5]`` int rows (template, io, s, place, object), in a fixed draw order."""
    template = template_choices[rng.integers(len(template_choices), size=size)]
    io = rng.integers(n_names, size=size)
    s = (io + 1 + rng.integers(n_names - 1, size=size)) % n_names  # uniform over names != io
    place = rng.integers(n_places, size=size)
    obj = rng.integers(n_objects, size=size)
    return np.stack([template, io, s, place, obj], axis=1)


def _row_key(row: np.ndarray, templates: Sequence[Template], symmetric: bool) -> tuple[int, ...]:
    """What makes a prompt (or, with ``symmetric``, a prompt twin pair) distinct."""
    t, io, s, place, obj = (int(v) for v in row)
    names = (min(io, s), max(io, s)) if symmetric else (io, s)
    return (
        t,
        *names,
        place if templates[t].uses_place else -1,
        obj if templates[t].uses_object else -1,
    )


def _draw_unique_rows(
    rng: np.random.Generator,
    size: int,
    templates: Sequence[Template],
    n_names: int,
    n_places: int,
    n_objects: int,
    symmetric: bool,
) -> np.ndarray:
    """Rows without duplicate prompts: redraw the shortfall until ``size`` rows are distinct."""
    capacity = np.array(
        [distinct_prompts_per_template(t, n_names, n_places, n_objects) for t in templates]
    ) // (2 if symmetric else 1)
    used = np.zeros(len(templates), dtype=np.int64)
    seen: set[tuple[int, ...]] = set()
    kept: list[np.ndarray] = []
    while len(kept) < size:
        open_templates = np.nonzero(used < capacity)[0]
        batch = _draw_rows(rng, size - len(kept), open_templates, n_names, n_places, n_objects)
        for row in batch:
            key = _row_key(row, templates, symmetric)
            if key not in seen and used[row[0]] < capacity[row[0]]:
                seen.add(key)
                used[row[0]] += 1
                kept.append(row)
    return np.stack(kept)


def _prompt_from_row(
    row: np.ndarray,
    templates: Sequence[Template],
    names: Sequence[str],
    places: Sequence[str],
    objects: Sequence[str],
    swap: bool = False,
) -> Prompt:
    t, io, s, place, obj = (int(v) for v in row)
    if swap:
        io, s = s, io
    template = templates[t]
    return Prompt(
        template_id=template.id,
        template=template.text,
        names=clean_slots(template.form, names[io], names[s]),
        place=places[place] if template.uses_place else None,
        object=objects[obj] if template.uses_object else None,
        io=names[io],
        s=names[s],
    )


def sample_prompts(
    rng: np.random.Generator,
    n: int,
    templates: Sequence[Template],
    names: Sequence[str],
    places: Sequence[str],
    objects: Sequence[str],
    *,
    symmetric: bool = False,
    unique: bool = False,
) -> list[Prompt]:
    """Draw ``n`` clean IOI prompts (see the module docstring for the distribution)."""
    check_n_available(n, templates, len(names), len(places), len(objects))
    n_base = math.ceil(n / 2) if symmetric else n
    dims = (len(names), len(places), len(objects))
    if unique:
        rows = _draw_unique_rows(rng, n_base, templates, *dims, symmetric)
    else:
        rows = _draw_rows(rng, n_base, np.arange(len(templates)), *dims)
    prompts: list[Prompt] = []
    for row in rows:
        prompts.append(_prompt_from_row(row, templates, names, places, objects))
        if symmetric:
            prompts.append(_prompt_from_row(row, templates, names, places, objects, swap=True))
    return prompts[:n]

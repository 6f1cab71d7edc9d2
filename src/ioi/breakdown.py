"""Per-template and per-order (ABBA / BABA) breakdowns of a headline number, with 95% CIs.

One mean over all prompts hides how much a number moves across templates (the 26-head circuit's
faithfulness spans about 57%-155% across templates). Every experiment that reports a headline number
also stores, in ``summary["breakdown"][<quantity>]``, the same statistic computed on each template's
prompts and on each order's prompts, in one format (:func:`breakdown_mean`, :func:`breakdown_ratio`,
:func:`breakdown_fraction`, :func:`breakdown_heads`)::

    {"statistic": "mean", "definition": "...",
     "overall": {"value": v, "ci": [low, high], "n": N},
     "by_template": {"ABBA-0": {"value": ..., "ci": [...], "n": ...}, ...},
     "by_order": {"ABBA": {...}, "BABA": {...}},
     "spread": {"min": v, "min_group": "BABA-3", "max": v, "max_group": "ABBA-1"}}

``spread`` is over templates. CIs are 95% percentile bootstraps over the group's prompts
(:mod:`ioi.stats`; paired for ratios), or Wilson intervals for a fraction of independent samples.
A group of one prompt has no CI (``[None, None]``). ``order`` is the template's form: ABBA when IO
comes before S1 in the first clause, else BABA (``IOIDataset.template_forms``).

:func:`breakdown_heads` does this for a per-head sweep (``[layers, heads, N]`` patched LDs): in each
group, the % change of the group's mean LD, ``100 (mean_g LD_patched - mean_g LD_clean) /
mean_g LD_clean`` (the paper code's normalisation applied within the group), and the ``k`` heads
with the most negative (or largest |.|) value, each with its CI.

:func:`breakdown_rows` flattens every breakdown of a summary into table rows (the secondary table
of ``paper_comparison.md`` and the breakdown figure read these).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ioi.stats import bootstrap_ci, bootstrap_ratio_ci

GROUPINGS = ("template", "order")
N_RESAMPLES = 1000

Labels = Mapping[str, Sequence[str]]


def _finite(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _pair(low_high) -> list[float | None]:
    return [_finite(low_high[0]), _finite(low_high[1])]


def group_labels(dataset) -> dict[str, list[str]]:
    """Per-prompt grouping labels of an ``IOIDataset``: its template id and its order."""
    return {"template": [str(t) for t in dataset.template_ids],
            "order": [str(f) for f in dataset.template_forms]}


def _check_labels(labels: Labels, n: int) -> None:
    for grouping in GROUPINGS:
        if grouping not in labels:
            raise ValueError(f"Breakdown labels need a {grouping!r} list (ioi.breakdown.group_labels).")
        if len(labels[grouping]) != n:
            raise ValueError(f"{len(labels[grouping])} {grouping!r} labels for {n} prompts: the values "
                             "and the dataset they came from do not match.")


def _groups(labels: Sequence[str]) -> dict[str, np.ndarray]:
    labels = np.asarray([str(x) for x in labels])
    return {str(g): np.nonzero(labels == g)[0] for g in sorted(set(labels.tolist()), key=_sort_key)}


def _sort_key(label: str):
    form, _, number = str(label).partition("-")
    return (form, int(number)) if number.isdigit() else (str(label), -1)


def _spread(by_template: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    values = {g: e["value"] for g, e in by_template.items() if e["value"] is not None}
    if not values:
        return {"min": None, "min_group": None, "max": None, "max_group": None}
    low, high = min(values, key=values.get), max(values, key=values.get)
    return {"min": values[low], "min_group": low, "max": values[high], "max_group": high}


def _assemble(entry_of: Callable[[np.ndarray], dict[str, Any]], n: int, labels: Labels,
              statistic: str, definition: str) -> dict[str, Any]:
    _check_labels(labels, n)
    out: dict[str, Any] = {"statistic": statistic, "definition": definition,
                           "overall": entry_of(np.arange(n))}
    for grouping in GROUPINGS:
        out[f"by_{grouping}"] = {g: entry_of(rows) for g, rows in _groups(labels[grouping]).items()}
    out["spread"] = _spread(out["by_template"])
    return out


def breakdown_mean(values, labels: Labels, *, seed: int = 0, definition: str = "",
                   n_resamples: int = N_RESAMPLES) -> dict[str, Any]:
    """Mean of per-prompt ``values [N]`` overall, per template and per order, with bootstrap CIs."""
    values = np.asarray(values, dtype=float)

    def entry(rows):
        part = values[rows]
        return {"value": _finite(part.mean()),
                "ci": _pair(bootstrap_ci(part, n_resamples=n_resamples, seed=seed)), "n": int(len(rows))}

    return _assemble(entry, len(values), labels, "mean", definition)


def breakdown_ratio(numerator, denominator, labels: Labels, *, seed: int = 0, definition: str = "",
                    n_resamples: int = N_RESAMPLES) -> dict[str, Any]:
    """Ratio of means ``mean(numerator) / mean(denominator)`` per group (paired bootstrap CI)."""
    num, den = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    if num.shape != den.shape:
        raise ValueError(f"numerator {num.shape} and denominator {den.shape} differ in shape.")

    def entry(rows):
        d = den[rows].mean()
        value = num[rows].mean() / d if d != 0 else float("nan")
        return {"value": _finite(value),
                "ci": _pair(bootstrap_ratio_ci(num[rows], den[rows], n_resamples=n_resamples, seed=seed)),
                "n": int(len(rows))}

    return _assemble(entry, len(num), labels, "ratio of means", definition)


def wilson_interval(hits: float, total: float, z: float = 1.959963984540054) -> list[float | None]:
    """95% Wilson score interval of a binomial fraction (``[None, None]`` for no samples)."""
    if total <= 0:
        return [None, None]
    p = hits / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return [centre - half, centre + half]


def breakdown_fraction(hits, totals, labels: Labels, *, definition: str = "") -> dict[str, Any]:
    """Fraction ``sum(hits) / sum(totals)`` per group with a Wilson interval (per prompt: ``hits[i]``
    successes among ``totals[i]`` samples, e.g. the copy score's 3 name positions)."""
    hits, totals = np.asarray(hits, dtype=float), np.asarray(totals, dtype=float)

    def entry(rows):
        h, t = hits[rows].sum(), totals[rows].sum()
        return {"value": _finite(h / t) if t else None, "ci": wilson_interval(h, t), "n": int(len(rows))}

    return _assemble(entry, len(hits), labels, "fraction (Wilson CI)", definition)


def breakdown_many(compute: Callable[[np.ndarray], Mapping[str, Mapping[str, Any]]], n: int, labels: Labels,
                   *, statistic: str, definitions: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Several quantities computed together on each group's prompts (one ``compute(rows)`` call per
    group returning ``{quantity: {"value", "ci", "n"}}``), as one breakdown per quantity. For
    statistics that need the model per group (e.g. copy scores)."""
    _check_labels(labels, n)
    groups = {"overall": {"all": np.arange(n)}}
    groups.update({f"by_{g}": _groups(labels[g]) for g in GROUPINGS})
    results = {section: {name: dict(compute(rows)) for name, rows in members.items()}
               for section, members in groups.items()}
    quantities = list(results["overall"]["all"])
    out = {}
    for q in quantities:
        bd: dict[str, Any] = {"statistic": statistic, "definition": (definitions or {}).get(q, ""),
                              "overall": results["overall"]["all"][q]}
        for grouping in GROUPINGS:
            bd[f"by_{grouping}"] = {g: r[q] for g, r in results[f"by_{grouping}"].items()}
        bd["spread"] = _spread(bd["by_template"])
        out[q] = bd
    return out


def breakdown_heads(patched, clean, labels: Labels, *, k: int = 5, order: str = "negative",
                    seed: int = 0, definition: str = "", n_resamples: int = N_RESAMPLES,
                    head_names: Callable[[int, int], str] | None = None) -> dict[str, Any]:
    """Per group, the ``k`` heads whose path moves the group's mean LD most.

    Args:
        patched: ``[layers, heads, N]`` per-prompt LD with each head's path patched (NaN: sender
            unreachable).
        clean: ``[N]`` per-prompt clean LD.
        order: ``"negative"`` (most negative % change first: the heads that support the task) or
            ``"abs"`` (largest |% change| first).

    Each group's entry: ``{"top": ["9.9", ...], "effect": {"9.9": v, ...}, "ci": {"9.9": [lo, hi]},
    "n": n}``, with ``v = 100 (mean_g patched - mean_g clean) / mean_g clean``.
    """
    patched = np.asarray(patched, dtype=float)
    clean = np.asarray(clean, dtype=float)
    if patched.ndim != 3 or patched.shape[2] != clean.shape[0]:
        raise ValueError(f"patched must be [layers, heads, N={clean.shape[0]}], got {patched.shape}.")
    if order not in ("negative", "abs"):
        raise ValueError(f"order must be 'negative' or 'abs', got {order!r}.")
    name = head_names or (lambda layer, head: f"{layer}.{head}")
    L, H = patched.shape[:2]

    def entry(rows):
        base = clean[rows].mean()
        if base == 0:
            return {"top": [], "effect": {}, "ci": {}, "n": int(len(rows))}
        pct = 100.0 * (patched[:, :, rows] - clean[rows]) / base  # [L, H, n]
        means = pct.mean(-1)
        cells = [(means[l, h], l, h) for l in range(L) for h in range(H) if np.isfinite(means[l, h])]
        cells.sort(key=lambda c: c[0] if order == "negative" else -abs(c[0]))
        top = cells[:k]
        return {
            "top": [name(l, h) for _, l, h in top],
            "effect": {name(l, h): _finite(v) for v, l, h in top},
            "ci": {name(l, h): _pair(bootstrap_ci(pct[l, h], n_resamples=n_resamples, seed=seed))
                   for _, l, h in top},
            "n": int(len(rows)),
        }

    _check_labels(labels, clean.shape[0])
    out: dict[str, Any] = {"statistic": f"top-{k} heads ({order})", "definition": definition,
                           "overall": entry(np.arange(clean.shape[0]))}
    for grouping in GROUPINGS:
        out[f"by_{grouping}"] = {g: entry(rows) for g, rows in _groups(labels[grouping]).items()}
    return out


# ------------------------------------------------------------------------------------------------
# Reading breakdowns back (tables and the figure)
# ------------------------------------------------------------------------------------------------


def _is_head_breakdown(entry: Mapping[str, Any]) -> bool:
    return "top" in entry.get("overall", {})


def _fmt_value(value, ci) -> str:
    if value is None:
        return "—"
    text = f"{value:.3g}"
    if ci and ci[0] is not None and ci[1] is not None:
        text += f" [{ci[0]:.3g}, {ci[1]:.3g}]"
    return text


def _fmt_heads(entry: Mapping[str, Any], k: int = 3) -> str:
    heads = entry.get("top", [])[:k]
    return ", ".join(f"{h} ({entry['effect'][h]:+.3g})" for h in heads if entry["effect"].get(h) is not None) or "—"


def format_entry(breakdown: Mapping[str, Any], entry: Mapping[str, Any]) -> str:
    """One cell of a breakdown table (a value with its CI, or the top heads)."""
    if _is_head_breakdown(breakdown):
        return _fmt_heads(entry)
    return _fmt_value(entry.get("value"), entry.get("ci"))


def breakdown_rows(experiment: str, summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per quantity in ``summary["breakdown"]``: overall, ABBA, BABA, the template spread
    and every template's cell, as text (missing groups are empty)."""
    rows = []
    for quantity, bd in (summary.get("breakdown") or {}).items():
        by_order = bd.get("by_order", {})
        row = {
            "experiment": experiment,
            "quantity": quantity,
            "statistic": bd.get("statistic", ""),
            "overall": format_entry(bd, bd.get("overall", {})),
            "ABBA": format_entry(bd, by_order["ABBA"]) if "ABBA" in by_order else "",
            "BABA": format_entry(bd, by_order["BABA"]) if "BABA" in by_order else "",
            "templates": {g: format_entry(bd, e) for g, e in bd.get("by_template", {}).items()},
        }
        spread = bd.get("spread")
        if spread and spread.get("min") is not None:
            row["spread"] = (f"{spread['min']:.3g} ({spread['min_group']}) – "
                             f"{spread['max']:.3g} ({spread['max_group']})")
        else:
            row["spread"] = ""
        rows.append(row)
    return rows


def numeric_breakdowns(summary: Mapping[str, Any]) -> Iterable[tuple[str, Mapping[str, Any]]]:
    """The scalar (non-head) breakdowns of a summary, for plotting."""
    for quantity, bd in (summary.get("breakdown") or {}).items():
        if not _is_head_breakdown(bd):
            yield quantity, bd

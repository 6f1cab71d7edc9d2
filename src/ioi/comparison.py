"""Check the paper's claims against a results folder, and render ``paper_comparison.md``.

A claim (see ``paper_reference.yaml``) names an experiment's ``summary.json`` key and a check. Each
claim evaluates to PASS, FAIL or NOT RUN (results absent, with the reason), or WITHHELD when a run
that claims to be GPT-2 small failed the identity check (:mod:`ioi.identity`). Nothing is ever filled in
by hand: the markdown is generated from the results folder, and with no results every row says
NOT RUN.
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

PASS, FAIL, NOT_RUN, WITHHELD = "PASS", "FAIL", "NOT RUN", "WITHHELD"
SELFCHECK_FILE = Path("selfcheck") / "selfcheck.json"


class MissingResult(LookupError):
    """The claim's result is not there (experiment not run, or key absent)."""


@dataclasses.dataclass
class ClaimOutcome:
    claim_id: str
    section: str
    statement: str
    paper_value: Any
    ours: str
    tolerance: str
    status: str
    reason: str = ""
    experiment: str = ""


# ------------------------------------------------------------------------------------------------
# Reading results
# ------------------------------------------------------------------------------------------------


def load_reference(path: str | Path) -> dict:
    reference = yaml.safe_load(Path(path).read_text())
    ids = [claim["id"] for claim in reference["claims"]]
    duplicates = {i for i in ids if ids.count(i) > 1}
    if duplicates:
        raise ValueError(f"Duplicate claim ids in {path}: {sorted(duplicates)}")
    return reference


def load_summary(results_dir: Path, experiment: str) -> dict:
    path = results_dir / experiment / "summary.json"
    if not path.exists():
        raise MissingResult(f"experiment `{experiment}` not run: no {experiment}/summary.json")
    return json.loads(path.read_text())


def lookup(summary: Mapping, key: str, experiment: str = "") -> Any:
    """``"a.b"`` -> ``summary["a"]["b"]``; the last part may itself contain dots (head names).

    A key the experiment deliberately did not compute is listed in its summary's ``not_run``
    mapping (key -> why): the claim is NOT RUN with that reason."""
    skipped = summary.get("not_run") if isinstance(summary, Mapping) else None
    if isinstance(skipped, Mapping) and key in skipped:
        raise MissingResult(f"{experiment}/summary.json: {skipped[key]}")
    node: Any = summary
    parts = key.split(".")
    index = 0
    while index < len(parts):
        if not isinstance(node, Mapping):
            raise MissingResult(f"{experiment}/summary.json: '{key}' is not a mapping path")
        rest = ".".join(parts[index:])
        if rest in node:
            return node[rest]
        if parts[index] not in node:
            raise MissingResult(f"{experiment}/summary.json has no key '{key}'")
        node = node[parts[index]]
        index += 1
    return node


def source_value(results_dir: Path, source: Mapping) -> tuple[Any, Any]:
    """The claim's value and its 95% CI (``<key>_ci`` beside it) when the experiment recorded one."""
    summary = load_summary(results_dir, source["experiment"])
    value = lookup(summary, source["key"], source["experiment"])
    try:
        ci = lookup(summary, source["key"] + "_ci", source["experiment"])
    except MissingResult:
        ci = None
    if not (isinstance(ci, (list, tuple)) and len(ci) == 2):
        ci = None  # only a [low, high] pair is a CI of this value
    return value, ci


# ------------------------------------------------------------------------------------------------
# Checks: each returns (passed, our value as text, tolerance as text, reason)
# ------------------------------------------------------------------------------------------------

CheckResult = tuple[bool, str, str, str]


def _number(value: Any) -> float:
    number = float(value)
    if math.isnan(number):
        raise MissingResult("the result is NaN")
    return number


def _heads(value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise MissingResult("expected a per-head mapping {'layer.head': value}")
    return {str(k): float(v) for k, v in value.items() if v is not None and not math.isnan(float(v))}


def _ranked(values: Mapping[str, float], *, key: Callable[[float], float]) -> list[str]:
    return [head for head, _ in sorted(values.items(), key=lambda item: key(item[1]))]


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def _check_abs(value, check) -> CheckResult:
    ours = _number(value)
    ok = abs(ours - check["value"]) <= check["tolerance"]
    return ok, _fmt(ours), f"±{check['tolerance']}", f"|{_fmt(ours)} - {check['value']}|"


def _check_range(value, check) -> CheckResult:
    ours = _number(value)
    ok = check["low"] <= ours <= check["high"]
    return ok, _fmt(ours), f"[{check['low']}, {check['high']}]", ""


def _check_at_least(value, check) -> CheckResult:
    ours = _number(value)
    return ours >= check["bound"], _fmt(ours), f">= {check['bound']}", ""


def _check_at_most(value, check) -> CheckResult:
    ours = _number(value)
    return ours <= check["bound"], _fmt(ours), f"<= {check['bound']}", ""


def _check_top_k_exact(value, check) -> CheckResult:
    heads = _heads(value)
    k = check["k"]
    top = _ranked(heads, key=lambda v: -abs(v))[:k]
    wrong_sign = [h for h, s in check.get("signs", {}).items() if h in heads and math.copysign(1, heads[h]) != s]
    ok = set(top) == set(check["heads"]) and not wrong_sign
    ours = "top-{}: {}".format(k, ", ".join(f"{h} ({heads[h]:+.3g})" for h in top))
    reason = f"wrong sign: {wrong_sign}" if wrong_sign else ""
    expected = f"exactly {{{', '.join(check['heads'])}}} with signs"
    if ok and "margin" in check:
        ok, reason = _margin_holds(heads, check, lambda v: -abs(v))
        expected += f", |effect| ahead of every other head by >= {check['margin']:g}"
    return ok, ours, expected, reason


def _margin_holds(heads: dict, check, order) -> tuple[bool, str]:
    """Whether every expected head is ahead of every other head by ``check["margin"]`` on the
    ranking key ``order`` (smaller = more extreme), and the reason when not."""
    expected = [h for h in check["heads"] if h in heads]
    others = [h for h in heads if h not in check["heads"]]
    if not expected or not others:
        return True, ""
    weakest = max(expected, key=lambda h: order(heads[h]))
    closest = min(others, key=lambda h: order(heads[h]))
    gap = order(heads[closest]) - order(heads[weakest])
    if gap >= check["margin"]:
        return True, ""
    return False, f"margin {gap:.3g} < {check['margin']:g} ({weakest} vs {closest})"


def _check_in_extreme(value, check) -> CheckResult:
    heads = _heads(value)
    side = check["side"]
    order = {
        "negative": lambda v: v,
        "positive": lambda v: -v,
        "smallest": lambda v: v,
        "largest": lambda v: -v,
    }[side]
    ranked = _ranked(heads, key=order)
    extreme = ranked[: check["k"]]
    missing = [h for h in check["heads"] if h not in extreme]
    ok = len(missing) <= check.get("allow_missing", 0)
    ours = f"{check['k']} most {side}: " + ", ".join(f"{h} ({heads[h]:+.3g})" for h in extreme)
    expected = f"all of {{{', '.join(check['heads'])}}} in the {check['k']} most {side}"
    reason = f"missing: {missing}" if missing else ""
    if ok and "margin" in check:
        ok, reason = _margin_holds(heads, check, order)
        expected += f", ahead of every other head by >= {check['margin']:g}"
    return ok, ours, expected, reason


def _check_rank_at_most(value, check) -> CheckResult:
    heads = _heads(value)
    key = (lambda v: -abs(v)) if check.get("by_abs") else (lambda v: -v)
    ranked = _ranked(heads, key=key)
    ranks = {h: ranked.index(h) + 1 if h in ranked else None for h in check["heads"]}
    ok = all(r is not None and r <= check["k"] for r in ranks.values())
    ours = ", ".join(f"{h}: rank {r}" for h, r in ranks.items())
    return ok, ours, f"rank <= {check['k']}", ""


def _check_sign(value, check) -> CheckResult:
    heads = _heads(value)
    wrong = [h for h, s in check["signs"].items() if h not in heads or math.copysign(1, heads[h]) != s]
    ours = ", ".join(f"{h}: {heads.get(h, float('nan')):+.3g}" for h in check["signs"])
    signs = ", ".join(f"{h} {'+' if s > 0 else '-'}" for h, s in check["signs"].items())
    return not wrong, ours, signs, f"wrong sign: {wrong}" if wrong else ""


def _check_all_at_least(value, check) -> CheckResult:
    """Every head of ``heads`` >= ``bound``; the heads of the optional ``report`` list are shown
    beside them but not checked (e.g. the name movers the paper's claim is not about)."""
    heads = _heads(value)
    low = [h for h in check["heads"] if heads.get(h, -math.inf) < check["bound"]]
    ours = ", ".join(f"{h}: {heads.get(h, float('nan')):.3g}" for h in check["heads"])
    if check.get("report"):
        ours += " (also, not checked: " + ", ".join(
            f"{h}: {heads.get(h, float('nan')):.3g}" for h in check["report"]) + ")"
    return not low, ours, f"each >= {check['bound']}", f"below: {low}" if low else ""


def _check_overlap_at_least(value, check) -> CheckResult:
    found = [str(h) for h in value]
    overlap = sorted(set(found) & set(check["heads"]))
    ok = len(overlap) >= check["minimum"]
    return ok, f"{len(overlap)} of {len(check['heads'])}: {', '.join(found)}", (
        f">= {check['minimum']} of the paper's heads"
    ), ""


def _check_cells_abs(value, check, paper_value) -> CheckResult:
    cells = {k: _number(v) for k, v in dict(value).items()}
    failures = []
    for cell, paper in paper_value.items():
        tolerance = check["baseline_tolerance"] if cell == check.get("baseline_cell") else check["tolerance"]
        if cell not in cells or abs(cells[cell] - paper) > tolerance:
            failures.append(cell)
    ours = ", ".join(f"{k} {cells[k]:.2f}" for k in paper_value if k in cells)
    return not failures, ours, f"each ±{check['tolerance']} (baseline ±{check.get('baseline_tolerance')})", (
        f"outside: {failures}" if failures else ""
    )


def _check_sign_match(value, check, paper_value) -> CheckResult:
    cells = {k: _number(v) for k, v in dict(value).items()}
    wrong = [k for k, s in paper_value.items()
             if k not in cells or math.copysign(1, cells[k]) != math.copysign(1, s)]
    return not wrong, ", ".join(f"{k} {cells.get(k, float('nan')):+.2f}" for k in paper_value), (
        "same sign in every cell"
    ), f"wrong sign: {wrong}" if wrong else ""


_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


def load_selfcheck(results_dir: str | Path) -> dict | None:
    """The run's ``selfcheck/selfcheck.json`` (:func:`ioi.pipeline.run_selfcheck_job`), if any."""
    path = Path(results_dir) / SELFCHECK_FILE
    return json.loads(path.read_text()) if path.exists() else None


def withheld_reason(results_dir: str | Path) -> str | None:
    """Why every verdict of this results folder is withheld, or ``None``: the run claims to be
    GPT-2 small (:func:`ioi.identity.claims_to_be_gpt2_small`) and its weights failed the identity
    check on the seed's 8 prompts (:func:`ioi.identity.identity_check`)."""
    record = load_selfcheck(results_dir)
    identity = (record or {}).get("identity") or {}
    if identity.get("applicable") and not identity.get("passed"):
        return identity.get("reason") or "the weights are not GPT-2 small (identity check failed)"
    return None


def selfcheck_header(results_dir: str | Path) -> str:
    """One paragraph for the comparison's header: the fast engine's self-check on these weights
    (largest |fast - reference|) and the GPT-2 small identity check ("" when the results folder
    does not exist at all)."""
    if not Path(results_dir).exists():
        return ""  # nothing has run: every row already says NOT RUN
    record = load_selfcheck(results_dir)
    if record is None:
        return (f"Self-check: not run (no `{SELFCHECK_FILE.as_posix()}` in the results folder), so "
                "neither the fast engine nor the weights' identity has been checked on this run.")
    engine, identity = record["engine"], record.get("identity") or {}
    text = (f"Self-check on these weights: max |fast − reference| = {engine['max_abs_diff']:.2g} over "
            f"{engine['n_comparisons']} comparisons of path patching (logits, q, k, v, with a "
            f"knockout), activation patching and knockouts on {engine['n_prompts']} prompts "
            f"(tolerance {engine['tolerance']:g}): {'PASS' if engine['passed'] else 'FAIL'}.")
    if identity.get("applicable"):
        if identity.get("passed"):
            text += (f" GPT-2 small identity: the seed's 8 example prompts (BOS on) match ARENA's "
                     f"published logit differences within ±{identity['tolerance']:g} "
                     f"(max |diff| {identity['max_abs_diff']:.2g}): PASS.")
        else:
            text += (f" **Every verdict is WITHHELD**: {identity.get('reason')}.")
    return text


def evaluate_claim(claim: Mapping, results_dir: str | Path) -> ClaimOutcome:
    """Evaluate one claim against ``results_dir`` (``results/{model}``); WITHHELD (with the
    reason) when the run claims to be GPT-2 small and its weights failed the identity check."""
    outcome = _evaluate_claim(claim, results_dir)
    reason = withheld_reason(results_dir)
    if reason is not None:
        outcome.status, outcome.reason = WITHHELD, reason
    return outcome


def _evaluate_claim(claim: Mapping, results_dir: str | Path) -> ClaimOutcome:
    results_dir = Path(results_dir)
    check = claim["check"]
    kind = check["kind"]
    base = dict(
        claim_id=claim["id"],
        section=claim.get("section", ""),
        statement=claim["statement"],
        paper_value=claim.get("paper_value"),
        experiment=claim["source"]["experiment"],
    )
    try:
        value, ci = source_value(results_dir, claim["source"])
        if kind == "compare":
            other, _ = source_value(results_dir, check["other"])
            ours_v, other_v = _number(value), _number(other)
            factor = float(check.get("factor", 1.0))
            ok = _OPS[check["op"]](ours_v, factor * other_v + check.get("margin", 0.0))
            scaled = f"{factor:g} x other" if factor != 1.0 else "other"
            result = (ok, f"{_fmt(ours_v)} vs {_fmt(other_v)}",
                      f"{check['op']} {scaled} {check.get('margin', 0):+g}", "")
        elif kind in ("cells_abs", "sign_match"):
            fn = _check_cells_abs if kind == "cells_abs" else _check_sign_match
            result = fn(value, check, claim["paper_value"])
        else:
            fn = CHECKS.get(kind)
            if fn is None:
                raise ValueError(f"Unknown check kind {kind!r} in claim {claim['id']!r}")
            result = fn(value, check)
    except MissingResult as missing:
        return ClaimOutcome(ours="—", tolerance=describe_tolerance(check), status=NOT_RUN,
                            reason=str(missing), **base)
    ok, ours, tolerance, reason = result
    if ci is not None:
        ours += f" (95% CI {float(ci[0]):.3g}–{float(ci[1]):.3g})"
    return ClaimOutcome(ours=ours, tolerance=tolerance, status=PASS if ok else FAIL,
                        reason=reason, **base)


CHECKS: dict[str, Callable[[Any, Mapping], CheckResult]] = {
    "abs": _check_abs,
    "range": _check_range,
    "at_least": _check_at_least,
    "at_most": _check_at_most,
    "top_k_exact": _check_top_k_exact,
    "in_extreme": _check_in_extreme,
    "rank_at_most": _check_rank_at_most,
    "sign": _check_sign,
    "all_at_least": _check_all_at_least,
    "overlap_at_least": _check_overlap_at_least,
}


def describe_tolerance(check: Mapping) -> str:
    kind = check["kind"]
    if kind == "abs":
        return f"±{check['tolerance']}"
    if kind == "range":
        return f"[{check['low']}, {check['high']}]"
    if kind in ("at_least", "all_at_least"):
        return f">= {check['bound']}"
    if kind == "at_most":
        return f"<= {check['bound']}"
    if kind == "cells_abs":
        return f"each ±{check['tolerance']}"
    if kind in ("in_extreme", "rank_at_most", "top_k_exact"):
        return f"{kind.replace('_', ' ')} k={check['k']}"
    return kind.replace("_", " ")


def evaluate_reference(reference_path: str | Path, results_dir: str | Path) -> list[ClaimOutcome]:
    reference = load_reference(reference_path)
    return [evaluate_claim(claim, results_dir) for claim in reference["claims"]]


# ------------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------------


def _cell(text: Any) -> str:
    if isinstance(text, Mapping):
        text = ", ".join(f"{k}: {v}" for k, v in text.items())
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(
    outcomes: list[ClaimOutcome],
    *,
    model_label: str,
    results_dir: str,
    figures_dir: str,
    figure_links: Mapping[str, list[str]] | None = None,
    title: str = "Paper comparison",
    preamble: str = "",
    checks: str = "",
) -> str:
    """A markdown table: claim, paper value, ours, tolerance, status, figures."""
    counts = {status: sum(o.status == status for o in outcomes)
              for status in (PASS, FAIL, NOT_RUN, WITHHELD)}
    lines = [
        f"# {title}",
        "",
        "<!-- Generated by `python -m ioi compare` from the results folder; do not edit by hand. -->",
        "",
        f"Model: **{model_label}**. Results read from `{results_dir}/`. "
        f"{counts[PASS]} PASS, {counts[FAIL]} FAIL, {counts[NOT_RUN]} NOT RUN"
        + (f", {counts[WITHHELD]} WITHHELD" if counts[WITHHELD] else "")
        + f" of {len(outcomes)} claims.",
        "",
    ]
    if checks:
        lines += [checks, ""]
    if preamble:
        lines += [preamble, ""]
    lines += [
        "| claim | where | paper says | paper value | ours | tolerance | status | figures |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        figures = (figure_links or {}).get(o.experiment, [])
        links = " ".join(f"[{Path(f).stem}]({figures_dir}/{f})" for f in figures)
        status = o.status + (f" ({_cell(o.reason)})" if o.reason and o.status != PASS else "")
        lines.append(
            f"| `{o.claim_id}` | {_cell(o.section)} | {_cell(o.statement)} | {_cell(o.paper_value)} "
            f"| {_cell(o.ours)} | {_cell(o.tolerance)} | {status} | {links} |"
        )
    lines.append("")
    return "\n".join(lines)


def figure_links_by_experiment() -> dict[str, list[str]]:
    from ioi.registry import FIGURES

    links: dict[str, list[str]] = {}
    for spec in FIGURES.values():
        links.setdefault(spec.experiment, []).append(f"{spec.name}.png")
    return links


# ------------------------------------------------------------------------------------------------
# Secondary table: every headline number per order and per template (ioi.breakdown)
# ------------------------------------------------------------------------------------------------


def breakdown_tables(results_dir: str | Path, experiments: list[str] | None = None) -> str:
    """Markdown: each experiment's ``summary["breakdown"]`` per order (ABBA / BABA, with the spread
    over templates), then per template. Experiments without results are listed as NOT RUN."""
    from ioi.breakdown import breakdown_rows

    results_dir = Path(results_dir)
    if experiments is None:
        from ioi.registry import EXPERIMENTS

        experiments = list(EXPERIMENTS)
    rows, missing = [], []
    for experiment in experiments:
        try:
            summary = load_summary(results_dir, experiment)
        except MissingResult:
            missing.append(experiment)
            continue
        rows.extend(breakdown_rows(experiment, summary))
    lines = [
        "## Secondary table: per order and per template",
        "",
        "Every headline number of the claims above, recomputed on each order's (ABBA / BABA) and each "
        "template's prompts (`summary.json` key `breakdown`, `ioi.breakdown`): value [95% CI] "
        "(bootstrap over the group's prompts; Wilson for copy scores); path-patching sweeps list each "
        "group's top heads (% change of the group's mean LD). Templates hold few prompts each at the "
        "paper's N, so their CIs are wide. No verdicts: the paper reports no per-template numbers.",
        "",
    ]
    if not rows:
        lines += [f"NOT RUN: no breakdowns in `results/{Path(results_dir).name}/` "
                  f"({len(missing)} experiments without results).", ""]
        return "\n".join(lines)
    lines += ["| experiment | quantity | statistic | all prompts | ABBA | BABA | spread over templates |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['experiment']}` | {_cell(r['quantity'])} | {_cell(r['statistic'])} | "
                     f"{_cell(r['overall'])} | {_cell(r['ABBA'])} | {_cell(r['BABA'])} | {_cell(r['spread'])} |")
    templates = sorted({t for r in rows for t in r["templates"]},
                       key=lambda t: (t.partition("-")[0], int(t.partition("-")[2]) if t.partition("-")[2].isdigit() else -1))
    lines += ["", "Per template:", "",
              "| experiment | quantity | " + " | ".join(templates) + " |",
              "|---|---|" + "---|" * len(templates)]
    for r in rows:
        cells = " | ".join(_cell(r["templates"].get(t, "")) for t in templates)
        lines.append(f"| `{r['experiment']}` | {_cell(r['quantity'])} | {cells} |")
    if missing:
        lines += ["", f"NOT RUN (no results): {', '.join(f'`{m}`' for m in missing)}."]
    lines.append("")
    return "\n".join(lines)

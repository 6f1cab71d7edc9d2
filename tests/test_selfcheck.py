"""The run's self-check (ioi.selfcheck) and the GPT-2 small identity check (ioi.identity).

* The self-check passes on a random model (BOS on and off) and fails, naming the comparison, when a
  fast path is perturbed by 1e-3 (path patching, activation patching, knockouts, and the engine's
  shared unembedding of the two answer logits).
* A GPT-2-shaped random checkpoint saved with ``save_pretrained`` and run under the name
  ``gpt2-small`` fails the identity check: every verdict of its comparison is WITHHELD, the table
  says why, and the tolerance tests (tests/replication) skip with that reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ioi import ablation as ablation_module
from ioi import identity, selfcheck
from ioi.comparison import WITHHELD, evaluate_reference, selfcheck_header, withheld_reason
from ioi.patching import activation as activation_module
from ioi.patching import path as path_module
from ioi.patching._fast_forward import NetWeights

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
SPEC = "random-L2-H4-D16"


@pytest.mark.parametrize("bos", [False, True], ids=["no-bos", "bos"])
def test_selfcheck_passes_on_a_random_model(tiny_model, bos):
    report = selfcheck.run_selfcheck(tiny_model, model_spec=SPEC, n=4, dataset_settings={"prepend_bos": bos})
    names = [c.name for c in report.comparisons]
    assert report.passed and report.max_abs_diff <= 1e-4, report.failure_message()
    for kind in ("logits", "q of", "k of", "v of", "logits with a knockout"):
        assert any(f"path -> {kind}" in n for n in names), (kind, names)
    assert sum(n.startswith("activation:") for n in names) == 6
    assert sum(n.startswith("knockout:") for n in names) == 5
    assert all(c.n_values > 0 for c in report.comparisons)
    assert report.sample["prepend_bos"] is bos


def _shifted(fn, where=lambda out: out):
    """``fn`` with 1e-3 added to its result (or to the part ``where`` selects)."""
    def perturbed(*args, **kwargs):
        out = fn(*args, **kwargs)
        where(out).add_(1e-3)
        return out
    return perturbed


PERTURBATIONS = {
    "path -> logits": (path_module, "path_patch_to_logits", lambda out: out.heads),
    "path -> v of": (path_module, "path_patch_to_heads", lambda out: out.heads),
    "activation: resid_pre": (activation_module, "get_act_patch_resid_pre", lambda out: out),
    "knockout: F(C)": (ablation_module, "evaluate_circuit", lambda out: out),
}


@pytest.mark.parametrize("expected", list(PERTURBATIONS))
def test_a_perturbed_fast_path_fails_the_selfcheck(tiny_model, monkeypatch, expected):
    module, name, where = PERTURBATIONS[expected]
    monkeypatch.setattr(module, name, _shifted(getattr(module, name), where))
    with pytest.raises(selfcheck.SelfCheckError, match="Self-check FAILED") as failure:
        selfcheck.run_selfcheck(tiny_model, model_spec=SPEC, n=4)
    assert expected in str(failure.value)


def test_a_perturbed_engine_fails_path_and_activation_checks(tiny_model, monkeypatch):
    """A bug deep in the engine both fast patching paths share (NetWeights' LayerNorm mixes in 5%
    of a neighbouring feature) is caught by the path and the activation comparisons."""
    original = NetWeights.ln

    def ln(self, x, params):
        out = original(self, x, params)
        return out + 0.05 * out.roll(1, dims=-1)

    monkeypatch.setattr(NetWeights, "ln", ln)
    report = selfcheck.run_selfcheck(tiny_model, model_spec=SPEC, n=4, raise_on_failure=False)
    failed = [c.name for c in report.failures]
    assert any(n.startswith("path ->") for n in failed), failed
    assert any(n.startswith("activation:") for n in failed), failed


# ----------------------------------------------------------------------------------------------
# Identity
# ----------------------------------------------------------------------------------------------


def test_which_runs_claim_to_be_gpt2_small(tmp_path):
    (tmp_path / "gpt2-small").mkdir()
    assert identity.claims_to_be_gpt2_small("gpt2-small", "/anything")
    assert identity.claims_to_be_gpt2_small("x", "gpt2")
    assert identity.claims_to_be_gpt2_small("local-gpt2-small", tmp_path / "gpt2-small")
    assert not identity.claims_to_be_gpt2_small("planted-ioi", "planted-ioi")
    assert not identity.claims_to_be_gpt2_small("random-gpt2-small", "random-gpt2-small")


def test_identity_passes_on_arena_values(tiny_model, monkeypatch):
    monkeypatch.setattr(identity, "seed_prompt_logit_diffs",
                        lambda model: [v + 0.004 for v in identity.ARENA_SEED_PROMPT_LOGIT_DIFFS])
    record = identity.identity_check(tiny_model, model_label="gpt2-small", model_spec="gpt2-small")
    assert record["applicable"] and record["passed"] and "reason" not in record


@pytest.fixture(scope="module")
def fake_gpt2_results(tmp_path_factory):
    """A GPT-2-shaped random checkpoint (save_pretrained, 2 layers) run under the name gpt2-small:
    the self-check job's selfcheck.json in results/gpt2-small/."""
    from ioi.models import build_random_hf_model
    from ioi.pipeline import run_selfcheck_job
    from ioi.tokenizer import get_gpt2_tokenizer

    root = tmp_path_factory.mktemp("fake-gpt2")
    checkpoint = root / "checkpoint"
    build_random_hf_model(SPEC, seed=0).save_pretrained(checkpoint)
    get_gpt2_tokenizer().save_pretrained(checkpoint)
    results = root / "results" / "gpt2-small"
    run_selfcheck_job(model_spec=str(checkpoint), model_label="gpt2-small",
                      out_path=str(results / "selfcheck" / "selfcheck.json"), seed=0, device="cpu",
                      dataset_settings={}, n=2, threads=1)
    return results


def test_fake_gpt2_gets_every_verdict_withheld(fake_gpt2_results, tmp_path):
    from ioi.__main__ import write_comparison

    record = json.loads((fake_gpt2_results / "selfcheck" / "selfcheck.json").read_text())
    assert record["engine"]["passed"]  # the engine is right on these weights ...
    assert record["identity"]["applicable"] and record["identity"]["passed"] is False  # ... not GPT-2
    reason = withheld_reason(fake_gpt2_results)
    assert reason and "not GPT-2 small" in reason
    outcomes = evaluate_reference(REPO / "paper_reference.yaml", fake_gpt2_results)
    assert outcomes and all(o.status == WITHHELD for o in outcomes)
    out = tmp_path / "paper_comparison.md"
    write_comparison(REPO / "paper_reference.yaml", fake_gpt2_results, out)
    table = out.read_text()
    assert f"{len(outcomes)} WITHHELD" in table and "Every verdict is WITHHELD" in table
    assert "not GPT-2 small" in selfcheck_header(fake_gpt2_results)
    assert "| PASS |" not in table and "| FAIL" not in table


def test_tolerance_tests_skip_for_fake_gpt2(fake_gpt2_results):
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
         "tests/replication/test_paper_claims.py", "--results", str(fake_gpt2_results)],
        cwd=REPO, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert "WITHHELD: the weights are not GPT-2 small" in done.stdout
    assert " passed" not in done.stdout.splitlines()[-1], done.stdout.splitlines()[-1]

"""The seed notebook's activation patching experiments and figures, on a tiny random model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ioi.circuits import Circuit
from ioi.data import IOIDataset
from ioi.experiments.core import RunContext
from ioi.models import load_model
from ioi.plots.common import save_figure
from ioi.registry import EXPERIMENTS, FIGURES, resolve

NAMES = ("act_patch_resid_pre", "act_patch_block", "act_patch_head_out", "act_patch_head_every",
         "act_patch_head_by_pos")


@pytest.fixture(scope="module")
def results():
    model = load_model("random-L3-H4-D16", device="cpu")
    dataset = IOIDataset(N=8, seed=1)
    circuit = Circuit("toy", {"name mover": ((2, 1),), "s-inhibition": ((1, 0),)})
    ctx = RunContext(datasets={"ioi": dataset, "abc": dataset.abc_dataset()}, circuit=circuit, n=8,
                     progress=False)
    with torch.inference_mode():
        return {name: resolve(EXPERIMENTS[name].runner)(model, ctx) for name in NAMES}


def test_layer0_s2_residual_patch_restores_clean(results):
    """S2 is the only token that differs: patching its clean layer-0 residual gives the clean run."""
    summary = results["act_patch_resid_pre"].summary
    grid = np.array(summary["resid_pre"])
    s2 = summary["positions"].index("S2")
    assert grid[0, s2] == pytest.approx(1.0, abs=1e-4)
    others = [i for i, p in enumerate(summary["positions"]) if p not in ("S2", "END")]
    assert np.allclose(grid[:, others], 0.0, atol=1e-4)  # positions before S2 carry no difference


def test_block_resid_pre_matches_resid_pre_experiment(results):
    block = np.array(results["act_patch_block"].summary["resid_pre"])
    np.testing.assert_allclose(block, np.array(results["act_patch_resid_pre"].summary["resid_pre"]), atol=1e-5)


def test_head_every_output_matches_head_out(results):
    every = results["act_patch_head_every"].summary["output"]
    out = results["act_patch_head_out"].summary["output"]
    for key in out:
        assert every[key] == pytest.approx(out[key], abs=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_figures_render(name, results, tmp_path):
    result = results[name]
    assert {"value"} <= set(result.data.columns)
    meta = {"model": {"spec": "random-L3-H4-D16"}, "N": 8}
    fig = resolve(FIGURES[name].plotter)(result.data, result.summary, meta)
    assert "random-L3-H4-D16" in fig._suptitle.get_text()
    save_figure(fig, tmp_path / f"{name}.png", tmp_path / f"{name}.pdf")
    assert (tmp_path / f"{name}.png").stat().st_size > 1000

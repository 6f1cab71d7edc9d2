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


def _assert_same_effects(a, b) -> None:
    """Two experiments' normalised effects ``(LD - LD_corrupted) / (LD_clean - LD_corrupted)`` of
    the same patch agree at the project's tolerance (1e-4, float32). On this random model
    ``LD_clean - LD_corrupted`` is about 0.0015, so float32 rounding of the logit difference moves
    the normalised effect by up to ~1e-4: the two experiments batch their runs differently and round
    differently on different CPU kernels (an AVX512 host read 2.0e-5, over the 1e-5 this used)."""
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), atol=1e-4)


def test_block_resid_pre_matches_resid_pre_experiment(results):
    _assert_same_effects(results["act_patch_block"].summary["resid_pre"],
                         results["act_patch_resid_pre"].summary["resid_pre"])


def test_head_every_output_matches_head_out(results):
    every = results["act_patch_head_every"].summary["output"]
    out = results["act_patch_head_out"].summary["output"]
    assert set(every) >= set(out)
    keys = sorted(out)
    _assert_same_effects([every[k] for k in keys], [out[k] for k in keys])


@pytest.mark.parametrize("name", NAMES)
def test_figures_render(name, results, tmp_path):
    result = results[name]
    assert {"value"} <= set(result.data.columns)
    meta = {"model": {"spec": "random-L3-H4-D16"}, "N": 8}
    fig = resolve(FIGURES[name].plotter)(result.data, result.summary, meta)
    assert "random-L3-H4-D16" in fig._suptitle.get_text()
    save_figure(fig, tmp_path / f"{name}.png", tmp_path / f"{name}.pdf")
    assert (tmp_path / f"{name}.png").stat().st_size > 1000

"""Device readiness without a GPU (issue 11 item 4): every tensor the fast paths create says where.

A ``torch.zeros`` / ``arange`` / ``tensor`` / ... call without ``device=`` makes a CPU tensor; with
the model on CUDA it then either fails deep in torch (mixed devices) or costs a host->device copy
(and a sync) each time. On a CPU-only machine nothing shows it: every tensor is on the CPU. So the
fast-path modules are read as source: each factory call must name its device (``device=x.device``,
or ``device="cpu"`` where a CPU tensor is meant: tokens built like a dataset's, a seeded CPU
generator, results handed back on the CPU).

Why not run the fast paths on the ``meta`` device or under ``torch.set_default_device``: the
default device also changes ``torch.as_tensor(t)`` (it moves ``t``), which the fast paths use to
accept lists or tensors, so every such call would be a false alarm; and a model on ``meta`` cannot
run what the fast paths need (``nonzero``, ``unique``, ``.item()`` on positions, reading results).
``make gpu-check`` runs the device tests on CUDA where a GPU is lent.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "ioi"

# The fast paths and what they call (ioi.edges included: its graph and masks live on the CPU by
# name, device="cpu", and the engine moves what it needs to the model's device).
FAST_PATH_FILES = sorted(
    [*SRC.glob("patching/*.py"), *SRC.glob("experiments/*.py"), *SRC.glob("analysis/*.py"), *SRC.glob("edges/*.py")]
    + [SRC / name for name in ("server.py", "selfcheck.py", "identity.py", "breakdown.py", "forward.py",
                               "metrics.py", "ablation.py", "ablation_engine.py", "ablation_reference.py")]
)
FACTORIES = frozenset({"zeros", "ones", "empty", "full", "arange", "linspace", "logspace", "eye", "tensor",
                       "rand", "randn", "randint", "randperm", "tril_indices", "triu_indices"})


def factories_without_device(source: str, filename: str = "<source>") -> list[str]:
    """``file:line: torch.name(...)`` for each ``torch.<factory>(...)`` call with no ``device=``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                and not any(k.arg == "device" or k.arg is None for k in node.keywords)):
            found.append(f"{filename}:{node.lineno}: {ast.get_source_segment(source, node)}")
    return found


def test_the_check_flags_a_factory_without_device():
    source = ("import torch\n"
              "a = torch.arange(3)\n"
              "b = torch.zeros(2, device=x.device)\n"
              "c = torch.tensor([1, 2], dtype=torch.long)\n"
              "d = torch.full((2,), 0, **kwargs)\n"
              "e = torch.as_tensor([1])\n")
    assert [line.split(":")[1] for line in factories_without_device(source)] == ["2", "4"]


def test_the_fast_paths_name_the_device_of_every_tensor_they_create():
    assert len(FAST_PATH_FILES) > 20 and all(p.exists() for p in FAST_PATH_FILES)
    problems = [p for path in FAST_PATH_FILES
                for p in factories_without_device(path.read_text(), str(path.relative_to(SRC.parents[1])))]
    assert not problems, ("tensors created without device= (CPU while the model may be on CUDA): pass "
                          "device=<the model's or the input's device>, or device='cpu' where a CPU tensor "
                          "is meant:\n  " + "\n  ".join(problems))

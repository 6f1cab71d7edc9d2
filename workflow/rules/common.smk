# Helpers shared by the rules: config validation, the model folder, library sources as inputs.
from pathlib import Path

from snakemake.utils import validate

from ioi.registry import EXPERIMENTS, FIGURES as FIGURE_SPECS, PAGES as PAGE_SPECS


validate(config, schema="../schemas/config.schema.yaml")


def model_spec():
    """The model the workflow runs on: model_path when set, else the `model` spec."""
    return config["model_path"] or config["model"]


def model_name():
    """Folder name under results/ and figures/, so runs of different models never mix."""
    if config["model_name"]:
        return config["model_name"]
    from ioi.models import model_slug

    return model_slug(model_spec())


def uses_gpu():
    """Whether experiments will run on CUDA: device cuda*, or auto with a GPU visible."""
    device = str(config["device"])
    if device == "cpu":
        return False
    if device.startswith("cuda"):
        return True
    import torch

    return torch.cuda.is_available()


MODEL = model_name()
USES_GPU = uses_gpu()
PLANTED_REFERENCE = "tests/replication/planted_reference.yaml"
RESULTS = f"results/{MODEL}"
FIGURES = f"figures/{MODEL}"
DATASETS = "results/datasets"


def figure_model_label():
    """How the report's figure captions name the model: as the figure titles do
    (ioi.labels.model_label: model_name or the checkpoint folder's name, never a machine path)."""
    from ioi.labels import model_label

    return model_label({"model": {"spec": str(model_spec())}, "model_label": MODEL})


def lib_sources(*modules):
    """Library modules a rule imports, as inputs, so editing them re-runs the rule (mtime)."""
    root = Path("src/ioi")
    paths = []
    for module in modules:
        package = root / module
        if package.is_dir():
            paths.extend(sorted(str(p) for p in package.glob("*.py")))
        else:
            paths.append(str(root / f"{module}.py"))
    return paths


def dataset_path(kind, n):
    """The IOI (or ABC) dataset of n prompts for this config's dataset settings and seed."""
    return f"{DATASETS}/{kind}_n{n}_seed{config['seed']}.parquet"


# What experiments import: the package minus its plotting code, the figures' model names and the
# gallery writer (so a change there redraws figures or rewrites the gallery without re-running
# every experiment).
LIBRARY_SOURCES = sorted(str(p) for p in Path("src/ioi").rglob("*.py")
                         if "plots" not in p.parts and p.name not in ("gallery.py", "labels.py"))
PLOT_SOURCES = sorted(str(p) for p in Path("src/ioi/plots").glob("*.py")) + [
    "src/ioi/labels.py", "src/ioi/registry.py"]


def all_targets():
    """Every figure (PNG + PDF), every interactive page (HTML), every experiment's results, the
    comparison table and the figure gallery (figures/{model}/README.md) for the configured model."""
    figures = [f"{FIGURES}/{name}.{ext}" for name in FIGURE_SPECS for ext in ("png", "pdf")]
    pages = [f"{FIGURES}/{name}.html" for name in PAGE_SPECS]
    results = [f"{RESULTS}/{name}/summary.json" for name in EXPERIMENTS]
    return figures + pages + results + [f"{RESULTS}/paper_comparison.md", f"{FIGURES}/README.md"]

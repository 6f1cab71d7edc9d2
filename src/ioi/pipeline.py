"""Glue between Snakemake scripts and the library, so the scripts stay a few lines long."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Any, Iterator, TextIO

from ioi.provenance import provenance, write_json


class _Tee:
    def __init__(self, *streams: TextIO):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
            stream.flush()
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()

    def isatty(self) -> bool:
        return False


@contextlib.contextmanager
def log_to(path: str | Path) -> Iterator[None]:
    """Copy stdout and stderr (progress bars included) into the rule's log file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as log:
        old_out, old_err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(old_out, log), _Tee(old_err, log)
        handler = logging.StreamHandler(sys.stderr)
        logging.getLogger().addHandler(handler)
        try:
            yield
        finally:
            logging.getLogger().removeHandler(handler)
            sys.stdout, sys.stderr = old_out, old_err


def set_threads(threads: int | None) -> None:
    """Use the cores Snakemake gave this job, so parallel jobs do not oversubscribe."""
    if threads:
        import torch  # here, so figure jobs (which never call this) do not pay torch's import

        torch.set_num_threads(max(1, int(threads)))


def dataset_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    """IOIDataset keyword arguments from the config's ``dataset`` section."""
    return {
        "prompt_type": settings.get("prompt_type", "mixed"),
        "all_templates": bool(settings.get("all_templates", False)),
        "prepend_bos": bool(settings.get("prepend_bos", False)),
    }


def make_datasets(
    *, n: int, seed: int, settings: dict[str, Any], ioi_path: str, abc_path: str, meta_path: str
) -> None:
    """Generate p_IOI (n prompts, seed) and its p_ABC, save both, and record their hashes."""
    from ioi.data import IOIDataset

    ioi = IOIDataset(N=n, seed=seed, **dataset_kwargs(settings))
    abc = ioi.abc_dataset(paper_collisions=bool(settings.get("paper_collisions", False)))
    ioi.save(ioi_path)
    abc.save(abc_path)
    write_json(
        meta_path,
        provenance(
            None,
            N=n,
            seed=seed,
            dataset_settings=settings,
            ioi_hash=ioi.content_hash(),
            abc_hash=abc.content_hash(),
            templates=sorted(set(ioi.template_ids)),
        ),
    )
    print(f"wrote {n} IOI prompts ({ioi.content_hash()[:12]}) and their ABC set ({abc.content_hash()[:12]})")


def load_workflow_model(spec: str, *, device: str = "auto", seed: int = 0, **processing):
    """The configured model, with a clear one-paragraph error (no stack trace, exit status 2) when
    it is unavailable or its spec, checkpoint or device cannot be used."""
    import torch

    from ioi.models import ModelNotAvailableError, ModelSpecError, load_model

    # One thread while the weights are processed, whatever the job's thread count: the processed
    # weights are then bit-identical in every job and in the model server (ioi.server).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return load_model(spec, device=None if device == "auto" else device, seed=seed, **processing)
    except (ModelNotAvailableError, ModelSpecError) as err:
        print(str(err), file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        torch.set_num_threads(threads)


def run_load_model_job(
    *,
    model_spec: str,
    model_label: str,
    out_path: str,
    seed: int,
    device: str,
    dtype: str = "float32",
    threads: int | None = None,
    started_s: float | None = None,
    server_wanted: bool = False,
    server: dict[str, Any] | None = None,
    model=None,
) -> None:
    """The run's model load, as a job of its own (workflow rule ``load_model``) -> ``model.json``.

    Served (``model`` and ``server`` given: a child of the model server, :mod:`ioi.server`): the
    load is the server's start, which this job's client waited for (``started_s``: from starting
    the server to its first answer; None when a server was already running, and then this job's
    ``seconds`` are 0). Not served (``model_server: false``, ``IOI_MODEL_SERVER=0``, or a server
    that did not start): the model is loaded here and ``seconds`` is that load (the imports
    included), which checks that it loads and gives its one-paragraph error (exit status 2) once,
    before any other model job. Either way ``model.json`` records the model (spec, source, shape,
    device, dtype, processing), the versions and commit, ``seconds`` and ``load``: whether and by
    which server (pid, host, its start's parts) it was served."""
    import socket
    import time

    t0 = time.perf_counter()
    if model is None:
        set_threads(threads)
        model = load_workflow_model(model_spec, device=device, seed=seed)
        seconds = time.perf_counter() - t0
        reason = ("the model server did not start (see logs/model-server/): loaded in this job"
                  if server_wanted else "model_server off (config model_server: false or "
                  "IOI_MODEL_SERVER=0): loaded in this job; every model job loads it again")
        load = {"served": False, "reason": reason, "host": socket.gethostname()}
    else:
        server = dict(server or {})
        seconds = started_s or 0.0
        load = {"served": True, "started_by_this_job": started_s is not None, "server": server,
                "host": server.get("host", socket.gethostname()),
                "reason": ("this job started the model server: its seconds are the server's start "
                           "(imports, the load, the plain weights)") if started_s is not None else
                          "a model server for this model was already running: nothing loaded here"}
    from ioi.experiments.core import peak_rss_mb

    record = provenance(model, experiment="load_model", seed=seed, model_label=model_label,
                        config_device=device, config_dtype=dtype, seconds=round(seconds, 3),
                        max_rss_mb=(server or {}).get("max_rss_mb") if load["served"] else peak_rss_mb(),
                        load=load)
    write_json(out_path, record)
    where = (f"by the model server (pid {load['server'].get('pid')})" if load["served"] else "in this job")
    print(f"model {model_spec} loaded {where} on {record.get('device')}: {seconds:.1f} s "
          f"({load['reason']})")


def run_experiment_job(
    *,
    name: str,
    model_spec: str,
    model_label: str,
    dataset_paths: dict[str, str],
    out_dir: str,
    n: int,
    seed: int,
    device: str,
    dataset_settings: dict[str, Any],
    memory_budget_mb: int,
    greedy_runs: int | None = None,
    acdc: str | bool | None = None,
    threads: int | None = None,
    selfcheck_path: str | None = None,
    model=None,
) -> None:
    """Load model + datasets, run the registered experiment ``name``, write its three files.

    ``selfcheck_path``: the run's ``selfcheck.json`` (:func:`run_selfcheck_job`); its summary goes
    into ``meta.json`` under ``selfcheck``. ``model``: an already loaded model (the model server,
    :mod:`ioi.server`), else it is loaded here."""
    from ioi.circuits import circuit_for_model
    from ioi.data import IOIDataset
    from ioi.experiments.core import RunContext, run_and_write
    from ioi.registry import EXPERIMENTS, resolve

    set_threads(threads)
    spec = EXPERIMENTS[name]
    if model is None:
        model = load_workflow_model(model_spec, device=device, seed=seed)
    datasets = {kind: IOIDataset.load(path) for kind, path in dataset_paths.items()}
    circuit = circuit_for_model(model_spec)  # validated by the experiments that use it
    context = RunContext(
        datasets=datasets,
        circuit=circuit,
        seed=seed,
        n=n,
        dataset_settings=dataset_settings,
        memory_budget_mb=memory_budget_mb,
        model_label=model_label,
        **({} if greedy_runs is None else {"greedy_runs": int(greedy_runs)}),
        acdc=acdc,
    )
    extra_meta = {"selfcheck": selfcheck_summary(selfcheck_path)} if selfcheck_path else None
    run_and_write(resolve(spec.runner), model, context, out_dir, experiment_name=name,
                  extra_meta=extra_meta)
    print(f"{name}: done -> {out_dir}")


def selfcheck_summary(path: str | Path) -> dict[str, Any]:
    """The part of ``selfcheck.json`` every result's ``meta.json`` carries: the fast engine's
    largest difference from its references on these weights, and the GPT-2 identity check."""
    import json

    record = json.loads(Path(path).read_text())
    engine, identity = record["engine"], record["identity"]
    return {
        "max_abs_diff": engine["max_abs_diff"],
        "tolerance": engine["tolerance"],
        "passed": engine["passed"],
        "n_comparisons": engine["n_comparisons"],
        "identity": {key: identity.get(key) for key in ("applicable", "passed", "max_abs_diff", "tolerance")},
        "file": str(path),
    }


def run_selfcheck_job(
    *,
    model_spec: str,
    model_label: str,
    out_path: str,
    seed: int,
    device: str,
    dataset_settings: dict[str, Any],
    n: int,
    threads: int | None = None,
    model=None,
) -> None:
    """The run's self-check (:mod:`ioi.selfcheck`, :mod:`ioi.identity`) -> ``selfcheck.json``.

    A fast path over the tolerance stops the run here (exit status 1, the mismatches named); a
    failed GPT-2 identity check does not stop it: the comparison then withholds every verdict."""
    from ioi.identity import identity_check
    from ioi.provenance import Timer
    from ioi.selfcheck import SelfCheckError, run_selfcheck

    set_threads(threads)
    if model is None:
        model = load_workflow_model(model_spec, device=device, seed=seed)
    with Timer() as timer:
        try:
            report = run_selfcheck(model, model_spec=model_spec, n=n, seed=seed,
                                   dataset_settings=dataset_settings)
        except SelfCheckError as err:
            print(str(err), file=sys.stderr)
            raise SystemExit(1) from None
        identity = identity_check(model, model_label=model_label, model_spec=model_spec)
    from ioi.experiments.core import peak_rss_mb  # a served job's peak, which Snakemake cannot see

    write_json(out_path, provenance(model, experiment="selfcheck", seed=seed, N=n,
                                    seconds=round(timer.seconds, 3), max_rss_mb=peak_rss_mb(),
                                    engine=report.as_dict(), identity=identity))
    print(f"self-check passed: max |fast - reference| = {report.max_abs_diff:.3g} over "
          f"{len(report.comparisons)} comparisons (tolerance {report.tolerance:g})")
    if identity["applicable"]:
        verdict = "passed" if identity["passed"] else "FAILED: " + identity["reason"]
        print(f"GPT-2 small identity check {verdict}")


def read_experiment_files(data_csv: str | Path, summary_json: str | Path, meta_json: str | Path):
    """An experiment's three files as ``(frame, summary, meta)``: what plotters and page writers take."""
    import json

    import pandas as pd

    return (pd.read_csv(data_csv), json.loads(Path(summary_json).read_text()),
            json.loads(Path(meta_json).read_text()))


def plot_figure_job(*, name: str, data_csv: str, summary_json: str, meta_json: str,
                    png: str, pdf: str, extra_summary_jsons: list[str] | None = None) -> None:
    """Draw registered figure ``name`` from its experiment's files; save PNG and PDF atomically.

    A figure with ``extra_experiments`` also gets their summaries (``extra={name: summary}``, in
    the spec's order; ``extra_summary_jsons`` are their paths in the same order)."""
    import json

    from ioi.plots.common import save_figure
    from ioi.registry import FIGURES, resolve

    spec = FIGURES[name]
    frame, summary, meta = read_experiment_files(data_csv, summary_json, meta_json)
    if spec.extra_experiments:
        paths = list(extra_summary_jsons or [])
        if len(paths) != len(spec.extra_experiments):
            raise ValueError(f"Figure {name!r} reads {list(spec.extra_experiments)}'s summaries; got "
                             f"{len(paths)} paths.")
        extra = {exp: json.loads(Path(p).read_text()) for exp, p in zip(spec.extra_experiments, paths)}
        fig = resolve(spec.plotter)(frame, summary, meta, extra=extra)
    else:
        fig = resolve(spec.plotter)(frame, summary, meta)
    save_figure(fig, png, pdf)


def write_page_job(*, name: str, data_csv: str, summary_json: str, meta_json: str, html: str) -> None:
    """Write registered interactive page ``name`` (self-contained HTML) atomically."""
    from ioi.provenance import atomic_path
    from ioi.registry import PAGES, resolve

    spec = PAGES[name]
    frame, summary, meta = read_experiment_files(data_csv, summary_json, meta_json)
    text = resolve(spec.writer)(frame, summary, meta)
    with atomic_path(html) as tmp:
        tmp.write_text(text, encoding="utf-8")
    print(f"{name}: wrote {html} ({len(text) / 1e6:.1f} MB)")

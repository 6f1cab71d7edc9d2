# The configured model, loaded once per run by a job of its own (issue 11: the load is real work,
# so it is counted as a job's own seconds, not as the first model job's overhead), then checked
# once before anything else of the run (issue 10 §5): the fast engine against its hook-based
# references on these weights, and whether they are GPT-2 small. Every experiment takes
# selfcheck.json as an input (so no figure comes before it) and copies its summary into meta.json;
# the comparison quotes it in its header.

MODEL_LOADED = RESULTS + "/model/model.json"
SELFCHECK = RESULTS + "/selfcheck/selfcheck.json"


def checkpoint_files():
    """The files of a model_path checkpoint folder (config, weights, tokenizer), as inputs: new
    weights at the same path re-run the load and everything after it. None for a named spec."""
    folder = Path(str(model_spec())).expanduser()
    if not folder.is_dir():
        return []
    return sorted(str(p) for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


# With the model server on (config model_server, IOI_MODEL_SERVER; ioi.server), this job starts the
# run's server, whose start (Python and torch's imports, the model's load and processing, the
# plain-tensor weights) is its own `seconds`; every later model job is a forked child of that
# server. With it off, the job loads the model in its own process: it checks that the model
# loads and gives the one-paragraph error (exit status 2) once, before any other model job.
# model.json: the model (spec, source, shape, device, dtype), versions, commit, the seconds, and
# whether and by which server (pid, host) it was served. A new model spec, checkpoint, device,
# seed or library source re-runs it (params and inputs), and with it everything after it.
rule load_model:
    input:
        lib=LIBRARY_SOURCES,
        checkpoint=checkpoint_files(),
    output:
        MODEL_LOADED,
    log:
        "logs/" + MODEL + "/load_model.log",
    benchmark:
        RESULTS + "/benchmarks/load_model.tsv"
    threads: 1  # the model is processed on one thread (ioi.pipeline.load_workflow_model)
    resources:
        gpu=lambda wildcards: 1 if USES_GPU else 0,
        mem_mb=3000,  # the load alone, in this job when the model server is off
        runtime=15,
    params:
        model_spec=model_spec(),
        model_label=MODEL,
        seed=config["seed"],
        device=config["device"],
        dtype=config["dtype"],
        model_server=config["model_server"],
    script:
        "../scripts/load_model.py"


rule selfcheck:
    input:
        lib=LIBRARY_SOURCES,
        model=MODEL_LOADED,
    output:
        SELFCHECK,
    log:
        "logs/" + MODEL + "/selfcheck.log",
    benchmark:
        RESULTS + "/benchmarks/selfcheck.tsv"
    threads: config["threads_per_job"] or workflow.cores
    resources:
        gpu=lambda wildcards: 1 if USES_GPU else 0,
        # 4010 MB peak at GPT-2 small's shape when this job also started the model server
        # (benchmarks/measured/dag_cpu_2cores.txt, 6078ecd); served, its peak is in selfcheck.json
        mem_mb=5000,
        runtime=15,
    params:
        model_spec=model_spec(),
        model_label=MODEL,
        seed=config["seed"],
        device=config["device"],
        dataset_settings=config["dataset"],
        n=config["n"]["selfcheck"],
        model_server=config["model_server"],
    script:
        "../scripts/selfcheck.py"

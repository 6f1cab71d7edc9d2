# One job per registered experiment (ioi.registry.EXPERIMENTS): model + datasets -> results files.


def experiment_spec(wildcards):
    return EXPERIMENTS[wildcards.experiment]


def experiment_n(wildcards):
    return config["n"][experiment_spec(wildcards).n_key]


def experiment_inputs(wildcards):
    spec = experiment_spec(wildcards)
    inputs = {kind: dataset_path(kind, experiment_n(wildcards)) for kind in spec.datasets}
    inputs["lib"] = LIBRARY_SOURCES
    inputs["selfcheck"] = SELFCHECK
    return inputs


def experiment_gpus(wildcards):
    """1 where the job will run on a GPU (so GPU jobs queue for it), else 0: CPU jobs must not
    queue for a GPU that is not there (the default profile declares gpu: 1)."""
    return experiment_spec(wildcards).gpu if USES_GPU else 0


def experiment_mem_mb(wildcards):
    return experiment_spec(wildcards).mem_mb


def experiment_runtime(wildcards):
    return experiment_spec(wildcards).runtime_min


def experiment_dataset_kinds(wildcards):
    return list(experiment_spec(wildcards).datasets)


rule experiment:
    input:
        unpack(experiment_inputs),
    output:
        data=RESULTS + "/{experiment}/data.csv",
        summary=RESULTS + "/{experiment}/summary.json",
        meta=RESULTS + "/{experiment}/meta.json",
    log:
        "logs/" + MODEL + "/{experiment}.log",
    benchmark:
        RESULTS + "/benchmarks/{experiment}.tsv"
    wildcard_constraints:
        experiment="|".join(EXPERIMENTS),
    threads: config["threads_per_job"] or workflow.cores
    resources:
        gpu=experiment_gpus,
        mem_mb=experiment_mem_mb,
        runtime=experiment_runtime,
    params:
        model_spec=model_spec(),
        model_label=MODEL,
        dataset_kinds=experiment_dataset_kinds,
        out_dir=lambda wildcards: f"{RESULTS}/{wildcards.experiment}",
        n=experiment_n,
        seed=config["seed"],
        device=config["device"],
        dataset_settings=config["dataset"],
        memory_budget_mb=config["memory_budget_mb"],
        greedy_runs=config["greedy_runs"],
        acdc=config["acdc"],
        model_server=config["model_server"],
    script:
        "../scripts/run_experiment.py"

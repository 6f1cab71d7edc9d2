# One job per registered experiment (ioi.registry.EXPERIMENTS): model + datasets -> results files.


def experiment_spec(wildcards):
    return EXPERIMENTS[wildcards.experiment]


def experiment_n(wildcards):
    return config["n"][experiment_spec(wildcards).n_key]


def experiment_inputs(wildcards):
    spec = experiment_spec(wildcards)
    inputs = {kind: dataset_path(kind, experiment_n(wildcards)) for kind in spec.datasets}
    inputs["lib"] = LIBRARY_SOURCES
    inputs["model"] = MODEL_LOADED
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


def experiment_threads(wildcards):
    """Torch threads of one experiment job: ``threads_per_job`` when set. Else every core of the job
    on a cluster (each job its own allocation: ``cores`` of the profile) and on a GPU (GPU jobs
    queue for the one GPU anyway). On one CPU machine, the job the registry marks ``all_cores``
    (completeness, most of the DAG's arithmetic) takes every core, so it never shares them; every
    other experiment takes half of them, two side by side. On 2 cores two 1-thread jobs finish
    sooner than the same two one after the other at 2 threads (measured at GPT-2 small's shape:
    baseline and fig12b together in 46 s, one after the other in 52 s): torch's second thread
    gains 1.6-1.8x, a second job 2x, and the jobs' single-threaded parts (datasets, writing, the
    figure jobs in between) overlap."""
    if config["threads_per_job"]:
        return config["threads_per_job"]
    if USES_GPU or workflow.non_local_exec or workflow.remote_exec or experiment_spec(wildcards).all_cores:
        return workflow.cores
    return max(1, workflow.cores // 2)


def experiment_priority(wildcards):
    """Start order among ready jobs: the longest declared runtime first (ioi.registry), so that no
    long job is left running alone at the end while the other cores idle."""
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
    threads: experiment_threads
    priority: experiment_priority
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

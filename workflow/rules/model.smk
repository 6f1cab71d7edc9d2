# The configured model, checked once before anything else of the run (issue 10 §5): the fast
# engine against its hook-based references on these weights, and whether they are GPT-2 small.
# Every experiment takes selfcheck.json as an input (so no figure comes before it) and copies its
# summary into meta.json; the comparison quotes it in its header.

SELFCHECK = RESULTS + "/selfcheck/selfcheck.json"


rule selfcheck:
    input:
        lib=LIBRARY_SOURCES,
    output:
        SELFCHECK,
    log:
        "logs/" + MODEL + "/selfcheck.log",
    benchmark:
        RESULTS + "/benchmarks/selfcheck.tsv"
    threads: config["threads_per_job"] or workflow.cores
    resources:
        gpu=lambda wildcards: 1 if USES_GPU else 0,
        mem_mb=5000,  # 4010 MB peak at GPT-2 small's shape (benchmarks/measured/dag_cpu_2cores.txt)
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

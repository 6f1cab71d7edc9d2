# The IOI (p_IOI) and ABC (p_ABC) datasets, shared by every model (one tokenizer: GPT-2's).


rule ioi_and_abc_datasets:
    input:
        lib=lib_sources("data", "tokenizer"),
    output:
        ioi=DATASETS + "/ioi_n{n}_seed{seed}.parquet",
        abc=DATASETS + "/abc_n{n}_seed{seed}.parquet",
        meta=DATASETS + "/ioi_n{n}_seed{seed}.json",
    log:
        "logs/datasets/ioi_n{n}_seed{seed}.log",
    wildcard_constraints:
        n=r"\d+",
        seed=r"\d+",
    params:
        dataset=config["dataset"],
    resources:
        mem_mb=2000,
        runtime=10,
    script:
        "../scripts/make_datasets.py"

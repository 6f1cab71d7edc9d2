# The figure gallery figures/{model}/README.md (ioi.gallery): every registered figure in the paper's
# order, with its caption, the paper's statements and this model's claim verdicts.


rule gallery:
    input:
        png=[f"{FIGURES}/{name}.png" for name in FIGURE_SPECS],
        meta=[f"{RESULTS}/{name}/meta.json" for name in EXPERIMENTS],
        table=f"{RESULTS}/paper_comparison.md",
        paper_reference="paper_reference.yaml",
        model_reference=comparison_reference(),
        lib=["src/ioi/gallery.py", "src/ioi/comparison.py", "src/ioi/registry.py"],
    output:
        FIGURES + "/README.md",
    log:
        "logs/" + MODEL + "/gallery.log",
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        results=RESULTS,
        model=MODEL,
    script:
        "../scripts/write_gallery.py"

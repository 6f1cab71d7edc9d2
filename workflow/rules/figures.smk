# One job per registered figure (ioi.registry.FIGURES): experiment files -> PNG + PDF.


def figure_inputs(wildcards):
    experiment_name = FIGURE_SPECS[wildcards.figure].experiment
    base = f"{RESULTS}/{experiment_name}"
    inputs = {
        "data": f"{base}/data.csv",
        "summary": f"{base}/summary.json",
        "meta": f"{base}/meta.json",
        "lib": PLOT_SOURCES,
    }
    extra = FIGURE_SPECS[wildcards.figure].extra_experiments
    if extra:
        inputs["extra"] = [f"{RESULTS}/{name}/summary.json" for name in extra]
    return inputs


rule figure:
    input:
        unpack(figure_inputs),
    output:
        png=report(
            FIGURES + "/{figure}.png",
            caption="../report/figure.rst",
            category="Figures",
            labels={"figure": "{figure}", "model": MODEL},
        ),
        pdf=FIGURES + "/{figure}.pdf",
    log:
        "logs/" + MODEL + "/figures/{figure}.log",
    benchmark:
        RESULTS + "/benchmarks/figures/{figure}.tsv"
    wildcard_constraints:
        figure="|".join(FIGURE_SPECS) if FIGURE_SPECS else "NO_FIGURES",
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        # plain text (the report's "Job parameters" panel shows it as is); figure.rst escapes it
        caption=lambda wildcards: FIGURE_SPECS[wildcards.figure].caption,
        model=figure_model_label(),
        model_server=config["model_server"],  # the plot server (ioi.server), or drawn in the job
    script:
        "../scripts/plot_figure.py"


# One job per registered interactive page (ioi.registry.PAGES): experiment files -> HTML.


def page_inputs(wildcards):
    base = f"{RESULTS}/{PAGE_SPECS[wildcards.page].experiment}"
    return {"data": f"{base}/data.csv", "summary": f"{base}/summary.json", "meta": f"{base}/meta.json",
            "lib": PLOT_SOURCES}


rule page:
    input:
        unpack(page_inputs),
    output:
        html=FIGURES + "/{page}.html",
    log:
        "logs/" + MODEL + "/pages/{page}.log",
    wildcard_constraints:
        page="|".join(PAGE_SPECS) if PAGE_SPECS else "NO_PAGES",
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        model_server=config["model_server"],
    script:
        "../scripts/write_page.py"

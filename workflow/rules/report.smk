# Claim-by-claim comparison with the paper, generated from this model's results.
# GPT-2 small is checked against paper_reference.yaml (and refreshes the top-level
# paper_comparison.md); the planted model against its own ground truth.


def comparison_reference():
    return PLANTED_REFERENCE if model_spec() == "planted-ioi" else "paper_reference.yaml"


def comparison_outputs():
    outputs = {"table": f"{RESULTS}/paper_comparison.md"}
    if MODEL == "gpt2-small":
        outputs["top_level"] = "paper_comparison.md"
    return outputs


rule comparison:
    input:
        reference=comparison_reference(),
        summaries=[f"{RESULTS}/{name}/summary.json" for name in EXPERIMENTS],
        selfcheck=SELFCHECK,
        lib=["src/ioi/comparison.py", "src/ioi/__main__.py"],
    output:
        **comparison_outputs(),
    log:
        "logs/" + MODEL + "/comparison.log",
    benchmark:
        RESULTS + "/benchmarks/comparison.tsv"
    params:
        results=RESULTS,
        figures=FIGURES,
        model=MODEL,
    script:
        "../scripts/write_comparison.py"

"""What the paper reports, as plain numbers (GPT-2 small; ioi_paper.md): one copy, read by the
experiments (claims, summaries) and by the plots (drawn beside ours). Imports nothing, so figure
jobs stay torch-free."""

from __future__ import annotations

# Faithfulness (§4.1, §4.3) and the released Fig. 6 data.
PAPER_FAITHFULNESS = {
    "faithfulness_ratio": 0.87,
    "faithfulness_gap": 0.46,
    "F_M_text": 3.56,
    "naive_gap_text": 0.1,
    "released_F_C": 2.838,
    "released_F_M": 3.302,
    "released_F_C_naive": 2.862,
    "source": "ioi_paper.md §4.3 (paper §4.1: |F(M)-F(C)| = 0.46, 87%; §4.3 naive 0.1, probably "
              "stale); released data pts/*_perf_by_sets.pt (one N=100 run): F(C) 2.838, naive "
              "2.862, F(M) 3.302",
}

PAPER_COMPLETENESS_SOURCE = (
    "Paper's released data for Fig. 6 (redwoodresearch/Easy-Transformer pts/full_perf_by_sets.pt "
    "and naive_perf_by_sets.pt; one N=100 run on GPT-2 small), quoted in ioi_paper.md §4.3 and "
    "peers.md §1.7b"
)
# (F(C\K), F(M\K)) per class K; "none" is K = ∅; the "name mover" class includes the backups.
PAPER_COMPLETENESS_POINTS: dict[str, dict[str, tuple[float, float]]] = {
    "full": {
        "none": (2.838, 3.302),
        "name mover": (0.930, 1.529),
        "negative name mover": (4.267, 5.620),
        "s-inhibition": (0.227, 0.297),
        "induction": (1.035, 1.571),
        "duplicate token": (0.724, 1.515),
        "previous token": (1.517, 2.900),
    },
    "naive": {
        "none": (2.862, 3.302),
        "name mover": (0.577, 3.329),
        "s-inhibition": (-0.992, 0.297),
        "induction": (0.551, 2.217),
        "duplicate token": (0.235, 2.555),
        "previous token": (1.184, 2.900),
    },
}
PAPER_COMPLETENESS_TEXT = {
    "greedy_max_text": 3.09,
    "greedy_max_released_full": 3.466,
    "greedy_max_released_naive": 3.034,
    "random_mean_released_full": 0.45,
    "random_mean_released_naive": 0.47,
}

# Minimality (Fig. 20).
PAPER_FIG20_SOURCE = "Paper Fig. 20 (verbatim in ioi_paper.md §4.4); % = score / 3.56 computed there"
# head -> (F(C\(K∪{v})), F(C\K), % of F(M)) in the paper's Fig. 20 row order.
PAPER_FIG20: dict[str, tuple[float, float, float]] = {
    "9.9": (2.26, 2.62, 10.1), "10.0": (1.91, 2.26, 9.8), "9.6": (2.11, 1.91, 5.6),
    "10.7": (4.07, 3.13, 26.4), "11.10": (4.07, 3.27, 22.5),
    "8.10": (0.24, 1.01, 21.6), "7.9": (0.24, 0.92, 19.1), "8.6": (0.24, 0.86, 17.4),
    "7.3": (0.24, 0.43, 5.3),
    "5.5": (0.97, 2.12, 32.3), "5.9": (3.33, 4.07, 20.8), "6.9": (0.97, 1.46, 13.8),
    "5.8": (3.83, 4.07, 6.7),
    "0.1": (0.60, 1.90, 36.5), "0.10": (0.60, 1.66, 29.8), "3.0": (0.60, 1.05, 12.6),
    "4.11": (1.31, 2.28, 27.2), "2.2": (1.31, 1.75, 12.4),
    "11.2": (0.95, 1.37, 11.8), "10.6": (1.65, 1.88, 6.5), "10.10": (1.88, 2.11, 6.5),
    "10.2": (1.49, 1.65, 4.5), "9.7": (0.81, 0.95, 3.9), "10.1": (1.37, 1.49, 3.4),
    "11.9": (0.41, 0.45, 1.1), "9.0": (0.41, 0.45, 1.1),
}

# Token and position signals (App. A, Fig. 9) and adversarial examples (Fig. 8).
PAPER_FIG9 = {
    "orig_tok_orig_pos": 3.55, "orig_tok_inv_pos": -0.99,
    "rand_tok_orig_pos": 2.45, "rand_tok_inv_pos": -1.96,
    "inv_tok_orig_pos": 1.77, "inv_tok_inv_pos": -3.16,
}
PAPER_FIG8 = {
    "clean": {"logit_diff_mean": 3.55, "io_prob_mean": 0.49, "s_over_io_rate": 0.007},
    "extra_s": {"logit_diff_mean": 3.64, "io_prob_mean": 0.59, "s_over_io_rate": 0.004},
    "extra_io": {"logit_diff_mean": 1.23, "io_prob_mean": 0.36, "s_over_io_rate": 0.234},
}

"""The MMEdit evaluation protocol: five metrics, two scores, resumable runs, result tables; the sequential
(lifelong) protocol; evaluation sharded over processes and merged."""

from .protocol import (METRICS, EditResult, EvalSummary, PairedDifference, check_records, evaluate,
                       load_results, paired_difference, plot_layer_sweep, plot_results, probes, quick_scores,
                       results_table, score_edit)
from .sequential import SequentialSummary, creature_breakdown, edit_order, evaluate_sequential
from .shards import merge_shards

__all__ = ["METRICS", "EditResult", "EvalSummary", "PairedDifference", "check_records", "evaluate",
           "load_results", "paired_difference", "plot_layer_sweep", "plot_results", "probes", "quick_scores",
           "results_table", "score_edit", "SequentialSummary", "creature_breakdown", "edit_order",
           "evaluate_sequential", "merge_shards"]

"""Attribution: module contributions (logit lens, DLA), exact per-token allocation, Captum gradients,
noise-perturbation and restoration tracing, region selection and its scores, sanity checks of every map, and
the image swap (after how many layers the visual tokens can still change the answer)."""

from .allocation import (TokenAllocation, attention_map, attention_sources, source_profile,
                         token_allocation, visual_span)
from .contributions import (ContributionProfile, ModuleContributions, bootstrap_ci, contribution_profile,
                            layer_bars, module_contributions)
from .gradients import IGConvergenceWarning, IGResult, integrated_gradients, pixel_ig_refusal, token_baseline
from .qformer import QueryPatchMap, query_patch_weights, query_to_patches
from .regions import (RegionScore, deletion_insertion, patch_coverage, region_scores, score_heatmap,
                      select_region)
from .sanity import SanityChecks, sanity_checks
from .swap import ImageSwap, image_swap
from .tracing import (InfluenceMap, RestorationMap, layout_windows, noise_perturbation, restoration_tracing,
                      windows)

__all__ = ["TokenAllocation", "attention_map", "attention_sources", "source_profile",
           "token_allocation", "visual_span", "ContributionProfile",
           "ModuleContributions", "bootstrap_ci", "contribution_profile", "layer_bars", "module_contributions",
           "IGConvergenceWarning", "IGResult", "integrated_gradients", "pixel_ig_refusal", "token_baseline",
           "QueryPatchMap",
           "query_patch_weights", "query_to_patches", "RegionScore",
           "deletion_insertion", "patch_coverage", "region_scores", "score_heatmap", "select_region", "InfluenceMap",
           "RestorationMap", "noise_perturbation", "restoration_tracing", "windows", "layout_windows", "SanityChecks",
           "sanity_checks", "ImageSwap", "image_swap"]

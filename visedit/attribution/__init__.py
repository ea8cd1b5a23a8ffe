"""Attribution: module contributions (logit lens, DLA), exact per-token allocation, Captum gradients."""

from .allocation import TokenAllocation, token_allocation, visual_span
from .contributions import (ContributionProfile, ModuleContributions, bootstrap_ci, contribution_profile,
                            layer_bars, module_contributions)
from .gradients import IGResult, integrated_gradients, token_baseline

__all__ = ["TokenAllocation", "token_allocation", "visual_span", "ContributionProfile", "ModuleContributions",
           "bootstrap_ci", "contribution_profile", "layer_bars", "module_contributions", "IGResult",
           "integrated_gradients", "token_baseline"]

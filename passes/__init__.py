"""Graph passes: each takes a GraphModule and the edge table and returns a new GraphModule.

``cut_backbone`` runs before wrapping, so it takes no edge table.
"""

from fxadapt.passes.backbone import FeatureNodeError, cut_backbone, find_classifier_input
from fxadapt.passes.derive import decide, derive
from fxadapt.passes.fold import fold_theta_scales
from fxadapt.passes.fuse import FUSED_ROOT, fuse_mixed_edges
from fxadapt.passes.guard import check_reachability, guard_decisions
from fxadapt.passes.inplace import use_inplace_operations
from fxadapt.passes.insert import MIXED_ROOT, insert_mixed_edges

__all__ = [
    "FUSED_ROOT",
    "MIXED_ROOT",
    "FeatureNodeError",
    "check_reachability",
    "cut_backbone",
    "decide",
    "derive",
    "find_classifier_input",
    "fold_theta_scales",
    "fuse_mixed_edges",
    "guard_decisions",
    "insert_mixed_edges",
    "use_inplace_operations",
]

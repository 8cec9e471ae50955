"""Slide-level heads on bags of region embeddings: HIPT's global aggregator, ABMIL, mean-pool
MLP; survival and classification losses; metrics; case-level splits. (Fitting, Ray Tune sweeps
and MLflow logging build on these; see the heads issue.)"""

from hipt_ray.heads.losses import cox_loss, survival_bins, survival_nll
from hipt_ray.heads.metrics import classification_metrics, concordance, km_split
from hipt_ray.heads.models import ABMIL, HIPTLGP, GatedAttention, MeanMLP, create_head
from hipt_ray.heads.splits import case_folds

__all__ = [
    "ABMIL",
    "GatedAttention",
    "HIPTLGP",
    "MeanMLP",
    "case_folds",
    "classification_metrics",
    "concordance",
    "cox_loss",
    "create_head",
    "km_split",
    "survival_bins",
    "survival_nll",
]

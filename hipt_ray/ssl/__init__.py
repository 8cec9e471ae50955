"""DINO self-supervision pieces shared by both HIPT pretraining stages (no Ray here).

Projection head, loss with centering and teacher-temperature schedule, EMA teacher, per-step
schedules, the multi-crop wrapper, and the two stages' crops (pixels for ViT-256, token grids
for ViT-4K). The published DINO/HIPT defaults are the defaults here; all are arguments.
"""

from hipt_ray.ssl.crops import GridCrops, PixelCrops
from hipt_ray.ssl.head import DINOHead, MultiCrop, cancel_last_layer_gradients
from hipt_ray.ssl.loss import DINOLoss
from hipt_ray.ssl.schedules import cosine_schedule, ema_update, teacher_temperature_schedule

__all__ = [
    "DINOHead",
    "DINOLoss",
    "GridCrops",
    "MultiCrop",
    "PixelCrops",
    "cancel_last_layer_gradients",
    "cosine_schedule",
    "ema_update",
    "teacher_temperature_schedule",
]

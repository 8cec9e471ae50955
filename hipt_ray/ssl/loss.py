"""DINO loss: cross-entropy between the sharpened, centred teacher distribution of each global
view and the student distribution of every other view, averaged over the pairs."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class DINOLoss(nn.Module):
    center: torch.Tensor  # [1, K] running mean of the teacher outputs (a buffer: checkpointed)

    def __init__(
        self, *, out_dim: int, n_global: int = 2, student_temp: float = 0.1, center_momentum: float = 0.9
    ) -> None:
        super().__init__()
        self.n_global, self.student_temp, self.center_momentum = n_global, student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """``student_out`` ``[n_crops·B, K]`` and ``teacher_out`` ``[n_global·B, K]``, crop-major.

        Also updates the centre from this batch's teacher outputs (all-reduced under DDP).
        """
        n_crops = student_out.shape[0] // (teacher_out.shape[0] // self.n_global)
        student = (student_out.float() / self.student_temp).chunk(n_crops)
        teacher = F.softmax((teacher_out.float() - self.center) / teacher_temp, dim=-1).detach().chunk(self.n_global)
        total, terms = torch.zeros((), device=teacher_out.device), 0
        for iq, q in enumerate(teacher):
            for v, s in enumerate(student):
                if v == iq:  # a view is never compared with itself
                    continue
                total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                terms += 1
        self.update_center(teacher_out)
        return total / terms

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        batch_center = teacher_out.float().sum(dim=0, keepdim=True)
        count = torch.tensor([teacher_out.shape[0]], dtype=torch.float32, device=teacher_out.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            dist.all_reduce(count)
        batch_center = batch_center / count
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))

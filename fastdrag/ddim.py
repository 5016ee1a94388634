"""DDIM schedule, inversion and denoising steps with the official drag-editing conventions.

Leading spacing with steps_offset 1: 50 steps give timesteps [981, 961, ..., 21, 1]. Inversion evaluates
eps at the *target* timestep on the current latent; the first inversion step and the last denoising step
use final_alpha_cumprod = alphas_cumprod[0] (set_alpha_to_one=False). Spec: dragdiffusion 1.4, gooddrag 1.1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Schedule:
    timesteps: tuple[int, ...]  # descending, e.g. (981, ..., 1)
    alphas_cumprod: tuple[float, ...]
    ratio: int  # num_train_timesteps // n_inference_step
    n_actual: int  # inversion steps = round(strength * n)

    @classmethod
    def make(cls, scheduler, n_inference_step: int, inversion_strength: float) -> "Schedule":
        scheduler.set_timesteps(n_inference_step)
        return cls(timesteps=tuple(int(t) for t in scheduler.timesteps),
                   alphas_cumprod=tuple(float(a) for a in scheduler.alphas_cumprod),
                   ratio=scheduler.config.num_train_timesteps // n_inference_step,
                   n_actual=round(inversion_strength * n_inference_step))

    @property
    def final_alpha(self) -> float:
        return self.alphas_cumprod[0]

    @property
    def inversion_timesteps(self) -> tuple[int, ...]:
        """Ascending: 1, 21, ..., t_edit."""
        return tuple(reversed(self.timesteps))[: self.n_actual]

    @property
    def denoise_timesteps(self) -> tuple[int, ...]:
        """Descending from the edit timestep: t_edit, ..., 1."""
        return self.timesteps[len(self.timesteps) - self.n_actual:]

    @property
    def t_edit(self) -> int:
        return self.denoise_timesteps[0]

    def alpha(self, t: int) -> float:
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha

    def step(self, eps: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
        """One DDIM (eta = 0) step t -> t - ratio."""
        a_t = self.alphas_cumprod[t]
        prev = t - self.ratio
        a_prev = self.alphas_cumprod[prev] if prev > 0 else self.final_alpha  # official: `> 0`
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
        return a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps

    def inv_step(self, eps: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
        """One DDIM inversion step t - ratio -> t, with eps evaluated at t."""
        cur = min(t - self.ratio, 999)
        a_cur = self.alpha(cur)
        a_next = self.alphas_cumprod[t]
        x0 = (x - (1 - a_cur) ** 0.5 * eps) / a_cur ** 0.5
        return a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * eps

    def pred_x0(self, eps: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
        a_t = self.alphas_cumprod[t]
        return (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5

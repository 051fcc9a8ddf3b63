"""els-audit: understand what an image diffusion model will really generate."""

from .sampler import SampleResult, ddim_sample, initial_noise, time_grid
from .schedules import SCHEDULES, NoiseSchedule, get_schedule

__version__ = "0.1.0"

__all__ = [
    "SampleResult",
    "ddim_sample",
    "initial_noise",
    "time_grid",
    "SCHEDULES",
    "NoiseSchedule",
    "get_schedule",
    "__version__",
]

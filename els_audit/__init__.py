"""els-audit: understand what an image diffusion model will really generate.

The public surface, one stage per module (see README.md):
schedules and sampler -> data -> models in (:mod:`.models`: loading, sidecar, adapter, zoo) -> probes (trace,
receptive field, ERF, equivariance) -> machines -> calibration -> prediction -> novelty.
"""

import sys as _sys  # built in: importing it reads no file

if _sys.argv[:1] == ["-m"] or _sys.argv[0].replace("\\", "/").rsplit("/", 1)[-1].startswith("els-audit"):
    # els-audit is the program being run (``python -m els_audit``, argv[0] is "-m" while
    # Python imports this package; or the els-audit command).  The current folder, which
    # ``-m`` or an empty PYTHONPATH entry put on sys.path, may be a model's download folder:
    # drop it before anything else is imported (README, "Security model").
    from ._safe_path import drop_implicit_cwd as _drop_implicit_cwd

    _drop_implicit_cwd()

from .calibrate import CalibrationResult, calibrate_scales
from .data import DATASETS, Dataset, DataSpecError, load_dataset
from .models import LOADERS, Denoiser, LoadedModel, ModelLoadError, list_zoo_models, load_model, make_denoiser, zoo_model_path
from .machines import ScoreDiagnostics, ScoreMachine, build_machine, scale_schedule_eps
from .metrics import pearson_r, r_squared
from .novelty import NoveltyResult, assess_novelty
from .predict import PredictionResult, predict_samples
from .published import closest_published
from .probes import (ERFResult, MeasuredEquivarianceResult, ReceptiveFieldResult, StructuralEquivarianceResult, TraceError,
                     TraceResult, effective_receptive_field, equivariance_measured, equivariance_structure,
                     probe_receptive_field, receptive_field, to_networkx, trace_model)
from .sampler import SampleResult, ddim_sample, initial_noise, time_grid
from .schedules import SCHEDULES, NoiseSchedule, get_schedule

__version__ = "0.1.0"

__all__ = [
    "CalibrationResult", "calibrate_scales",
    "DATASETS", "Dataset", "DataSpecError", "load_dataset",
    "MeasuredEquivarianceResult", "StructuralEquivarianceResult", "equivariance_measured", "equivariance_structure",
    "ERFResult", "effective_receptive_field",
    "to_networkx",
    "LOADERS", "LoadedModel", "ModelLoadError", "load_model",
    "Denoiser", "make_denoiser",
    "ScoreDiagnostics", "ScoreMachine", "build_machine", "scale_schedule_eps",
    "pearson_r", "r_squared",
    "NoveltyResult", "assess_novelty",
    "PredictionResult", "predict_samples",
    "closest_published",
    "ReceptiveFieldResult", "probe_receptive_field", "receptive_field",
    "SampleResult", "ddim_sample", "initial_noise", "time_grid",
    "SCHEDULES", "NoiseSchedule", "get_schedule",
    "TraceError", "TraceResult", "trace_model",
    "list_zoo_models", "zoo_model_path",
    "__version__",
]

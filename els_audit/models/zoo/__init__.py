"""The bundled model zoo: small denoisers trained here on mnist5k, shipped with the package.

Architectures live in :mod:`els_audit.models.zoo.architectures` (package code, hence trusted);
the training script is :mod:`els_audit.models.zoo.train`; the catalogue of bundled models
(``resnet-zeros``, ``resnet-circular``, ``unet-zeros``, ``unet-attention``) and their paths
is :mod:`els_audit.models.zoo.catalog`.  Load one with ``load_model("zoo:resnet-zeros")``.
"""

from .architectures import (
    ARCHITECTURES,
    AttentionUNet,
    PaperResNet,
    PaperUNet,
    SinusoidalTimeEmbedding,
    count_parameters,
)
from .catalog import ZOO, ZooEntry, build_zoo_architecture, list_zoo_models, zoo_config, zoo_model_path

__all__ = [
    "ARCHITECTURES",
    "AttentionUNet",
    "PaperResNet",
    "PaperUNet",
    "SinusoidalTimeEmbedding",
    "count_parameters",
    "ZOO",
    "ZooEntry",
    "build_zoo_architecture",
    "list_zoo_models",
    "zoo_config",
    "zoo_model_path",
]

"""Models in: what the audit needs from a user's model file, in one package.

- :mod:`.settings`: the adapter settings' names and vocabularies, and :class:`ModelLoadError`;
- :mod:`.loading`: safe loaders (plugins of the ``els_audit.loaders`` group) -> :class:`LoadedModel`;
- :mod:`.sidecar`: ``MODEL.els.toml`` beside a model says what detection cannot;
- :mod:`.adapter`: any loaded model -> one ``eps(x, t, label)`` interface (:class:`Denoiser`);
- :mod:`.zoo`: the bundled models, their architectures and training script.
"""

from .adapter import Denoiser, SanityReport, make_denoiser, sanity_check
from .formats import LOADERS, ArchSpec, ModelLoader, sniff_format
from .loading import LoadedModel, load_model
from .settings import CALL_STYLES, PREDICTIONS, SETTING_NAMES, TIME_INPUTS, ModelLoadError
from .zoo import list_zoo_models, zoo_model_path

__all__ = [
    "Denoiser", "SanityReport", "make_denoiser", "sanity_check",
    "LOADERS", "ArchSpec", "LoadedModel", "ModelLoader", "load_model", "sniff_format",
    "CALL_STYLES", "PREDICTIONS", "SETTING_NAMES", "TIME_INPUTS", "ModelLoadError",
    "list_zoo_models", "zoo_model_path",
]

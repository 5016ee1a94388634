"""fastdrag: a lean, fast engine for point-based (drag) image editing on Stable Diffusion 1.5.

    model = fastdrag.load_model("tiny")          # or a hub id / local diffusers folder
    result = fastdrag.edit(image, [((hx, hy), (tx, ty))], prompt="...", method="dragdiffusion", model=model)
"""

from .api import Editor, EditResult, edit
from .config import (CLIPDragConfig, DragDiffusionConfig, DragTextConfig, GoodDragConfig, PRESETS,
                     make_config)
from .errors import Cancelled, ConfigError, FastDragError, InvalidInputError, ModelLoadError
from .inputs import pairs_from_flat
from .model import DragModel, load_model
from .pipeline import Progress

__version__ = "0.1.0"
__all__ = ["edit", "Editor", "EditResult", "load_model", "DragModel", "Progress", "make_config", "PRESETS",
           "DragDiffusionConfig", "DragTextConfig", "GoodDragConfig", "CLIPDragConfig", "FastDragError", "Cancelled",
           "InvalidInputError", "ConfigError", "ModelLoadError", "pairs_from_flat"]

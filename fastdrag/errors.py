"""Errors raised for bad input. All are ValueError subclasses and name the problem; Cancelled is not one."""


class FastDragError(ValueError):
    """Base class: the request cannot be served as given."""


class InvalidInputError(FastDragError):
    """An image, point, mask or prompt that cannot be edited as given."""


class ConfigError(FastDragError):
    """An unknown method, option or preset, or an option value out of range."""


class ModelLoadError(FastDragError):
    """A model id or folder that is not a loadable Stable Diffusion 1.x diffusers model."""


class Cancelled(Exception):
    """Raise it from an edit's progress callback to stop the edit within a step. Editor.edit re-raises it after
    putting the model and the Editor back as they were before the call. Not a FastDragError: nothing was wrong."""

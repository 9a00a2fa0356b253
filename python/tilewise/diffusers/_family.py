"""Model families: what tilewise.diffusers needs to know about one diffusers transformer class. Each family is
one module of this package that subclasses Family and registers it with @register; the package imports every
such module, so adding a model is adding one file."""
from __future__ import annotations

from typing import Callable

FAMILIES: dict = {}  # name -> Family subclass


class Family:
    """name: the registry key (e.g. "Wan"); model_class: the diffusers class name it applies to (looked up in
    diffusers lazily); processor: the attention processor class (a subclass of _controller.Processor)."""

    name = ""
    model_class = ""
    processor: type = type(None)

    @staticmethod
    def latent(config, shape) -> tuple:
        """(T, H, W) latent tokens after patch embedding, from the model config and hidden_states' shape."""
        raise NotImplementedError

    @staticmethod
    def attention_modules(model) -> list:
        """The self-attention modules tilewise runs, in layer order (layer i = list index i)."""
        raise NotImplementedError

    @staticmethod
    def install_hooks(model, processors: list) -> list:
        """Module hooks the family's processors need beside set_processor (e.g. to start work earlier in the
        block); returns their handles, which disable() removes. None by default."""
        return []

    @staticmethod
    def cp_plan(model, per_token_timesteps: bool):
        """diffusers' context-parallel plan for this model when diffusers has none or tilewise needs another
        (None: the model's own)."""
        return None


def register(cls: type) -> type:
    """Class decorator: makes a Family known by its name."""
    if not cls.name or not cls.model_class:
        raise ValueError(f"family {cls.__name__}: expected a name and a model_class")
    FAMILIES[cls.name] = cls
    return cls


def family_of(model) -> type:
    import diffusers

    for fam in FAMILIES.values():
        cls = getattr(diffusers, fam.model_class, None)
        if cls is not None and isinstance(model, cls):
            return fam
    names = ", ".join(f.model_class for f in FAMILIES.values())
    raise TypeError(f"model: expected one of {names}, or a pipeline holding one as .transformer, got "
                    f"{type(model).__name__}")


def cp_plan(model, *, per_token_timesteps: bool = False) -> dict:
    """The context-parallel plan to pass to `transformer.enable_parallelism(config=..., cp_plan=...)`: tilewise's
    for the models diffusers 0.42 has none for (HunyuanVideo, CogVideoX); for Wan the model's own, less its split
    of a per-token timestep unless per_token_timesteps=True (Wan 2.2 TI2V's [B, S] timesteps): diffusers 0.42.1
    meets a plain [B] timestep there with a call to a logger method it does not have (AttributeError:
    'Logger' object has no attribute 'warning_once')."""
    plan = family_of(model).cp_plan(model, bool(per_token_timesteps))
    if plan is None:
        plan = getattr(model, "_cp_plan", None)
    if plan is None:
        raise ValueError(f"model: {type(model).__name__} has no context-parallel plan in diffusers or tilewise")
    return plan


Hook = Callable  # hook(layer, step, q, k, v, geometry) -> tensor or None

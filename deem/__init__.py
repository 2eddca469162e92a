"""deem-transformers: DEEM as a Transformers-native package (`from deem import DeemForInterleavedGeneration`).

The public names load on first use (module ``__getattr__``), so ``import deem`` and the ``deem`` command line stay
fast: torch / transformers / diffusers are imported only when a model, config or processor class is asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the module (relative to this package) that defines it
_LAZY = {
    "DeemConfig": ".modeling.configuration_deem",
    "DeemImageProcessor": ".modeling.image_processing_deem",
    "DeemForInterleavedGeneration": ".modeling.modeling_deem",
    "DeemGenerateOutput": ".modeling.modeling_deem",
    "DeemImageDecoder": ".modeling.modeling_deem",
    "DeemModel": ".modeling.modeling_deem",
    "DeemOutput": ".modeling.modeling_deem",
    "DeemStreamer": ".modeling.modeling_deem",
    "DiffusionDraws": ".modeling.modeling_deem",
    "DeemProcessor": ".modeling.processing_deem",
    "prepare_tokenizer": ".modeling.processing_deem",
}

__all__ = [
    "DeemConfig",
    "DeemForInterleavedGeneration",
    "DeemGenerateOutput",
    "DeemImageDecoder",
    "DeemImageProcessor",
    "DeemModel",
    "DeemOutput",
    "DeemProcessor",
    "DeemStreamer",
    "DiffusionDraws",
    "prepare_tokenizer",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .modeling.configuration_deem import DeemConfig
    from .modeling.image_processing_deem import DeemImageProcessor
    from .modeling.modeling_deem import (
        DeemForInterleavedGeneration,
        DeemGenerateOutput,
        DeemImageDecoder,
        DeemModel,
        DeemOutput,
        DeemStreamer,
        DiffusionDraws,
    )
    from .modeling.processing_deem import DeemProcessor, prepare_tokenizer


def _install_model_card_writer(model_class) -> None:
    """``model.push_to_hub`` writes the DEEM model card (deem/hub.py) through the model's ``model_card_writer``."""
    if getattr(model_class, "model_card_writer", None) is None:
        from .hub import write_model_card

        model_class.model_card_writer = staticmethod(write_model_card)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    if name == "DeemForInterleavedGeneration":
        _install_model_card_writer(value)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

"""deem-transformers: DEEM as a Transformers-native package (`from deem import DeemForInterleavedGeneration`)."""

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


def _install_model_card_writer():
    from .hub import write_model_card

    DeemForInterleavedGeneration.model_card_writer = staticmethod(write_model_card)


_install_model_card_writer()

__all__ = [
    "DeemConfig",
    "DeemForInterleavedGeneration",
    "DeemGenerateOutput",
    "DeemImageDecoder",
    "DeemModel",
    "DeemStreamer",
    "DeemImageProcessor",
    "DeemOutput",
    "DeemProcessor",
    "DiffusionDraws",
    "prepare_tokenizer",
]

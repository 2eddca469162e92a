"""What differs between the transformers releases we declare, detected from the installed library (no version
numbers): the name under which a ``Cache`` travels through outputs, ``generate`` and the LLaMA modules.

transformers 5.24 renamed ``past_key_values`` to ``cache`` everywhere (output fields, ``generate``'s model kwargs,
``prepare_inputs_for_generation``, the attention modules, the mask helpers); earlier 5.x releases use
``past_key_values``. The old name still works on 5.24 with a FutureWarning, so we always speak the library's own
name and never trigger it.
"""

import dataclasses
import inspect

from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaAttention
from transformers.utils import ModelOutput

__all__ = ["CACHE_FIELD", "ATTENTION_CACHE_KW", "MASK_CACHE_KW", "model_output_class", "pop_cache_kwarg"]


def _cache_param(function) -> str:
    """``"cache"`` or ``"past_key_values"``: the cache parameter of ``function`` (signature follows ``__wrapped__``)."""
    parameters = inspect.signature(function).parameters
    return "cache" if "cache" in parameters else "past_key_values"


# the field name the library's own output classes use for the cache ("cache" from 5.24 on)
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"
ATTENTION_CACHE_KW = _cache_param(LlamaAttention.forward)
MASK_CACHE_KW = _cache_param(create_causal_mask)


def pop_cache_kwarg(cache, past_key_values, kwargs: dict):
    """The cache a caller passed under either name (``cache=``, ``past_key_values=`` or the deprecated
    ``cache_params=`` left in ``kwargs``); giving it twice under different names is an error."""
    given = [
        (name, value)
        for name, value in (
            ("cache", cache),
            ("past_key_values", past_key_values),
            ("cache_params", kwargs.pop("cache_params", None)),
        )
        if value is not None
    ]
    if len(given) > 1:
        raise ValueError(
            f"the cache was given twice ({' and '.join(name for name, _ in given)}); pass it once, as `cache`"
        )
    return given[0][1] if given else None


def model_output_class(name: str, module: str, doc: str, fields: list[tuple[str, object]]) -> type:
    """A ``ModelOutput`` dataclass ``name`` whose fields are ``fields`` (all defaulting to ``None``), where the field
    called ``"cache"`` takes the installed library's name for it (``CACHE_FIELD``)."""
    spec = [
        (CACHE_FIELD if field == "cache" else field, annotation, dataclasses.field(default=None))
        for field, annotation in fields
    ]
    cls = dataclasses.make_dataclass(name, spec, bases=(ModelOutput,))
    cls.__module__ = module
    cls.__qualname__ = name
    cls.__doc__ = doc
    return cls

"""Works on every transformers release we declare: the cache travels under the library's own name (``cache`` from
5.24 on, ``past_key_values`` before), never with a deprecation warning from our code; our own files load without
a remote-code prompt."""

import dataclasses
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=4)


def test_output_cache_field_is_the_librarys():
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from deem import DeemOutput
    from deem.modeling.compat import CACHE_FIELD

    library = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    ours = {f.name for f in dataclasses.fields(DeemOutput)}
    assert CACHE_FIELD in library and CACHE_FIELD in ours
    assert {"past_key_values", "cache"} & ours == {CACHE_FIELD}
    out = DeemOutput(logits=torch.zeros(1), **{CACHE_FIELD: "c"})
    assert out[CACHE_FIELD] == "c" and getattr(out, CACHE_FIELD) == "c"


def test_forward_takes_the_cache_under_either_name(model):
    from transformers import DynamicCache

    from deem.modeling.compat import CACHE_FIELD

    cfg = model.config
    ids = torch.tensor([[cfg.bos_token_id, 5, 6, 7, 8]])
    results = []
    for name in ("cache", "past_key_values"):
        cache = DynamicCache(config=cfg.text_config)
        with torch.no_grad():
            first = model(input_ids=ids[:, :3], use_cache=True, return_loss=False, **{name: cache})
            assert getattr(first, CACHE_FIELD) is cache and cache.get_seq_length() == 3
            second = model(input_ids=ids[:, 3:], use_cache=True, return_loss=False, **{name: cache})
        results.append(second.logits)
    with torch.no_grad():
        full = model(input_ids=ids, return_loss=False).logits[:, 3:]
    torch.testing.assert_close(results[0], results[1], atol=0, rtol=0)
    torch.testing.assert_close(results[0], full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cache was given twice"):
        model(
            input_ids=ids,
            cache=DynamicCache(config=cfg.text_config),
            past_key_values=DynamicCache(config=cfg.text_config),
        )


SCRIPT = textwrap.dedent(
    """
    import logging, sys, tempfile, warnings
    warnings.simplefilter("error", FutureWarning)
    # third-party code we cannot change: older timm (our lower bound) decorates with torch.jit.interface at import
    warnings.filterwarnings("ignore", message="`torch.jit.interface` is deprecated", category=FutureWarning)
    sys.path.insert(0, "tests")
    import torch
    from transformers.utils import logging as hf_logging
    records = []
    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())
    hf_logging.get_logger("transformers").addHandler(Keep())
    from conftest import tiny_batch, tiny_model
    from tokenizer_utils import build_test_tokenizer
    from deem import DeemImageProcessor, DeemProcessor, DeemStreamer, prepare_tokenizer
    model = tiny_model(seed=2)
    cfg = model.config
    batch = tiny_batch(cfg, seed=1, pad_side="left")
    batch.pop("pixel_values_decoder")
    common = dict(max_new_tokens=3, pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_id)
    model.generate(**batch, soi="suppress", **common)
    model.generate(**batch, soi="suppress", do_sample=True, top_k=5, **common)
    model.generate(**batch, soi="suppress", num_beams=2, return_dict_in_generate=True, output_scores=True, **common)
    model.generate(**batch, soi="suppress", use_cache=False, **common)
    out = model.generate(**batch, soi="draw", num_inference_steps=2, max_new_images=1, **common)
    streamer = DeemStreamer(prepare_tokenizer(build_test_tokenizer()), skip_prompt=True)
    model.generate(input_ids=torch.tensor([[cfg.bos_token_id, 5, 6]]), soi="stop", streamer=streamer, **common)
    list(streamer)
    model.train()
    full = tiny_batch(cfg, seed=1)
    model(**full, generator=torch.Generator().manual_seed(0)).loss.backward()
    d = tempfile.mkdtemp()
    model.save_pretrained(d)
    DeemProcessor(DeemImageProcessor(), prepare_tokenizer(build_test_tokenizer())).save_pretrained(d)
    DeemProcessor.from_pretrained(d)
    from deem.trainers.cli import build_model, build_processor  # what `deem train` with model.path runs
    build_model({"path": d})
    build_processor({"model": {"path": d}})
    bad = [m for m in records if "deprecated" in m.lower() or "model of type" in m or "custom code" in m]
    assert not bad, bad
    print("CLEAN", len(records))
    """
)


@pytest.mark.timeout(300)
def test_no_future_warning_or_deprecation_from_our_code():
    """In a fresh process (transformers warns once per process): forward, train, every generate mode, the streamer,
    save and processor load with FutureWarning as an error and no deprecation / remote-code / model-type log."""
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=280, stdin=subprocess.DEVNULL
    )
    assert done.returncode == 0 and "CLEAN" in done.stdout, done.stderr[-4000:]


def test_processor_from_pretrained_needs_no_remote_code(tmp_path, monkeypatch):
    """Our package loading our own files: AutoConfig / the remote-code prompt are never consulted."""
    import transformers.dynamic_module_utils as dynamic
    import transformers.models.auto.configuration_auto as configuration_auto
    from tokenizer_utils import build_test_tokenizer

    from deem import DeemImageProcessor, DeemProcessor, prepare_tokenizer

    model = tiny_model(seed=0)
    model.save_pretrained(tmp_path)
    saved = DeemProcessor(DeemImageProcessor(), prepare_tokenizer(build_test_tokenizer()))
    saved.save_pretrained(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("asked whether to run remote code")

    monkeypatch.setattr(dynamic, "resolve_trust_remote_code", refuse)
    monkeypatch.setattr(configuration_auto, "resolve_trust_remote_code", refuse)
    processor = DeemProcessor.from_pretrained(tmp_path)
    assert processor.soi_token_id == saved.soi_token_id and len(processor.tokenizer) == len(saved.tokenizer)

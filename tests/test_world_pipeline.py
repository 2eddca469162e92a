"""The main command on the built-in world: stage 0 (component pretraining, the command that reproduced the shipped
components) and `python -m deem world --quick` end to end, through every phase."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_shipped_components_are_small_safetensors_with_their_command():
    from deem.world.components import SHIPPED, component_paths

    paths = component_paths(SHIPPED)
    assert all(p.exists() for p in paths.values()), paths
    files = [p for p in SHIPPED.rglob("*") if p.is_file()]
    weights = [p for p in files if p.name.endswith((".safetensors",))]
    assert len(weights) >= 5 and not [p for p in files if p.suffix in (".bin", ".pt", ".pth")]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    report = json.loads((SHIPPED / "report.json").read_text())
    command = report["command"].split()
    assert command[:3] == ["python", "-m", "deem.world.components"] and command[-2:] == ["--seed", "0"], command
    assert report["clip"]["clip_batch_acc_last"] > 10 * report["clip"]["chance"]  # they learned something
    assert report["llm"]["loss_last"] < report["llm"]["loss_first"] / 4
    assert report["sd"]["vae_last"] < report["sd"]["vae_first"] / 4
    # what drawing rests on, measured when they were trained: reconstructions keep colour and shape, and the SD
    # component draws the prompt's colour and shape (issue 12's drawing targets: 70 % / 50 %)
    rec = report["sd"]["vae_reconstruction"]["reconstructions"]
    assert rec["colour"] >= 0.95 and rec["shape"] >= 0.8, rec
    follow = report["sd"]["prompt_following"]
    assert follow["colour"] >= 0.7 and follow["shape"] >= 0.5, follow


@pytest.mark.timeout(120)
def test_shipped_sd_component_draws_what_its_prompt_asks():
    """The shipped SD component through diffusers' own StableDiffusionPipeline (no DEEM code): every colour x shape
    prompt, scored by the renderer's detector, far above chance (1/6, 1/4); its VAE keeps colour and shape."""
    from diffusers import AutoencoderKL

    from deem.world.components import SHIPPED, reconstruction_scores, sd_prompt_following

    follow = sd_prompt_following(SHIPPED / "sd", per_prompt=1, steps=20)
    assert follow["images"] == 24 and follow["colour"] >= 0.7 and follow["shape"] >= 0.5, follow
    vae = AutoencoderKL.from_pretrained(SHIPPED / "sd" / "vae").eval()
    scores = reconstruction_scores(vae, n=60)
    assert scores["renders"]["colour"] == 1.0, scores  # the detector itself on the renders
    assert scores["reconstructions"]["colour"] >= 0.95 and scores["reconstructions"]["shape"] >= 0.8, scores


def test_sd_tokenizer_makes_every_world_word_one_token(tmp_path):
    """The written CLIP BPE (vocab.json + merges.txt) as CLIPTokenizer and as the fast tokenizer transformers
    builds from it: each world word is one "word</w>" token, other text falls back to characters, both agree."""
    from transformers import AutoTokenizer, CLIPTokenizer

    from deem.world.components import clip_merges, world_words, write_clip_tokenizer

    size = write_clip_tokenizer(tmp_path / "tok")
    slow, fast = CLIPTokenizer.from_pretrained(tmp_path / "tok"), AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert len(slow) == size and fast.is_fast
    for word in world_words():
        assert slow.convert_ids_to_tokens(slow(word, add_special_tokens=False).input_ids) == [word + "</w>"], word
    for text in ("a purple triangle and an orange diamond.", "zebra!", "green greenish"):
        assert slow(text).input_ids == fast(text).input_ids, text
    assert len(slow("zebra", add_special_tokens=False).input_ids) == 5  # no merge for it: characters
    # a later word split by an earlier word's merge ("g|re|e|n" after "red") still ends as one token
    merges = clip_merges(["red", "green"])
    assert ("r", "e") in merges and merges.index(("r", "e")) < merges.index(("g", "re"))


def test_component_pretraining_still_runs_and_assembles(tmp_path):
    """The reproduce command's code path at a few steps: three components in their real formats, then assembly."""
    from deem.conversion.assemble import assemble_deem
    from deem.world.components import ComponentSizes, component_paths, pretrain_components
    from deem.world.pipeline import WorldRun, _overrides

    sizes = ComponentSizes(llm_hidden=32, llm_layers=1, llm_steps=3, vae_steps=2, unet_steps=3, clip_steps=3)
    sizes.batch_size, sizes.corpus_scenes = 4, 150
    report = pretrain_components(tmp_path / "c", sizes, seed=0)
    assert 0 < report["llm"]["loss_last"] < 10 and 0 < report["sd"]["unet_last"] < 10
    paths = component_paths(tmp_path / "c")
    assert (paths["sd"] / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (paths["sd"] / "model_index.json").is_file() and (paths["llm"] / "tokenizer.json").is_file()
    model, processor = assemble_deem(
        paths["llm"],
        paths["sd"],
        paths["clip"],
        image_size=32,
        num_image_tokens=8,
        image_embed_dim=64,
        config_overrides=_overrides(WorldRun(), paths),
        seed=0,
    )
    assert model.config.vision_config.image_size == 32 and processor.num_image_tokens == 8


def _quick_world(out, *args, timeout: int):
    """`python -m deem world --quick --out OUT ARGS` in a fresh process."""
    command = [sys.executable, "-m", "deem", "world", "--quick", "--out", str(out), *args]
    return subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(720)
def test_python_m_deem_world_quick_runs_every_phase_and_learns_yes_no(tmp_path):
    out = tmp_path / "run"
    proc = _quick_world(out, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    from deem.world.pipeline import PHASES

    for phase in PHASES:
        assert (out / phase / "done.json").is_file(), phase
    for name in ("report.md", "samples.png", "loss_curves.png"):
        assert (out / "report" / name).stat().st_size > 100, name
    results = json.loads((out / "results.json").read_text())
    m = results["metrics"]
    # every stage trained through DeemTrainer: stage 1 logged all three losses, stage 2 NTP + CSR, all finite
    losses = results["losses"]
    assert {"stage1_loss_ntp", "stage1_loss_nip", "stage1_loss_csr", "stage2_loss_ntp", "stage2_loss_csr"} <= set(
        losses
    ), sorted(losses)
    assert all(0 < v["last"] < 50 for v in losses.values()), losses
    assert losses["stage2_loss_ntp"]["last"] < losses["stage2_loss_ntp"]["first"]
    assert "DEEM on the built-in world" in proc.stdout and "deem world: done" in proc.stdout
    for key in ("pope_random", "pope_popular", "pope_adversarial", "robustvqa_in", "robustvqa_ood"):
        assert 0 <= m["stage2_yes_no"][key]["score"]["accuracy"] <= 100
    assert m["stage1_draw"]["n"] > 0 and 0 <= m["stage1_draw"]["colour_accuracy"] <= 1
    # a saved stage loads through the Auto classes with trust_remote_code, in a fresh process
    load = (
        "import sys; from transformers import AutoModel, AutoProcessor; "
        "m = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True); "
        "p = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True); "
        "print(type(m).__name__, type(p).__name__)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", load, str(out / "stage3")], env=ENV, capture_output=True, text=True, timeout=200
    )
    assert proc.returncode == 0 and "DeemForInterleavedGeneration DeemProcessor" in proc.stdout, proc.stderr[-2000:]
    # the same folder with the optional yes/no warm-up: the phases before it are kept (cached), the warm-up trains
    # through DeemTrainer on its own set, and every later phase reruns from it
    kept = {phase: (out / phase / "done.json").stat().st_mtime_ns for phase in PHASES}
    proc = _quick_world(out, "--grounding-steps", "3", timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    now = {phase: (out / phase / "done.json").stat().st_mtime_ns for phase in PHASES}
    split = PHASES.index("grounding")
    assert all(now[p] == kept[p] for p in PHASES[:split]), (kept, now)
    assert all(now[p] != kept[p] for p in PHASES[split:]), (kept, now)
    grounding = json.loads((out / "grounding" / "done.json").read_text())["info"]
    assert grounding["steps"] == 3 and 0 < grounding["log_history"][-1]["train_loss"] < 50, grounding
    stage2_sets = json.loads((out / "stage2" / "done.json").read_text())["info"]["sets"]
    assert f"model.path={out / 'grounding'}" in stage2_sets, stage2_sets
    assert "stage steps 6 / 3 + " in (out / "report" / "report.md").read_text()
    # the bar: held-out yes/no (scored options) clearly above the 50 % chance level. Not reached yet at this
    # size on a CPU (the model learns the answers' prior first): reported as an expected failure with the number.
    held_out = m["stage2_yes_no"]["robustvqa_in"]["score"]["accuracy"]  # percent (deem.evaluation)
    if held_out < 65:
        pytest.xfail(f"held-out yes/no accuracy {held_out:.1f} % after the quick run (target >= 65 %)")


def _spread(perceiver, width: int) -> float:
    """How far apart the perceiver's outputs are for six contexts that share most of their content (the mean relative
    distance to their mean), as the world's captions do (their LLM contexts are ~20 % apart)."""
    import torch

    g = torch.Generator().manual_seed(0)
    contexts = torch.randn(1, 5, width, generator=g) + 0.2 * torch.randn(6, 5, width, generator=g)
    with torch.no_grad():
        out = perceiver.eval()(contexts).flatten(1)
    mean = out.mean(0)
    return float(((out - mean).norm(dim=1) / mean.norm()).mean())


def test_world_perceivers_start_reading_their_inputs_as_the_7b_ones_do():
    """At the original's init std 0.02 the world-sized perceivers give nearly the same output whatever they read (their
    layer-normed queries drown the cross-attention); the width-matched init restores the 7B model's balance."""
    import torch

    from deem.modeling.configuration_deem import DeemDecoderPerceiverConfig, DeemPerceiverConfig
    from deem.modeling.image_decoder_deem import DeemDecoderPerceiver
    from deem.modeling.vision import DeemPerceiver
    from deem.world.components import SHIPPED, component_paths
    from deem.world.pipeline import WorldRun, _overrides, perceiver_widths_7b, width_matched_init

    for name, (hidden, width) in perceiver_widths_7b().items():
        assert width_matched_init(name, hidden, width) == 0.02
    overrides = _overrides(WorldRun(), component_paths(SHIPPED))
    dec_std = overrides["decoder_perceiver_config"]["initializer_range"]
    enc_std = overrides["perceiver_config"]["initializer_range"]
    assert (dec_std, enc_std) == (0.1022, 0.0744)  # 64-wide perceivers reading the 96-wide LLM / 64-wide image maps
    torch.manual_seed(0)
    spread_7b = _spread(DeemDecoderPerceiver(DeemDecoderPerceiverConfig()), 4096)
    # the world's perceiver configs as assembly builds them (their overrides + the queries and widths it sets)
    world = {name: dict(overrides[name]) for name in perceiver_widths_7b()}
    for config in world.values():
        del config["initializer_range"]
    decoder = dict(world["decoder_perceiver_config"], num_queries=48, hidden_size=64, encoder_hidden_size=96)
    torch.manual_seed(0)
    spread_orig = _spread(DeemDecoderPerceiver(DeemDecoderPerceiverConfig(**decoder, initializer_range=0.02)), 96)
    torch.manual_seed(0)
    spread_matched = _spread(DeemDecoderPerceiver(DeemDecoderPerceiverConfig(**decoder, initializer_range=dec_std)), 96)
    spreads = (spread_7b, spread_orig, spread_matched)
    assert spread_orig < spread_7b / 10 and 0.7 < spread_matched / spread_7b < 1.4, spreads
    encoder = dict(world["perceiver_config"], num_queries=8, encoder_hidden_size=64)
    torch.manual_seed(0)
    enc_orig = _spread(DeemPerceiver(DeemPerceiverConfig(**encoder, initializer_range=0.02)), 64)
    torch.manual_seed(0)
    enc_matched = _spread(DeemPerceiver(DeemPerceiverConfig(**encoder, initializer_range=enc_std)), 64)
    assert enc_orig < 0.01 < 0.03 < enc_matched, (enc_orig, enc_matched)

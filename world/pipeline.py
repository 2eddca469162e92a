"""`python -m deem` / `deem world`: the whole system on the built-in world, through the public API.

Phases (each one's result is cached in ``OUT/<phase>/``, marked complete by ``OUT/<phase>/done.json``; a rerun or an
interrupted run resumes at the first unfinished phase):

1. ``data``: the world's training and evaluation sets in the real formats (`formats.write_world_data`);
2. ``components``: the shipped pretrained components (``world/pretrained/``) or, with ``pretrain=True`` (or when
   none are shipped), stage 0 run here (`components.pretrain_components`);
3. ``assembled``: `deem.conversion.assemble.assemble_deem` (what ``deem assemble`` runs) on the three components;
4. ``stage1`` / ``stage2`` / ``stage3``: ``deem train`` (`deem.trainers.cli.run`) with
   ``trainers/configs/world_stage{1,2,3}.yaml``; every stage saves the model and its processor;
5. ``evaluation``: yes/no (POPE-style, RobustVQA-style in / out of distribution), captions (CIDEr beside a
   random-caption baseline), region captions, text-to-image drawings scored by the renderer's detector, where
   ``<|startofimage|>`` is emitted (`evaluate.evaluate_world`);
6. ``report``: ``report.md``, ``samples.png`` (interleaved stories drawn with ``generate(soi="draw")``),
   ``loss_curves.png``, ``results.json``.

``ablation=True`` adds stage 1 with and without L_CSR over several seeds (each followed by the same short stage 2,
the default recipe), evaluated on the RobustVQA-style sets in and out of distribution (the paper's Table 6).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers.utils import logging

logger = logging.get_logger(__name__)

PHASES = ("data", "components", "assembled", "stage1", "grounding", "stage2", "stage3", "evaluation", "report")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "trainers" / "configs"
# the data each world config trains on: (its data.sources key, the path under OUT/data)
CONFIG_DATA = {
    "world_stage1": (("mmc4.path", "mmc4/docs.jsonl"), ("mmc4.images", "mmc4/images"), ("pairs.path", "pairs")),
    "world_stage2_grounding": (("grounding.path", "llava/grounding.json"), ("grounding.images", "llava/images")),
    "world_stage2": (("llava.path", "llava/llava.json"), ("llava.images", "llava/images")),
    "world_stage3": (("referring.path", "referring/refs.json"), ("referring.images", "referring/images")),
}


@dataclass
class WorldRun:
    """Every size of a run; `quick()` is the CI one."""

    quick: bool = False
    seed: int = 0
    device: str = "cpu"
    pretrain: bool = False
    stage1_steps: int = 1200
    grounding_steps: int = 0  # > 0 (e.g. 1200): stage 2's yes/no warm-up (world_stage2_grounding.yaml) first
    stage2_steps: int = 200
    stage3_steps: int = 30
    num_image_tokens: int = 8
    image_embed_dim: int = 64
    draw_steps: int = 20
    open_gates: float = 0.0  # the original's init (§2.11); > 0 opens the cross-attention gates after assembly
    ablation_seeds: tuple = (0, 1, 2)
    ablation_stage1_steps: int = 100
    ablation_stage2_steps: int = 100
    extra: dict = field(default_factory=dict)

    @classmethod
    def make(cls, quick: bool = False, **kwargs) -> "WorldRun":
        if quick:
            base = dict(
                quick=True,
                stage1_steps=6,
                stage2_steps=50,
                stage3_steps=3,
                draw_steps=4,
                ablation_seeds=(0,),
                ablation_stage1_steps=4,
                ablation_stage2_steps=20,
            )
            base.update(kwargs)
            return cls(**base)
        return cls(**kwargs)


def _done(folder: Path) -> bool:
    return (folder / "done.json").is_file()


def _mark(folder: Path, info: dict) -> None:
    tmp = folder / ".done.json.tmp"
    tmp.write_text(json.dumps(info, indent=2, default=str))
    os.replace(tmp, folder / "done.json")


def perceiver_widths_7b() -> dict:
    """(hidden, encoder width) of the 7B model's perceivers (the config defaults): the encoder's (§2.3) and the image
    decoder's (§2.8), by their `DeemConfig` field name."""
    from deem.modeling.configuration_deem import DeemDecoderPerceiverConfig, DeemPerceiverConfig

    configs = {"perceiver_config": DeemPerceiverConfig(), "decoder_perceiver_config": DeemDecoderPerceiverConfig()}
    return {name: (c.hidden_size, c.encoder_hidden_size) for name, c in configs.items()}


def width_matched_init(config_name: str, hidden: int, encoder_width: int, std_7b: float = 0.02) -> float:
    """The perceiver init std that gives a world-sized perceiver the 7B model's balance at initialisation.

    The perceiver layers are post-LN and start from layer-normed queries (unit scale), so what a cross-attention adds
    to them scales as ``std**2 * sqrt(hidden * encoder_width)`` (value then output projection, both normal(std)).
    With the original's 0.02 that is 0.36 of the queries' scale in the 7B encoder perceiver and 0.82 in its decoder
    perceiver, but 0.026 / 0.032 at the world's widths (64 x 64, 64 x 96): the queries drown what they read, every
    image gets nearly the same tokens and every caption nearly the same UNet condition (measured on the assembled
    world model: conditions of different captions 0.2 % apart, image tokens of different images 1 %). This keeps the
    7B balance: ``std = 0.02 * (hidden_7b * width_7b / (hidden * width)) ** (1/4)``."""
    h7, w7 = perceiver_widths_7b()[config_name]
    return round(std_7b * (h7 * w7 / (hidden * encoder_width)) ** 0.25, 4)


def _overrides(run: WorldRun, paths: dict) -> dict:
    """The world model's config overrides for `assemble_deem`; ``paths``: the components (`component_paths`), whose
    LLM width and UNet condition width (the decoder perceiver's, as assembly sets it) set the perceivers' init."""
    from deem.conversion.assemble import _read_json

    llm_hidden = _read_json(Path(paths["llm"]) / "config.json", "LLaMA config", ("hidden_size",))["hidden_size"]
    unet = _read_json(Path(paths["sd"]) / "unet" / "config.json", "UNet config", ("cross_attention_dim",))
    perceiver_hidden = 64
    encoder_std = width_matched_init("perceiver_config", perceiver_hidden, run.image_embed_dim)
    decoder_std = width_matched_init("decoder_perceiver_config", unet["cross_attention_dim"], llm_hidden)
    return {
        "perceiver_config": {
            "hidden_size": perceiver_hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "initializer_range": encoder_std,
        },
        "decoder_perceiver_config": {
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "initializer_range": decoder_std,
        },
        "cross_attention_config": {"num_points": 2, "frequency": 1, "num_heads": 4},
        "diffusion_config": {"side_num_heads": 4, "side_num_points": 2},
        "text_config": {"max_position_embeddings": 512},
        "context_max_positions": 512,
    }


class Pipeline:
    def __init__(self, out, run: WorldRun):
        self.out = Path(out)
        self.run = run
        self.times: dict[str, float] = {}
        self.results: dict = {}

    # ------------------------------------------------------------------------------------------------ phases

    def phase_data(self, folder: Path) -> dict:
        from .formats import WorldSizes, write_world_data

        sizes = WorldSizes.quick() if self.run.quick else WorldSizes()
        write_world_data(folder, sizes, seed=self.run.seed)
        return asdict(sizes)

    def phase_components(self, folder: Path) -> dict:
        from .components import SHIPPED, ComponentSizes, component_paths, pretrain_components

        shipped = component_paths(SHIPPED)
        if not self.run.pretrain and all(p.exists() for p in shipped.values()):
            from deem.conversion.assemble import staged_output_dir

            with staged_output_dir(folder, overwrite=True) as tmp:
                for name in ("llm", "sd"):
                    shutil.copytree(shipped[name], Path(tmp) / name)
                shutil.copy2(shipped["clip"], Path(tmp) / shipped["clip"].name)
                if (SHIPPED / "report.json").is_file():
                    shutil.copy2(SHIPPED / "report.json", Path(tmp) / "report.json")
            return {"source": str(SHIPPED)}
        sizes = ComponentSizes.quick() if self.run.quick else ComponentSizes()
        report = pretrain_components(folder, sizes, seed=self.run.seed)
        return {"source": "pretrained here", **report}

    def phase_assembled(self, folder: Path) -> dict:
        import torch

        from deem.conversion.assemble import assemble_deem, staged_output_dir

        from .components import component_paths

        paths = component_paths(self.out / "components")
        if folder.exists():
            shutil.rmtree(folder)
        model, processor = assemble_deem(
            paths["llm"],
            paths["sd"],
            paths["clip"],
            image_size=32,
            num_image_tokens=self.run.num_image_tokens,
            image_embed_dim=self.run.image_embed_dim,
            config_overrides=_overrides(self.run, paths),
            seed=self.run.seed,
        )
        # The original's gates start at 0 (kept by default). Measured on the default run: with the gates opened to 0.5
        # after assembly the image maps flood the tiny LLM's residual stream (caption CIDEr 1.47 instead of 1.74;
        # a text-only comparison that DEEM learns in 200 steps without an image is not learned in 700 with one).
        if self.run.open_gates:
            with torch.no_grad():
                for layer in model.language_model.layers:
                    if layer.cross_attn is not None:
                        layer.cross_attn.gate.fill_(self.run.open_gates)
        with staged_output_dir(folder, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
        return {"parameters": sum(p.numel() for p in model.parameters()), "cross_attention_gates": self.run.open_gates}

    def _train(
        self, stage: int, folder: Path, source: Path, steps: int, seed: int, extra_sets=(), config: str | None = None
    ) -> dict:
        from deem.cli import parse_command
        from deem.trainers.cli import run as train_run

        data = self.out / "data"
        config = config or f"world_stage{stage}"
        sets = [f"model.path={source}", f"training.max_steps={steps}", f"training.seed={seed}"]
        sets += [f"data.sources.{key}={data / rel}" for key, rel in CONFIG_DATA[config]]
        if self.run.device != "cpu":
            sets.append("training.use_cpu=false")
        sets += list(extra_sets)
        if folder.exists():
            shutil.rmtree(folder)
        argv = ["--stage", str(stage), "--config", str(CONFIG_DIR / f"{config}.yaml")]
        for s in sets:
            argv += ["--set", s]
        argv += ["--output_dir", str(folder)]
        train_run(parse_command("train", argv))
        state = json.loads((folder / "trainer_state.json").read_text())
        return {"log_history": state.get("log_history", []), "steps": steps, "sets": sets}

    def phase_stage1(self, folder: Path) -> dict:
        return self._train(1, folder, self.out / "assembled", self.run.stage1_steps, self.run.seed)

    def phase_grounding(self, folder: Path) -> dict:
        if not self.run.grounding_steps:  # off by default: stage 2 starts from stage 1
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            return {"steps": 0, "log_history": []}
        return self._train(
            2, folder, self.out / "stage1", self.run.grounding_steps, self.run.seed, config="world_stage2_grounding"
        )

    def phase_stage2(self, folder: Path) -> dict:
        source = self.out / ("grounding" if self.run.grounding_steps else "stage1")
        return self._train(2, folder, source, self.run.stage2_steps, self.run.seed)

    def phase_stage3(self, folder: Path) -> dict:
        return self._train(3, folder, self.out / "stage2", self.run.stage3_steps, self.run.seed)

    def phase_evaluation(self, folder: Path) -> dict:
        from .evaluate import evaluate_world

        folder.mkdir(parents=True, exist_ok=True)
        return evaluate_world(self.out, folder, self.run)

    def phase_ablation(self, folder: Path) -> dict:
        from .evaluate import evaluate_yes_no_sets

        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for seed in self.run.ablation_seeds:
            for csr in (5.0, 0.0):
                tag = f"seed{seed}_csr{csr:g}"
                s1, s2 = folder / f"{tag}_stage1", folder / f"{tag}_stage2"
                self._train(
                    1,
                    s1,
                    self.out / "assembled",
                    self.run.ablation_stage1_steps,
                    seed,
                    [f"training.loss_csr_weight={csr}"],
                )
                self._train(2, s2, s1, self.run.ablation_stage2_steps, seed)  # the same stage 2 for both arms
                scores = evaluate_yes_no_sets(self.out / "data", s2, self.run)
                rows.append({"seed": seed, "csr_weight": csr, **scores})
                for d in (s1, s2):
                    shutil.rmtree(d, ignore_errors=True)
        return {"rows": rows}

    def phase_report(self, folder: Path) -> dict:
        from .report import write_report

        folder.mkdir(parents=True, exist_ok=True)
        return write_report(self.out, folder, self.run, self.times)

    # ------------------------------------------------------------------------------------------------ driver

    def _stale(self, name: str, folder: Path) -> bool:
        """A cached grounding phase of another ``grounding_steps`` is rerun (and with it every later phase)."""
        if name != "grounding":
            return False
        return json.loads((folder / "done.json").read_text()).get("info", {}).get("steps") != self.run.grounding_steps

    def run_all(self, ablation: bool = False, progress=None) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        phases = list(PHASES)
        if ablation:
            phases.insert(phases.index("report"), "ablation")
        times_file = self.out / "phase_times.json"
        if times_file.is_file():
            self.times = json.loads(times_file.read_text())
        from tqdm.auto import tqdm

        bar = tqdm(phases, desc="deem world", unit="phase", disable=progress is False)
        upstream_ran = False  # a phase that ran makes every later one run again (they read what it wrote)
        for name in bar:
            folder = self.out / name
            if name != "report" and not upstream_ran and _done(folder) and not self._stale(name, folder):
                bar.set_postfix_str(f"{name}: cached")
                continue
            bar.set_postfix_str(f"{name}: running")
            logger.info(f"phase {name}")
            start = time.time()
            info = getattr(self, f"phase_{name}")(folder)
            upstream_ran = name != "report"
            self.times[name] = round(time.time() - start, 1)
            if name == "report":
                self.times["report"] = self.times[name]
            _mark(folder, {"phase": name, "seconds": self.times[name], "info": info})
            times_file.write_text(json.dumps(self.times, indent=2))
            tqdm.write(f"deem world: {name} done in {self.times[name]:.0f} s")
        return json.loads((self.out / "results.json").read_text())

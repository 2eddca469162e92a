"""The declared ranges are the tested ranges: every lower bound in pyproject.toml is pinned in .ci/oldest.txt (CI's
second leg), and the other way round."""

import re

from conftest import REPO

PACKAGES = (
    "transformers",
    "diffusers",
    "peft",
    "trl",
    "accelerate",
    "timm",
    "open_clip_torch",
    "huggingface_hub",
    "datasets",
    "tokenizers",
    "safetensors",
)


def _lower_bounds() -> dict[str, str]:
    text = (REPO / "pyproject.toml").read_text()
    bounds = {}
    for name, spec in re.findall(r'"([A-Za-z0-9_.-]+)((?:[<>=!~]=?[^",]+,?)+)"', text):
        match = re.search(r">=([0-9][^,]*)", spec)
        if match:
            bounds.setdefault(name.lower().replace("-", "_"), match.group(1).strip())
    return bounds


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / ".ci" / "oldest.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower().replace("-", "_")] = version
    return pins


def test_every_lower_bound_is_pinned_in_the_oldest_leg():
    bounds, pins = _lower_bounds(), _pins()
    for name in PACKAGES:
        assert name in bounds, f"{name} has no lower bound in pyproject.toml"
        assert name in pins, f"{name} is not pinned in .ci/oldest.txt"
        pinned = tuple(int(x) for x in re.findall(r"\d+", pins[name]))
        declared = tuple(int(x) for x in re.findall(r"\d+", bounds[name]))
        assert (
            pinned[: len(declared)] == declared and all(x == 0 for x in pinned[len(declared) :]) or pinned == declared
        ), (name, bounds[name], pins[name])


def test_ci_runs_both_legs():
    script = (REPO / ".ci" / "run").read_text()
    assert "-c .ci/oldest.txt" in script and script.count("-m pytest -q") == 2

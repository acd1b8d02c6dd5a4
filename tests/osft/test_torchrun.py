"""``osft train`` under ``torchrun`` on 2 gloo processes (CPU, the tiny model): FSDP2 data parallelism gives
the single-process run of the same global batch, logs once, evaluates every prompt, and a killed run
resumes exactly, on the same number of processes or on another one.

Tolerance against one process: 1e-5 relative on the logged loss and gradient norm and 1e-5 absolute on
the final weights (float32; FSDP2 sums the ranks' gradients in another order than one process does:
measured 2e-7 on the weights after 3 steps)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers.gloo_ranks import run_ranks
from helpers.runs import base_overrides, final_weights, read_metrics

from osft.config import load_config
from osft.data import tokenize_prompts
from osft.distributed import Ranks
from osft.evaluate import evaluate, load_eval_rows
from osft.model import load_causal_lm
from osft.rollout import Completion

pytestmark = pytest.mark.slow  # each launch starts 2 processes


def osft_train(overrides: list[str], processes: int = 1, **popen) -> list[str]:
    """The command line of ``osft train`` on ``processes`` torchrun processes (plain ``python -m osft``
    for one)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    return [sys.executable, *launcher, "-m", "osft", "train", "--no-progress", "/dev/null", *overrides]


def run(overrides: list[str], processes: int = 1) -> None:
    done = subprocess.run(osft_train(overrides, processes), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_train_what_one_process_trains(tmp_path, model_dir, data_file):
    """SFT, 4 prompts per step split over 2 ranks, several micro-batches per rank."""
    common = [*base_overrides(model_dir, data_file, tmp_path, "sft"), "max_steps=3", "optim.micro_batch_tokens=40"]
    run([*common, f"run_dir={tmp_path / 'one'}"])
    run([*common, f"run_dir={tmp_path / 'two'}"], processes=2)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [m["step"] for m in two] == [1, 2, 3]  # logged once, not once per rank
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert b["lr"] == a["lr"]
    single, sharded = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for name in single:
        torch.testing.assert_close(sharded[name], single[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.heavy
def test_a_killed_two_process_run_resumes_exactly(tmp_path, model_dir, data_file):
    """OSFT (each rank samples its own prompts, so every rank's RNG state is restored): kill -9 the launch
    after its second checkpoint and resume it on 2 processes; bitwise the weights of an uninterrupted run.
    A copy of the killed run resumed on one process (the optimizer state resharded) ends within the
    tolerance above of it when it does not sample: SFT."""
    steps = 4
    for recipe in ("osft", "sft"):
        common = [*base_overrides(model_dir, data_file, tmp_path / recipe / "killed", recipe), f"max_steps={steps}",
                  "save_every=1", "keep_last=10"]
        launch = subprocess.Popen(osft_train(common, 2), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  start_new_session=True)
        checkpoints = tmp_path / recipe / "killed" / "checkpoints"
        deadline = time.time() + 300
        while not (checkpoints / "step-000002").exists():
            assert launch.poll() is None, launch.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "no second checkpoint within 5 minutes"
            time.sleep(0.05)
        os.killpg(launch.pid, signal.SIGKILL)
        launch.wait()
        done = sorted(p.name for p in checkpoints.glob("step-*") if not p.name.endswith(".tmp"))
        assert done[-1] != f"step-{steps:06d}", f"the run finished before it was killed: {done}"
        if recipe == "sft":
            subprocess.run(["cp", "-r", str(tmp_path / recipe / "killed"), str(tmp_path / recipe / "on-one")],
                           check=True)
        run(common, processes=2)
        run([*common, f"run_dir={tmp_path / recipe / 'straight'}"], processes=2)
        resumed, straight = final_weights(tmp_path / recipe / "killed"), final_weights(tmp_path / recipe / "straight")
        for name in straight:
            assert torch.equal(resumed[name], straight[name]), f"{recipe}: {name}"
        assert [m["step"] for m in read_metrics(tmp_path / recipe / "killed")] == list(range(1, steps + 1))
    run([*common, f"run_dir={tmp_path / 'sft' / 'on-one'}"])
    on_one = final_weights(tmp_path / "sft" / "on-one")
    for name in straight:
        torch.testing.assert_close(on_one[name], straight[name], rtol=0, atol=1e-5, msg=name)


def test_grpo_on_two_processes_logs_once(tmp_path, model_dir, data_file):
    """GRPO groups stay on the rank that generated them; the generated tokens add up over the ranks,
    and the main rank alone writes the metrics and the evaluations (before training and at the end)."""
    evaluation = [f"eval.data={data_file}", "eval.max_prompts=5", "eval.samples=2", "eval.greedy=true"]
    run([*base_overrides(model_dir, data_file, tmp_path / "run", "grpo"), "grpo.num_generations=2", "max_steps=2",
         *evaluation], processes=2)
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[-1]["rollout_tokens"] == sum(m["completions/num_tokens"] for m in metrics)
    assert all(8 <= m["completions/num_tokens"] <= 4 * 2 * 8 for m in metrics)  # 4 prompts x 2 samples x <= 8
    evaluations = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evaluations] == [0, 2]


class AnswerEveryOtherPrompt:
    """A rollout engine that answers the even-numbered prompts of ``rows`` right and the others wrong."""

    def __init__(self, lm, config, rows):
        self.tokenizer = lm.tokenizer
        prompts = tokenize_prompts(rows, config.data, lm.tokenizer)
        self.answers = {tuple(prompt): row["answer"] if i % 2 == 0 else "0"
                        for i, (prompt, row) in enumerate(zip(prompts, rows))}

    def generate(self, prompts, temperature, num_samples=1, progress=None):
        ids = [self.tokenizer(f"the answer is {self.answers[tuple(p)]}", add_special_tokens=False)["input_ids"]
               for p in prompts for _ in range(num_samples)]
        return [Completion(i, [0.0] * len(i), truncated=False) for i in ids]


def _evaluation_worker(rank: int, world_size: int, model_dir, data_file) -> None:
    config = load_config(None, [*base_overrides(model_dir, data_file, "/tmp/unused", "grpo"),
                                f"eval.data={data_file}", "eval.max_prompts=5", "eval.samples=2", "eval.greedy=true"])
    lm = load_causal_lm(config.model, torch.device("cpu"))
    rows = load_eval_rows(config)
    engine = AnswerEveryOtherPrompt(lm, config, rows)
    split = evaluate(lm, config, rows, engine, ranks=Ranks(rank, world_size))
    alone = evaluate(lm, config, rows, engine)
    assert split == alone, (split, alone)
    assert split.metrics["eval/pass@1"] == split.metrics["eval/greedy_pass@1"] == pytest.approx(3 / 5)
    assert split.per_prompt == {"correct": [2, 0, 2, 0, 2], "greedy": [1, 0, 1, 0, 1]}  # prompts 0, 2 and 4


def test_evaluation_split_over_two_ranks_merges_every_prompt(tmp_path, model_dir, data_file):
    """5 prompts split 3 + 2 over the ranks: every rank returns what one process computes alone."""
    run_ranks(_evaluation_worker, 2, tmp_path, model_dir, data_file)


def _synced_decoding_worker(rank: int, world_size: int, model_dir) -> None:
    from osft.config import ModelConfig
    from osft.distributed import shard_model
    from osft.rollout import TokenSampler, decode

    lm = load_causal_lm(ModelConfig(path=str(model_dir)), torch.device("cpu"))
    input_ids, attention_mask = torch.tensor([[1, 5, 6], [7, 8, 9]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
    # rank 0: two greedy rows of one prompt; rank 1: two sampled rows of two prompts
    prompt_of_row = torch.tensor([0, 0] if rank == 0 else [0, 1])
    temperatures = torch.tensor([0.0, 0.0] if rank == 0 else [1.0, 0.8])

    def run(eos: int, synced: bool) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(rank)
        return decode(lm.model, input_ids, attention_mask, prompt_of_row, TokenSampler(temperatures, 1.0), 10, eos,
                      synced=synced)

    free, _ = run(-1, synced=False)
    eos = int(free[0, 1]) if rank == 0 else -1  # rank 0's rows end by their second token, rank 1's never
    alone = run(eos, synced=False)
    assert rank == 1 or (alone[0] == eos).any(1).all()
    shard_model(lm.model)
    together = run(eos, synced=True)  # rank 0 keeps stepping while rank 1 generates
    assert together[0].tolist() == alone[0].tolist()
    torch.testing.assert_close(together[1], alone[1], rtol=0, atol=1e-6)


def test_sharded_decoding_steps_until_every_rank_is_done(tmp_path, model_dir):
    """Under FSDP2 every forward is a collective: a rank whose rows all ended keeps stepping (in sync) until
    the other rank's rows end, and each rank decodes what it decodes alone, unsharded."""
    run_ranks(_synced_decoding_worker, 2, tmp_path, model_dir, timeout=120.0)


def test_osft_eval_on_two_processes_writes_once(tmp_path, model_dir, data_file):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "osft",
               "eval", "/dev/null", f"model.path={model_dir}", f"data.train={data_file}", f"run_dir={tmp_path}",
               f"eval.data={data_file}", "eval.max_prompts=5", "eval.samples=2", "rollout.max_new_tokens=8"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"eval/pass@1":') == 1
    (line,) = (tmp_path / "eval.jsonl").read_text().splitlines()
    assert json.loads(line)["step"] == 0


def test_osft_score_on_two_processes_writes_what_one_process_writes(tmp_path, model_dir, data_file):
    """The ranks score 12 + 12 rows; the main rank writes them in the data's order. The rows are padded
    in other batches than in one process, which moves float32 logprobs by a few ulps (measured 2e-7)."""
    import datasets

    written = {}
    for processes in (1, 2):
        output = tmp_path / f"scored-{processes}.parquet"
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] \
            if processes > 1 else []
        done = subprocess.run([sys.executable, *launcher, "-m", "osft", "score", "/dev/null", "--output", str(output),
                               *base_overrides(model_dir, data_file, tmp_path, "sft")],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("wrote") == 1
        written[processes] = datasets.load_dataset("parquet", data_files=str(output), split="train").to_list()
    assert [r["prompt"] for r in written[2]] == [r["prompt"] for r in written[1]]
    for one, two in zip(written[1], written[2]):
        torch.testing.assert_close(torch.tensor(two["behavior_logprobs"]), torch.tensor(one["behavior_logprobs"]),
                                   rtol=1e-6, atol=1e-6)


def test_the_demo_refuses_torchrun(monkeypatch, capsys):
    from osft.cli import main as cli_main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli_main(["demo"]) == 2
    assert "osft demo runs in one process" in capsys.readouterr().err

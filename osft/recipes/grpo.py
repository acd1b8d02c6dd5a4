"""``grpo``: ``num_generations`` completions per prompt, rewards, group-normalized advantages, and
the clipped policy loss of :func:`osft_kernels.losses.grpo_loss` (clip-higher, dual clip, KL to the
frozen initial model when ``kl_coef > 0``, truncated importance sampling against the rollout
engine's logprobs when ``is_cap`` is set). Each batch serves ``num_iterations`` optimizer steps; with
more than one, the old policy's logprobs are scored before the first."""
import torch
from torch import Tensor

from osft_kernels.losses import count_items, group_advantages, grpo_loss

from ..config import Config
from ..data import Sequences, micro_batches, pack, prompt_text, tokenize_prompts
from ..model import CausalLM, load_causal_lm
from ..rewards import REWARDS
from ..rollout import RolloutEngine, completion_metrics
from ..scoring import target_logprobs

# policy_loss's metrics under the names TRL and verl users know
METRIC_NAMES = {"clip_frac_low": "clip_ratio/low_mean", "clip_frac_high": "clip_ratio/high_mean",
                "dual_clip_frac": "clip_ratio/dual_mean", "ratio_mean": "ratio/mean", "ratio_max": "ratio/max"}


class GRPORecipe:
    columns = ("prompt_column", "answer_column")
    generates = True

    def __init__(self, config: Config, lm: CausalLM, engine: RolloutEngine):
        self.config, self.lm, self.engine = config, lm, engine
        self.updates_per_batch = config.grpo.num_iterations
        self.reward = REWARDS[config.grpo.reward]
        self.reference = None
        if config.grpo.kl_coef > 0:  # the initial policy, also when resuming from a checkpoint
            self.reference = load_causal_lm(config.model, lm.device)
            self.reference.model.eval().requires_grad_(False)

    def make_batch(self, rows: list[dict], epoch: float) -> tuple[Sequences, dict]:
        grpo, data, tokenizer = self.config.grpo, self.config.data, self.lm.tokenizer
        group = grpo.num_generations
        prompts = tokenize_prompts(rows, data, tokenizer)
        completions = self.engine.generate(prompts, temperature=grpo.temperature, num_samples=group)
        texts = tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
        repeated = [row for row in rows for _ in range(group)]
        rewards = self.reward([prompt_text(r[data.prompt_column], tokenizer) for r in repeated], texts,
                              answer=[r[data.answer_column] for r in repeated])
        unjudged = sum(r is None for r in rewards)
        reward_tensor = torch.tensor([0.0 if r is None else float(r) for r in rewards])
        batch = pack([p for p in prompts for _ in range(group)], [c.token_ids for c in completions],
                     tokenizer.pad_token_id, {"engine_logprobs": [c.logprobs for c in completions]})
        batch.row_values["advantages"] = group_advantages(reward_tensor, group, scale=grpo.scale_rewards)
        if self.config.rollout.mask_truncated_completions:  # still part of their group's statistics
            batch.drop_targets([c.truncated for c in completions])
        if self.updates_per_batch > 1:
            batch.token_values["old_logprobs"] = self._score(self.lm, batch)
        if self.reference is not None:
            batch.token_values["ref_logprobs"] = self._score(self.reference, batch)
        per_group = reward_tensor.view(-1, group)
        return batch, {"reward": reward_tensor.mean().item(),
                       "reward_std": per_group.std(1, correction=0).mean().item(),
                       "rewards/unjudged_ratio": unjudged / len(rewards), **completion_metrics(completions)}

    def _score(self, model: CausalLM, batch: Sequences) -> Tensor:
        """Logprobs of ``batch``'s targets under ``model``, ``[B, T - 1]`` like ``batch.target_mask`` (0
        elsewhere), scored through the training micro-batches (``optim.micro_batch_tokens``)."""
        scored = torch.zeros(batch.target_mask.shape)
        row = 0
        for micro in micro_batches(batch, self.config.optim.micro_batch_tokens, padding_free=model.padding_free):
            rows, width = micro.labels.shape
            scored[row:row + rows, :width - 1] = target_logprobs(model, micro.to(model.device),
                                                              temperature=self.config.grpo.temperature).cpu()
            row += rows
        return scored

    def num_items(self, batch: Sequences) -> float:
        return count_items(batch.target_mask, self.config.grpo.agg)

    def loss(self, micro: Sequences, num_items: float) -> tuple[Tensor, dict]:
        grpo = self.config.grpo
        old = micro.token_values.get("old_logprobs")
        ref = micro.token_values.get("ref_logprobs")
        # truncated importance sampling against the engine, on policy from the fused pass's own logprobs
        importance = {"rollout_logprobs": micro.token_values["engine_logprobs"], "is_cap": grpo.is_cap,
                      "is_level": grpo.is_level} if grpo.is_cap is not None else {}
        loss, metrics = grpo_loss(**self.lm.fused_inputs(micro, grpo.temperature), old_logprobs=old,
                                  advantages=micro.row_values["advantages"], ref_logprobs=ref, **importance,
                                  clip_low=grpo.clip_low, clip_high=grpo.clip_high, dual_clip=grpo.dual_clip,
                                  kl_coef=grpo.kl_coef, kl_estimator=grpo.kl_estimator, entropy_coef=grpo.entropy_coef,
                                  agg=grpo.agg, num_items=num_items,
                                  norm_length=float(self.config.rollout.max_new_tokens))
        return loss, {METRIC_NAMES.get(name, name): value for name, value in metrics.items()}

"""The pieces of a data-parallel run that need no second process: shares of a batch, the config check,
and the merge of the ranks' batch metrics."""
import pytest
from helpers.runs import base_overrides

from osft.config import ConfigError, load_config
from osft.distributed import Ranks, check_ranks
from osft.train import merge_batch_metrics


def test_shares_are_contiguous_and_cover_every_item_once():
    items = list(range(7))
    shares = [Ranks(rank, 3).share(items) for rank in range(3)]
    assert shares == [[0, 1, 2], [3, 4], [5, 6]]
    assert Ranks().share(items) == items
    assert [Ranks(rank, 9).share(items) for rank in range(9)][-2:] == [[], []]


def test_prompts_per_step_must_split_evenly(tmp_path, model_dir, data_file):
    config = load_config(None, base_overrides(model_dir, data_file, tmp_path))  # 4 prompts per step
    check_ranks(config, Ranks(1, 2))
    with pytest.raises(ConfigError, match=r"prompts_per_step \(4\) must be a multiple of the number of processes"):
        check_ranks(config, Ranks(0, 3))


def test_batch_metrics_add_generated_tokens_and_average_the_rest():
    merged = merge_batch_metrics([{"completions/num_tokens": 10.0, "reward": 0.5, "completions/mean_length": 5.0},
                                  {"completions/num_tokens": 30.0, "reward": 0.0, "completions/mean_length": 15.0}])
    assert merged == {"completions/num_tokens": 40.0, "reward": 0.25, "completions/mean_length": 10.0}

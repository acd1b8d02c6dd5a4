"""osft.data: packing prompts and responses into labelled sequences and per-target values."""

import torch

from osft.data import pack


def test_pack_puts_labels_on_responses_only():
    batch = pack([[5, 6, 7], [8]], [[9, 2], [10, 11, 2]], pad_id=1)
    assert batch.input_ids.tolist() == [[5, 6, 7, 9, 2], [8, 10, 11, 2, 1]]
    assert batch.labels.tolist() == [[-100, -100, -100, 9, 2], [-100, 10, 11, 2, -100]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch.num_targets == 5


def test_pack_puts_response_values_in_target_coordinates():
    """Per-token values sit where the fused ops' outputs and ``target_mask`` put each target: entry t
    belongs to ``labels[:, t + 1]``; with an empty prompt the first response token is no target."""
    batch = pack([[5, 6, 7], [], [8]], [[9, 2], [10, 11, 2], [3]], pad_id=1,
                 response_values={"lp": [[-0.5, -0.25], [-1.0, -2.0, -3.0], [-4.0]]})
    values = batch.token_values["lp"]
    assert values.shape == batch.target_mask.shape == (3, 4)
    assert values.tolist() == [[0, 0, -0.5, -0.25], [-2.0, -3.0, 0, 0], [-4.0, 0, 0, 0]]
    assert torch.equal(values != 0, batch.target_mask)
    assert batch.truncate(3).token_values["lp"].tolist() == [[0, 0], [-2.0, -3.0], [-4.0, 0]]

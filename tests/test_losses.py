"""The task losses against their definitions: next-token NLL per token, token-mean per sequence."""

import torch
import torch.nn.functional as F

from fedlora.data.tokenize import IGNORE
from fedlora.losses import causal_lm_loss_per_sequence, token_nll


def test_token_nll_is_the_next_token_cross_entropy_on_the_counted_tokens():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    labels[0, :3] = IGNORE  # a prompt
    labels[2, 4:] = IGNORE  # padding
    nll, mask = token_nll(logits, labels)
    for i in range(3):
        for t in range(6):
            counted = t + 1 < 6 and labels[i, t + 1] != IGNORE
            assert bool(mask[i, t]) == counted
            expected = F.cross_entropy(logits[i, t][None], labels[i, t + 1][None]) if counted else torch.tensor(0.0)
            torch.testing.assert_close(nll[i, t], expected.squeeze())


def test_the_sequence_loss_is_the_token_mean_of_each_sequence_whatever_its_length():
    torch.manual_seed(1)
    logits = torch.randn(2, 8, 7, requires_grad=True)
    labels = torch.randint(0, 7, (2, 8))
    labels[1, 3:] = IGNORE
    per_sequence = causal_lm_loss_per_sequence(logits, labels)
    for i, length in enumerate([8, 3]):
        expected = F.cross_entropy(logits[i, : length - 1], labels[i, 1:length])
        torch.testing.assert_close(per_sequence[i], expected)
    per_sequence.sum().backward()
    assert logits.grad is not None and torch.count_nonzero(logits.grad[1, 3:]) == 0, "padding gets no gradient"

"""Tokenization for both task kinds, batch collation and a seeded endless batch sampler.

Instruction tuning puts loss on the response tokens only: prompt positions and padding
get label ``-100``. The prompt is wrapped by the tokenizer's chat template when it has
one, otherwise as ``"Question: …\\nAnswer: "``; the response ends with the EOS token.
"""

from __future__ import annotations

from collections.abc import Iterator

import datasets
import torch

IGNORE = -100


def encode_classification(tokenizer, data: datasets.Dataset, max_length: int) -> list[dict[str, list[int]]]:
    enc = tokenizer(list(data["text"]), truncation=True, max_length=max_length)
    return [{"input_ids": ids, "label": int(y)} for ids, y in zip(enc["input_ids"], data["label"])]


def _prompt_text(tokenizer, prompt: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return f"Question: {prompt}\nAnswer: "


def encode_instruction(tokenizer, data: datasets.Dataset, max_length: int) -> list[dict[str, list[int]]]:
    """Token ids and labels; labels are ``-100`` on the prompt, so loss covers the response only."""
    rows = []
    for prompt, response in zip(data["prompt"], data["response"]):
        p = tokenizer(_prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        p = p[: max_length - 1]  # keep at least one response token
        ids = (p + r)[:max_length]
        labels = ([IGNORE] * len(p) + r)[:max_length]
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def collate(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row; attention mask 0 on padding, labels -100 there."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, : len(r["input_ids"])] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if "label" in rows[0]:
        batch["labels"] = torch.tensor([r["label"] for r in rows], dtype=torch.long)
    else:
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for i, r in enumerate(rows):
            labels[i, : len(r["labels"])] = torch.tensor(r["labels"])
        batch["labels"] = labels
    return batch


def endless_batches(num_rows: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Row indices of successive batches: shuffled epochs without end (short last batch kept)."""
    if num_rows < 1:
        raise ValueError("cannot sample batches from an empty partition")
    while True:
        order = torch.randperm(num_rows, generator=generator).tolist()
        for start in range(0, num_rows, batch_size):
            yield order[start : start + batch_size]


def ordered_batches(num_rows: int, batch_size: int) -> Iterator[list[int]]:
    """Row indices in order, for evaluation."""
    for start in range(0, num_rows, batch_size):
        yield list(range(start, min(start + batch_size, num_rows)))

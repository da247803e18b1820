"""The test split: evaluated once, after the last round, example by example, so that runs can be paired.

With ``dataset.test-fraction`` > 0 the dataset keeps a test split drawn with
``dataset.split-seed`` — the same examples for every run seed and strategy — that no client
trains on and no round evaluates (rounds evaluate the validation split, ``eval_*``, which is
what learning rates are chosen on). After the last round the server scores the final global
model on it once (unless ``dataset.score-test`` is false, as in lr-sweep cells) and writes
``test_predictions.npz`` into the run directory:

* ``correct`` (float32, n): 1/0 per example (classification; the mean over models for a
  baseline that keeps several, e.g. local-only); zeros for instruction tasks;
* ``loss`` (float64, n): the example's loss numerator — cross-entropy (classification) or the
  summed token NLL of its response (instruction); ``tokens`` (int32, n): its denominator —
  1, or the number of response tokens — so a split's loss is Σ loss / Σ tokens;
* ``label`` and ``prediction`` (int32, n; −1 where they do not apply);
* ``fingerprint``: :func:`split_fingerprint` of the test split, so pairing is checked, not assumed;
* ``majority_label``: the most frequent training label of the run (−1 for instruction tasks),
  the majority-class baseline's prediction.

The summary gets ``test_accuracy`` (or ``test_perplexity``), ``test_loss``, ``test_examples``
and ``test_fingerprint``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from fedlora.config import RunConfig
from fedlora.data.tokenize import collate
from fedlora.device import autocast, autocast_dtype
from fedlora.losses import classification_loss_per_example, token_nll
from fedlora.server.rundir import TEST_FILE
from fedlora.server.strategy import ServerStrategy
from fedlora.task import Task, load_task

EVAL_BATCH = 64


@dataclass(frozen=True)
class ExampleOutputs:
    """One model's per-example results on a split, in the split's order (see the module docstring)."""

    correct: np.ndarray
    loss: np.ndarray
    tokens: np.ndarray
    label: np.ndarray
    prediction: np.ndarray


@torch.no_grad()
def per_example_outputs(model: torch.nn.Module, rows: list[dict], task: str, pad_id: int, device: torch.device,
                        amp_dtype: torch.dtype | None = None, batch_size: int = EVAL_BATCH) -> ExampleOutputs:
    """Score ``model`` on every row; rows are batched in order of length (less padding), results in row order."""
    was_training = model.training
    model.eval()
    n = len(rows)
    loss, tokens = np.zeros(n, np.float64), np.ones(n, np.int32)
    label, prediction = np.full(n, -1, np.int32), np.full(n, -1, np.int32)
    order = sorted(range(n), key=lambda i: len(rows[i]["input_ids"]))
    for start in range(0, n, batch_size):
        index = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate([rows[i] for i in index], pad_id).items()}
        labels = batch.pop("labels")
        with autocast(amp_dtype, device):
            logits = model(**batch).logits
        if task == "classification":
            loss[index] = classification_loss_per_example(logits, labels).double().cpu().numpy()
            label[index] = labels.cpu().numpy()
            prediction[index] = logits.argmax(-1).cpu().numpy()
        else:
            nll, mask = token_nll(logits, labels)
            loss[index] = (nll * mask).sum(dim=1).double().cpu().numpy()
            tokens[index] = mask.sum(dim=1).cpu().numpy()
    model.train(was_training)
    correct = ((prediction == label) & (label >= 0)).astype(np.float32)
    return ExampleOutputs(correct=correct, loss=loss, tokens=tokens, label=label, prediction=prediction)


def split_metrics(outputs: ExampleOutputs, task: str) -> dict[str, float]:
    """``test_loss`` (Σ loss / Σ tokens) and ``test_accuracy`` or ``test_perplexity``."""
    loss = float(outputs.loss.sum() / max(int(outputs.tokens.sum()), 1))
    if task == "classification":
        return {"test_loss": loss, "test_accuracy": float(outputs.correct.mean())}
    return {"test_loss": loss, "test_perplexity": math.exp(min(loss, 50.0))}


def split_fingerprint(split: datasets.Dataset, task: str) -> str:
    """First 16 hex digits of the SHA-256 of the split's examples in order (text and label, or prompt and response)."""
    columns = ("text", "label") if task == "classification" else ("prompt", "response")
    payload = json.dumps([list(split[c]) for c in columns], ensure_ascii=False).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def majority_label(task: Task) -> int:
    """The most frequent label of the training split (smallest id on a tie); −1 for instruction tasks."""
    if task.kind != "classification":
        return -1
    return int(np.bincount(np.asarray(task.data.train["label"]), minlength=task.num_labels).argmax())


def mean_outputs(outputs: Sequence[ExampleOutputs]) -> ExampleOutputs:
    """Several models' results on one split as one: ``correct`` and ``loss`` averaged per example.

    ``prediction`` is kept only for a single model (−1 otherwise)."""
    first = outputs[0]
    if len(outputs) == 1:
        return first
    return ExampleOutputs(correct=np.mean([o.correct for o in outputs], axis=0).astype(np.float32),
                          loss=np.mean([o.loss for o in outputs], axis=0), tokens=first.tokens, label=first.label,
                          prediction=np.full_like(first.prediction, -1))


def write_test_predictions(path: Path, outputs: ExampleOutputs, fingerprint: str, majority: int) -> None:
    """``test_predictions.npz`` (see the module docstring); compressed, no pickled objects."""
    np.savez_compressed(path, correct=outputs.correct, loss=outputs.loss, tokens=outputs.tokens, label=outputs.label,
                        prediction=outputs.prediction, fingerprint=np.array(fingerprint),
                        majority_label=np.array(majority, np.int32))


def outputs_on_test_split(cfg: RunConfig, model: torch.nn.Module, device: torch.device,
                 amp_dtype: torch.dtype | None) -> ExampleOutputs:
    """``model``'s per-example results on the run's test split."""
    task = load_task(cfg)
    rows = task.encode(task.data.test, cfg.dataset.max_length)
    return per_example_outputs(model, rows, task.kind, task.pad_id, device, amp_dtype)


def record_test_scores(cfg: RunConfig, outputs: Sequence[ExampleOutputs], run_dir: Path) -> dict[str, Any]:
    """Write the models' results (their mean, for several) as ``run_dir/test_predictions.npz``; return the
    summary's test keys."""
    task = load_task(cfg)
    merged = mean_outputs(outputs)
    fingerprint = split_fingerprint(task.data.test, task.kind)
    write_test_predictions(run_dir / TEST_FILE, merged, fingerprint, majority_label(task))
    return {**split_metrics(merged, task.kind), "test_examples": len(merged.loss), "test_fingerprint": fingerprint}


def scores_test_split(cfg: RunConfig) -> bool:
    """Whether the run scores a test split after its last round (``dataset.test-fraction`` > 0 and
    ``dataset.score-test``)."""
    return cfg.dataset.test_fraction > 0 and cfg.dataset.score_test


def score_final_model(cfg: RunConfig, strategy: ServerStrategy, model: torch.nn.Module, run_dir: Path,
                      device: torch.device) -> dict[str, Any]:
    """The server's hook after the last round: the final global model scored once on the test split and recorded;
    ``{}`` when the run scores no test split."""
    if not scores_test_split(cfg):
        return {}
    strategy.apply_to(model)
    scores = record_test_scores(cfg, [outputs_on_test_split(cfg, model, device, autocast_dtype(cfg.precision, device))], run_dir)
    shown = " ".join(f"{k}={v:.4f}" for k, v in scores.items() if isinstance(v, float))
    print(f"[fedlora] test split ({scores['test_examples']} examples, scored once): {shown}", flush=True)
    return scores

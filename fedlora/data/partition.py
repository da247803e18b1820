"""Split a train set among clients: ``iid``, ``dirichlet`` label skew, or ``natural`` by a column.

All three are deterministic under the seed. ``iid`` and ``dirichlet`` use flwr-datasets'
partitioners on the local ``datasets.Dataset``; ``natural`` assigns each distinct value of
a column (a topic, a user id) to one client, round-robin over the sorted values, so every
client holds whole groups — exactly one group each when there are as many clients as groups.
"""

from __future__ import annotations

import datasets

from fedlora.config import PartitionConfig


def natural_groups(values: list[str], num_partitions: int) -> list[list[int]]:
    """Row indices per partition: distinct ``values`` (sorted) dealt round-robin to partitions."""
    distinct = sorted(set(values))
    if num_partitions > len(distinct):
        raise ValueError(
            f"partition.kind='natural' needs at most {len(distinct)} clients (one per distinct value of "
            f"partition.column), got {num_partitions}"
        )
    owner = {value: i % num_partitions for i, value in enumerate(distinct)}
    parts: list[list[int]] = [[] for _ in range(num_partitions)]
    for row, value in enumerate(values):
        parts[owner[value]].append(row)
    return parts


def partition_indices(train: datasets.Dataset, cfg: PartitionConfig, num_partitions: int, seed: int) -> list[list[int]]:
    """Row indices of every partition of ``train`` (a disjoint cover of all rows)."""
    if num_partitions < 1:
        raise ValueError(f"num-partitions must be >= 1, got {num_partitions}")
    if cfg.kind == "natural":
        if cfg.column not in train.column_names:
            raise ValueError(f"config key 'partition.column' = {cfg.column!r} is invalid: expected one of the dataset's "
                             f"columns {train.column_names}")
        return natural_groups([str(v) for v in train[cfg.column]], num_partitions)
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner  # ~2 s of imports: only when needed

    indexed = train.add_column("_row", list(range(len(train))))
    if cfg.kind == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
        indexed = indexed.shuffle(seed=seed)
    elif cfg.kind == "dirichlet":
        if "label" not in train.column_names:
            raise ValueError("partition.kind='dirichlet' skews labels and needs a classification dataset")
        min_size = max(1, min(10, len(train) // (4 * num_partitions)))
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions, partition_by="label", alpha=cfg.alpha,
            min_partition_size=min_size, self_balancing=False, seed=seed,
        )
    else:
        raise ValueError(f"partition.kind={cfg.kind!r} is not one of 'iid', 'dirichlet', 'natural'")
    partitioner.dataset = indexed
    return [sorted(partitioner.load_partition(i)["_row"]) for i in range(num_partitions)]


def check_partition_id(partition_id: int, num_partitions: int) -> None:
    """A partition id must name one of the ``num_partitions`` partitions."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id must be in [0, {num_partitions}), got {partition_id}")

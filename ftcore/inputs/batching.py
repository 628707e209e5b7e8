"""The input pipeline's third stage, its rules: how token rows become batches (RunConfig.batching):
which records go together (packed into rows or not), in which order, padded to what width.
ftcore.inputs.batches builds the run's arrays with them.

- `padded`: every row padded to max_seq_len; batches walk seeded permutations of the records,
  epoch after epoch (an epoch's tail continues into the next batch);
- `longest`: mlx-lm's trainer (`mlx_lm.tuner.trainer.iterate_batches`, mlx-lm 0.32): records sorted
  by their whole length before truncation (a stable sort), cut into consecutive batches, the batch
  order a permutation drawn by numpy's legacy generator seeded with the run's seed, drawn again
  for every epoch; each batch padded to 1 + 32 * ceil(longest / 32), at most max_seq_len. With
  `--steps` the batches are mlx-lm's exactly: a remainder smaller than a batch is left out of every
  pass. With `--epochs` every record is trained once per epoch: the remainder is a short batch;
- `packed`: several records per row (torchtune's PackedDataset, HF's DataCollatorWithFlattening):
  the records are packed once, first-fit-decreasing (longest record first, each into the first
  row with room, a new row when none has), into rows of at most max_seq_len tokens; the rows then
  take `longest`'s place (seeded batch order per epoch, the same remainder rule, the same padding
  rule). Inside a row every record attends only to itself (a per-document causal mask) and its
  positions restart at 0 (`position_ids`); its first token is never a target, so each record's
  loss terms are exactly those it has alone.

A short batch keeps the run's (batch, width) shape: its missing rows are copies of its own rows
with every label IGNORE_INDEX ("filler rows"). The loss is the mean over the batch's target tokens
and rows do not see each other, so filler rows change neither the loss nor any gradient; they are
computed (like padding) and are not counted as real tokens.
"""

from __future__ import annotations

import numpy as np

from ftcore.config import Batching, RunConfig
from ftcore.inputs.loss_contract import IGNORE_INDEX
from ftcore.inputs.token_rows import Tokenized

PAD_MULTIPLE = 32  # `longest` pads a batch to 1 + a multiple of this (mlx-lm's pad_to)


def batch_width(lengths: list[int], max_seq_len: int, batching: Batching) -> int:
    """The padded width of a batch whose rows have these lengths (see the module docstring)."""
    if batching == Batching.PADDED:
        return max_seq_len
    return min(1 + PAD_MULTIPLE * -(-max(lengths) // PAD_MULTIPLE), max_seq_len)


def longest_order(
    lengths: list[int], batch_size: int, steps: int, seed: int, whole_epochs: bool = False,
) -> list[list[int]]:
    """`steps` batches of record indices as mlx-lm's iterate_batches makes them (loop=True), sorted
    by `lengths` (each record's whole length, before truncation, as mlx-lm sorts). For `packed`,
    the "records" are the packed rows (their filled lengths). whole_epochs: the remainder is a
    short last batch instead of left out, so each pass holds every record once (--epochs)."""
    by_length = sorted(range(len(lengths)), key=lengths.__getitem__)
    stop = len(by_length) if whole_epochs else len(by_length) - batch_size + 1
    batches = [by_length[i : i + batch_size] for i in range(0, stop, batch_size)]
    rng = np.random.RandomState(seed)  # what np.random.seed(seed) + np.random.permutation draw
    order: list[list[int]] = []
    while len(order) < steps:
        order += [batches[i] for i in rng.permutation(len(batches))]
    return order[:steps]


def padded_order(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """`steps` batches of record indices: seeded permutations of the n records, epoch after
    epoch, cut into batches (an epoch's tail continues into the next batch)."""
    rng = np.random.default_rng(seed + 1)
    need = steps * batch_size
    flat = np.concatenate([rng.permutation(n) for _ in range(-(-need // n))])[:need].tolist()
    return [flat[i : i + batch_size] for i in range(0, need, batch_size)]


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing: record indices per row, each row's lengths summing to <= capacity.
    Records are taken longest first (ties by index) and each goes into the first row with room."""
    free = np.zeros(0, dtype=np.int64)  # (rows,) room left in each row so far
    rows: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = np.flatnonzero(free >= lengths[i])
        if fits.size:
            r = int(fits[0])
        else:
            r, free = len(rows), np.append(free, capacity)
            rows.append([])
        rows[r].append(i)
        free[r] -= lengths[i]
    return rows


def steps_per_epoch(n: int, batch_size: int, batching: Batching) -> float:
    """Steps one whole pass over n units (records; packed rows for `packed`) takes: `longest` and
    `packed` end a pass with a short batch (ceil(n / batch)), `padded` runs on into the next epoch
    (n / batch, a fraction)."""
    return n / batch_size if batching == Batching.PADDED else -(-n // batch_size)


def epoch_widths(lengths: list[int], sort_keys: list[int], cfg: RunConfig) -> dict[str, float]:
    """One whole pass over the units as {width: steps at that width} (keys as strings, for JSON):
    what a step costs depends on its width, so the epoch projection (ftcore.measure.projection)
    prices each width apart. `padded`: n / batch steps at max_seq_len; `longest`, `packed`: the
    units sorted by `sort_keys` and cut into batches, the last one short (the --epochs pass:
    longest_order with whole_epochs), each at its own width (from `lengths`, the truncated
    units)."""
    if cfg.batching == Batching.PADDED:
        return {str(cfg.max_seq_len): steps_per_epoch(len(lengths), cfg.step_rows, cfg.batching)}
    by_key = sorted(range(len(lengths)), key=sort_keys.__getitem__)
    out: dict[int, float] = {}
    for i in range(0, len(by_key), cfg.step_rows):
        rows = by_key[i : i + cfg.step_rows]
        w = batch_width([lengths[j] for j in rows], cfg.max_seq_len, cfg.batching)
        out[w] = out.get(w, 0) + 1
    return {str(w): n for w, n in sorted(out.items())}


def filled(rows: list[int], batch_size: int) -> tuple[list[int], int]:
    """A batch's record indices made up to batch_size by repeating its own rows, and how many rows
    are real (the rest are filler rows: the module docstring)."""
    return rows + [rows[k % len(rows)] for k in range(batch_size - len(rows))], len(rows)


def epoch_steps(epochs: int, n: int, batch_size: int, batching: Batching) -> int:
    """Steps that `epochs` whole passes over n units take (--epochs); in integers, exact for any
    `epochs` (a float product overflows above ~1e308)."""
    if batching == Batching.PADDED:
        return max(1, -(-epochs * n // batch_size))  # ceil(epochs * n / batch_size)
    return max(1, epochs * -(-n // batch_size))  # every pass ends with its short batch


def pack_tokenized(tok: Tokenized, capacity: int) -> Tokenized:
    """Token rows -> packed rows (pack_rows): ids and labels concatenated, each
    record's first label IGNORE_INDEX (the previous record's last token must not predict it; alone,
    position 0 is never a target either), positions restarting at 0 for each record."""
    rows = pack_rows([len(ids) for ids in tok.ids], capacity)
    ids = [[t for i in row for t in tok.ids[i]] for row in rows]
    labels = [
        [IGNORE_INDEX if k == 0 else y for i in row for k, y in enumerate(tok.labels[i])]
        for row in rows
    ]
    positions = [[k for i in row for k in range(len(tok.ids[i]))] for row in rows]
    return Tokenized(ids, labels, tok.dropped, positions=positions)


def pad_rows(tok: Tokenized, rows: list[int], width: int, pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded (len(rows), width) int64 arrays for the given example indices; packed rows
    also get `position_ids` (0 on padding)."""
    n = len(rows)
    input_ids = np.full((n, width), pad_id, dtype=np.int64)
    labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    positions = np.zeros((n, width), dtype=np.int64)
    for r, i in enumerate(rows):
        k = len(tok.ids[i])
        input_ids[r, :k] = tok.ids[i]
        labels[r, :k] = tok.labels[i]
        mask[r, :k] = 1
        if tok.positions is not None:
            positions[r, :k] = tok.positions[i]
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
    if tok.positions is not None:
        out["position_ids"] = positions
    return out

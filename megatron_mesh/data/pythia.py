"""Pythia's pre-shuffled Pile, read in order: row i of the merged file is training sample i.

Every row holds 2049 tokens (2048 inputs + the label of the last one). Nothing is shuffled:
Megatron's sequential sampler asks for sample ``consumed + k``, so a resume at iteration k
opens exactly its rows (random access through the memory-mapped index, nothing earlier read).

For ``seq_length = 2048 * r`` a sample is r consecutive rows: sample n = rows r*n .. r*n+r-1.
With seq 4096 and global batch 512, step s, sequence j = rows 1024s+2j and 1024s+2j+1, exactly
one Pythia batch per step. Row boundaries (``boundary``):

- ``per_row`` (default): inputs are each row's first 2048 tokens, labels each row's last 2048
  (as the row would train at seq 2048); no label crosses rows, positions run 0..L-1 and later
  rows attend to earlier ones.
- ``contiguous``: the rows are one stream; inputs = stream[:L], labels = stream[1:L+1], so the
  label at the end of a row is the next row's first token (unrelated text).
- ``contiguous_masked``: as ``contiguous`` with those cross-row labels masked out of the loss.
"""

from __future__ import annotations

from typing import Dict

import numpy
import torch

from megatron_mesh.errors import ConfigError

ROW_TOKENS = 2049
BOUNDARIES = ("per_row", "contiguous", "contiguous_masked")


class PythiaPreshuffledDataset(torch.utils.data.Dataset):
    def __init__(self, prefix: str, seq_length: int, boundary: str = "per_row", *,
                 eod_id: int = 0, mask_eod_loss: bool = False, vocab_size: int = None):
        from megatron_mesh.data.integrity import (DatasetIntegrityError, check_token_range,
                                                  open_indexed_dataset)

        if seq_length % (ROW_TOKENS - 1):
            raise ConfigError(f"seq_length={seq_length}: the Pythia reader needs a multiple of 2048")
        if boundary not in BOUNDARIES:
            raise ConfigError(f"pythia boundary={boundary!r}: expected one of {list(BOUNDARIES)}")
        self.rows = open_indexed_dataset(prefix)
        lengths = self.rows.index.sequence_lengths
        bad = numpy.flatnonzero(lengths != ROW_TOKENS)
        if len(bad):
            raise DatasetIntegrityError(
                f"{prefix}: row {bad[0]} has {lengths[bad[0]]} tokens; pre-shuffled Pythia rows "
                f"hold {ROW_TOKENS} ({len(bad)} rows differ)")
        if vocab_size is not None:
            check_token_range(self.rows, prefix, vocab_size)
        self.prefix, self.seq_length, self.boundary = prefix, seq_length, boundary
        self.rows_per_sample = seq_length // (ROW_TOKENS - 1)
        self.eod_id, self.mask_eod_loss = eod_id, mask_eod_loss

    def __len__(self) -> int:
        return len(self.rows) // self.rows_per_sample

    def row_numbers(self, sample: int):
        return range(sample * self.rows_per_sample, (sample + 1) * self.rows_per_sample)

    def __getitem__(self, sample: int) -> Dict[str, torch.Tensor]:
        rows = [numpy.asarray(self.rows[r], dtype=numpy.int64) for r in self.row_numbers(sample)]
        L = self.seq_length
        loss_mask = numpy.ones(L, dtype=numpy.float32)
        if self.boundary == "per_row":
            tokens = numpy.concatenate([row[:-1] for row in rows])
            labels = numpy.concatenate([row[1:] for row in rows])
        else:
            stream = numpy.concatenate(rows)
            tokens, labels = stream[:L], stream[1 : L + 1]
            if self.boundary == "contiguous_masked":
                loss_mask[ROW_TOKENS - 1 :: ROW_TOKENS] = 0.0  # input = a row's last token
        if self.mask_eod_loss:
            loss_mask[tokens == self.eod_id] = 0.0  # as Megatron's eod_mask_loss
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.arange(L, dtype=torch.int64),
        }

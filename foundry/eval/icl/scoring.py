"""Batched scoring over any causal LM given as a callable `input_ids [B, S] -> logits [B, S, V]`.

Rows are right-padded: in a causal model a token never sees the positions after it, so padding changes
no score and needs no attention mask (one interface for every model family, sharded or not). Each batch
is split into the forward passes it needs (`inputs()` / `read(logits)`), so that callers decide how
forwards are run (one process, or ranks in lockstep: foundry/eval/icl/evaluator.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from foundry.eval.icl.items import RowScore

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def _right_padded(seqs: Sequence[Sequence[int]], pad_id: int, multiple: int = 1) -> torch.Tensor:
    width = -(-max(len(s) for s in seqs) // multiple) * multiple  # fewer shapes for a compiled model
    out = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


class LoglikelihoodBatch:
    """(context, continuation) rows scored in one forward: each continuation token's log-probability given
    everything before it (log_softmax in fp32), summed, and whether each is the argmax."""

    def __init__(
        self, rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int = 0, pad_multiple: int = 1
    ):
        if not rows:
            raise ValueError("an empty batch")
        self.rows = rows
        self.pad_id = pad_id
        self.pad_multiple = pad_multiple

    def inputs(self) -> torch.Tensor:
        # The last continuation token is only a target, never an input.
        return _right_padded([list(c) + list(t)[:-1] for c, t in self.rows], self.pad_id, self.pad_multiple)

    def read(self, logits: torch.Tensor) -> list[RowScore]:
        row_idx, pos_idx, targets, owner = [], [], [], []
        for i, (context, continuation) in enumerate(self.rows):
            start = len(context) - 1  # the position whose logits predict the first continuation token
            n = len(continuation)
            row_idx += [i] * n
            pos_idx += range(start, start + n)
            targets += continuation
            owner += [i] * n
        device = logits.device
        picked = logits[torch.tensor(row_idx, device=device), torch.tensor(pos_idx, device=device)].float()
        targets_t = torch.tensor(targets, device=device)
        logprobs = torch.log_softmax(picked, dim=-1).gather(1, targets_t[:, None])[:, 0]
        hits = (picked.argmax(dim=-1) == targets_t).double()
        owner_t = torch.tensor(owner, device=device)
        n_rows = len(self.rows)
        sums = torch.zeros(n_rows, dtype=torch.float64, device=device).index_add_(
            0, owner_t, logprobs.double()
        )
        hit_counts = torch.zeros(n_rows, dtype=torch.float64, device=device).index_add_(0, owner_t, hits)
        sums, hit_counts = sums.tolist(), hit_counts.tolist()
        return [
            RowScore(sums[i], len(cont), int(hit_counts[i]) == len(cont))
            for i, (_, cont) in enumerate(self.rows)
        ]


class GenerationBatch:
    """Greedy completion of several prompts, one forward per new token. A row stops at EOS, at
    `max_new_tokens`, or once its decoded text holds a stop string; finished rows leave the batch."""

    def __init__(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        eos_id: int | None,
        decode: Callable[[list[int]], str],
        stop_strings: Sequence[str] = (),
        pad_id: int = 0,
        pad_multiple: int = 1,
    ):
        self.prompts = [list(p) for p in prompts]
        self.generated: list[list[int]] = [[] for _ in prompts]
        self.active = list(range(len(prompts))) if max_new_tokens > 0 else []
        self.max_new_tokens = max_new_tokens
        self.eos_id = eos_id
        self.decode = decode
        self.stop_strings = [s for s in stop_strings if s]
        self.pad_id = pad_id
        self.pad_multiple = pad_multiple

    def inputs(self) -> torch.Tensor | None:
        if not self.active:
            return None
        seqs = [self.prompts[i] + self.generated[i] for i in self.active]
        return _right_padded(seqs, self.pad_id, self.pad_multiple)

    def read(self, logits: torch.Tensor) -> None:
        last = torch.tensor([len(self.prompts[i]) + len(self.generated[i]) - 1 for i in self.active])
        rows = torch.arange(len(self.active))
        tokens = logits[rows.to(logits.device), last.to(logits.device)].argmax(dim=-1).tolist()
        still = []
        for i, token in zip(self.active, tokens, strict=True):
            if token == self.eos_id:
                continue  # EOS ends the text and is not part of it
            self.generated[i].append(token)
            if len(self.generated[i]) >= self.max_new_tokens:
                continue
            if self.stop_strings and any(s in self.decode(self.generated[i]) for s in self.stop_strings):
                continue
            still.append(i)
        self.active = still

    def texts(self) -> list[str]:
        return [self.decode(g) for g in self.generated]


def run_one_process(batch, forward: LogitsFn, device: torch.device | str = "cpu"):
    """Drive a batch to the end in this process (no other ranks): its scores, or its completions."""
    with torch.no_grad():
        if isinstance(batch, LoglikelihoodBatch):
            return batch.read(forward(batch.inputs().to(device)))
        while (x := batch.inputs()) is not None:
            batch.read(forward(x.to(device)))
        return batch.texts()

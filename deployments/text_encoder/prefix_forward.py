"""CLIP text-transformer forward that starts after a cached prefix.

CLIP's text encoder is causal with absolute positions, so the keys/values and outputs of
positions [0, start) depend only on those tokens: with them cached, only [start, 77) has
to run, each layer's queries attending to cached + new keys. This module is that
forward, written with the very operations of transformers' `CLIPTextModel` (same
projections, same `scaled_dot_product_attention` over all 77 key positions with the
causal mask), so that a row computed from a cached prefix is bit-identical to the same
row computed from scratch, and to `CLIPTextModel` itself (tests check both, on SD-1.5's shape
for every prefix length). Two kernel choices that depend on row counts are matched: see
MIN_GEMM_ROWS and ATTENTION_QUERY_BLOCK.

Rows in one batch may start at different positions: the projections and MLPs run on
all new rows of the batch at once; attention runs once per group of rows that share a
start.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class CachedPrefix:
    """What is known about positions [0, start) of one row, as consecutive pieces (cache
    blocks), copied straight into the forward's buffers."""

    kv: list[torch.Tensor]  # each [layers, 2, heads, piece, head_dim]: every layer's keys and values
    hidden: list[torch.Tensor]  # each [piece, hidden]: final hidden states (after the final layer norm)

    @property
    def start(self) -> int:
        return sum(piece.shape[0] for piece in self.hidden)


@dataclass
class ForwardResult:
    hidden: torch.Tensor  # [batch, 77, hidden]: the whole window, cached rows included
    kv: list[torch.Tensor]  # per row: [layers, 2, heads, 77, head_dim], a view valid until the next call


# MKL multiplies a matrix of very few rows (here: under 12 that are not a multiple of 4, with 2
# threads) with other kernels than a tall one, and rounds differently (up to ~1e-6 on SD-1.5's
# encoder): a prefix hit leaving a few new positions was then not bit-identical to the full
# forward. Every projection and MLP runs on at least this many rows, zero rows added.
MIN_GEMM_ROWS = 16
# PyTorch's CPU flash attention takes queries 32 at a time below 192 of them (q_split_size).
ATTENTION_QUERY_BLOCK = 32


class PrefixReuseForward:
    def __init__(self, model):
        """`model`: a transformers `CLIPTextModel` (in eval mode)."""
        self.model = model
        config = model.config
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.hidden_size = config.hidden_size
        self.head_dim = self.hidden_size // self.num_heads
        self.window = config.max_position_embeddings
        self.dtype = model.final_layer_norm.weight.dtype
        # Additive causal mask; query rows [start, 77) take rows [start, 77) of it.
        self.mask = torch.full((self.window, self.window), float("-inf"), dtype=self.dtype).triu(1)
        # K/V of every row of a batch, kept between calls: a fresh tens-of-MiB buffer per
        # call costs its page faults every time (measured ~15 ms per SD-1.5 batch of 8).
        self._workspace = torch.empty(0)

    def kv_bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.hidden_size * torch.finfo(self.dtype).bits // 8

    @torch.inference_mode()
    def __call__(self, token_ids: torch.Tensor, prefixes: list[CachedPrefix | None]) -> ForwardResult:
        batch, window = token_ids.shape
        if window != self.window or len(prefixes) != batch:
            raise ValueError(f"expected [batch, {self.window}] token ids and one prefix entry per row")
        starts = [p.start if p is not None else 0 for p in prefixes]
        if any(s >= window for s in starts):
            raise ValueError("a cached prefix must leave at least one position to compute")

        # Group rows by start; each group's new rows are contiguous in the flat [rows, hidden] layout.
        groups: dict[int, list[int]] = {}
        for row, start in enumerate(starts):
            groups.setdefault(start, []).append(row)
        plan = []  # (start, rows, first flat row, last flat row, kv buffer)
        embedded = []
        offset = 0
        embeddings = self.model.embeddings
        workspace = self._workspace_for(batch)
        taken = 0
        for start, rows in groups.items():
            new = window - start
            positions = torch.arange(start, window).unsqueeze(0)
            embedded.append(
                embeddings(input_ids=token_ids[rows, start:], position_ids=positions).reshape(-1, self.hidden_size)
            )
            kv = workspace[:, :, taken : taken + len(rows)]  # each [layer, 0|1] slice is contiguous
            taken += len(rows)
            for i, row in enumerate(rows):
                prefix, position = prefixes[row], 0
                for piece in prefix.kv if prefix is not None else ():
                    kv[:, :, i, :, position : position + piece.shape[3]] = piece
                    position += piece.shape[3]
            plan.append((start, rows, offset, offset + len(rows) * new, kv))
            offset += len(rows) * new
        hidden = embedded[0] if len(embedded) == 1 else torch.cat(embedded)
        if offset < MIN_GEMM_ROWS:  # zero rows, never read back: see MIN_GEMM_ROWS
            hidden = torch.cat([hidden, hidden.new_zeros(MIN_GEMM_ROWS - offset, self.hidden_size)])

        for layer_index, layer in enumerate(self.model.encoder.layers):
            hidden = self._layer(layer, layer_index, hidden, plan)
        hidden = self.model.final_layer_norm(hidden)

        out = torch.empty(batch, window, self.hidden_size, dtype=self.dtype)
        kv_rows: list[torch.Tensor] = [None] * batch  # type: ignore[list-item]
        for start, rows, first, last, kv in plan:
            out[rows, start:] = hidden[first:last].view(len(rows), window - start, self.hidden_size)
            for i, row in enumerate(rows):
                prefix, position = prefixes[row], 0
                for piece in prefix.hidden if prefix is not None else ():
                    out[row, position : position + piece.shape[0]] = piece
                    position += piece.shape[0]
                kv_rows[row] = kv[:, :, i]
        return ForwardResult(out, kv_rows)

    def _workspace_for(self, batch: int) -> torch.Tensor:
        if self._workspace.dim() < 3 or self._workspace.shape[2] < batch:
            self._workspace = torch.empty(
                self.num_layers, 2, batch, self.num_heads, self.window, self.head_dim, dtype=self.dtype
            )
        return self._workspace

    def _layer(self, layer, layer_index: int, hidden: torch.Tensor, plan) -> torch.Tensor:
        attention = layer.self_attn
        residual = hidden
        x = layer.layer_norm1(hidden)
        queries, keys, values = attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)
        outputs = []
        for start, rows, first, last, kv in plan:
            shape = (len(rows), self.window - start, self.num_heads, self.head_dim)
            # CPU attention cuts the queries into blocks of ATTENTION_QUERY_BLOCK rows from the
            # first one and rounds a block by its row count: the queries start at the block
            # boundary below `start` (zeros before it, outputs dropped) so that every new row
            # sits in the same block as in a full forward.
            aligned = start - start % ATTENTION_QUERY_BLOCK
            q = queries.new_zeros(len(rows), self.num_heads, self.window - aligned, self.head_dim)
            q[:, :, start - aligned :] = queries[first:last].view(shape).transpose(1, 2)
            kv[layer_index, 0, :, :, start:] = keys[first:last].view(shape).transpose(1, 2)
            kv[layer_index, 1, :, :, start:] = values[first:last].view(shape).transpose(1, 2)
            attended = F.scaled_dot_product_attention(
                q, kv[layer_index, 0], kv[layer_index, 1], attn_mask=self.mask[aligned:], scale=attention.scale
            )[:, :, start - aligned :]
            outputs.append(attended.transpose(1, 2).reshape(-1, self.hidden_size))
        attended = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        if attended.shape[0] < hidden.shape[0]:  # the padding rows (MIN_GEMM_ROWS)
            attended = torch.cat([attended, attended.new_zeros(hidden.shape[0] - attended.shape[0], self.hidden_size)])
        hidden = residual + attention.out_proj(attended)
        return hidden + layer.mlp(layer.layer_norm2(hidden))

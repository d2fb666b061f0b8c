"""An exact, cheaper text path for training a CLIP on a small vocabulary (the scene world's few dozen words).

open_clip's ``CLIP.encode_text`` embeds every caption padded to the full context and trains the whole
``[49408, width]`` token table: each step builds a dense gradient for all its rows and AdamW updates all of them.
Two facts make a cheaper path give the same numbers:

- Rows of tokens that never occur get a zero gradient, and the token table has no weight decay (it sits in the
  no-decay group), so AdamW leaves them exactly as they are. Training only the rows that occur, in a compact table
  that grows as new tokens appear, and writing them back afterwards gives the same table. A row first seen at step
  t starts with zero Adam moments in both cases, and the bias correction uses the shared step count.
- The text tower is causal and pools the end-of-text token: what comes after it (padding) never reaches the
  pooled feature, so the batch can be cut to its longest caption.
"""

from __future__ import annotations

import torch
from open_clip.transformer import text_global_pool
from torch import nn


class CompactTextTower(nn.Module):
    """Text features of a ``open_clip.CLIP`` with a compact, growing token table; ``write_back()`` copies the
    trained rows into the model's table.

    ``capacity``: rows the compact table holds (distinct token ids over the whole training run).
    """

    def __init__(self, model: nn.Module, capacity: int = 2048):
        super().__init__()
        full = model.token_embedding
        self.model = model
        self.table = nn.Embedding(capacity, full.embedding_dim)
        self.table.weight.data.zero_()
        self.register_buffer("slot_of", torch.full((full.num_embeddings,), -1, dtype=torch.long), persistent=False)
        self.register_buffer("token_of", torch.full((capacity,), -1, dtype=torch.long), persistent=False)
        self.used = 0

    @torch.no_grad()
    def _slots(self, ids: torch.Tensor) -> torch.Tensor:
        """Compact slots of token ids ``[B, L]``, giving new ids the next free rows (copied from the model)."""
        new = torch.unique(ids[self.slot_of[ids] < 0])
        if len(new):
            if self.used + len(new) > len(self.token_of):
                raise RuntimeError(f"compact token table is full ({len(self.token_of)} rows); raise its capacity")
            rows = torch.arange(self.used, self.used + len(new))
            self.slot_of[new] = rows
            self.token_of[rows] = new
            self.table.weight[rows] = self.model.token_embedding.weight[new]
            self.used += len(new)
        return self.slot_of[ids]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Text features ``[B, E]`` of token ids ``[B, C]`` (padded with 0), equal to ``model.encode_text(ids)``."""
        m = self.model
        length = int((ids != 0).sum(dim=1).max())
        ids = ids[:, :length]
        x = self.table(self._slots(ids)) + m.positional_embedding[:length]
        x = m.transformer(x, attn_mask=m.attn_mask[:length, :length])
        x = m.ln_final(x)
        x = text_global_pool(x, ids, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        if isinstance(m.text_projection, nn.Linear):
            return m.text_projection(x)
        return x @ m.text_projection

    def parameters_to_train(self) -> list[nn.Parameter]:
        """The model's parameters with its full token table swapped for the compact one."""
        full = self.model.token_embedding.weight
        return [p for p in self.model.parameters() if p is not full] + [self.table.weight]

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy the trained rows into ``model.token_embedding``."""
        rows = torch.arange(self.used)
        self.model.token_embedding.weight[self.token_of[rows]] = self.table.weight[rows]

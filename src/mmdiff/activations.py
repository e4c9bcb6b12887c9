"""The unit of data between capture, the activation store, SAE training and statistics."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ActivationBatch:
    """Residual-stream activations of one padded batch, for several hook points at once.

    acts[L] is the residual stream after decoder layer L (HF hidden_states[L + 1]).
    Positions with attention_mask == 0 are padding and carry TokenType.SPECIAL.
    """

    acts: dict[int, torch.Tensor]  # layer -> [batch, seq, d_model]
    token_types: torch.Tensor  # [batch, seq] int8, values of mmdiff.models.base.TokenType
    attention_mask: torch.Tensor  # [batch, seq] bool/int
    record_ids: list[str]  # [batch]
    input_ids: torch.Tensor | None = None  # [batch, seq]
    meta: dict = field(default_factory=dict)

    def flat(self, layer: int, token_types: tuple[int, ...] | None = None) -> torch.Tensor:
        """[n_tokens, d_model] activations of non-padding tokens, optionally of some token types."""
        keep = self.attention_mask.bool()
        if token_types is not None:
            wanted = torch.tensor(token_types, dtype=self.token_types.dtype, device=self.token_types.device)
            keep = keep & torch.isin(self.token_types, wanted)
        return self.acts[layer][keep]

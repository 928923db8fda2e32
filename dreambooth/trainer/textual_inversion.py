"""Textual inversion before DreamBooth (the seed's epilogue).

Phase 1 learns only the embedding of a new token (``placeholderToken``, e.g. ``<zwx>``),
starting from an existing one (``initializerToken``); the UNet and every other embedding
stay as they are. Phase 2 is ordinary DreamBooth at the configured (low) learning rate,
with the new token in the prompt. The exported tokenizer and text encoder carry the token.
"""

from __future__ import annotations

import torch

from dreambooth.api.spec import DreamBoothJobSpec
from dreambooth.trainer.errors import ConfigError

PHASE = "textual_inversion"


class TokenEmbedding:
    """The new token's row of the input embeddings; checkpointed in every phase. A restored
    row goes to the text encoder and to every copy of it that trains (see :meth:`follow`)."""

    def __init__(self, text_encoder, token_id: int) -> None:
        self.weight = text_encoder.get_input_embeddings().weight
        self.token_id = token_id
        self.frozen = self.weight.detach().clone()
        self.copies: list[torch.Tensor] = []

    def follow(self, text_encoder) -> None:
        """``text_encoder`` is a (cast) copy of the original that phase 2 reads."""
        self.copies.append(text_encoder.get_input_embeddings().weight)

    def state_dict(self) -> dict:
        return {"token_id": self.token_id, "embedding": self.weight[self.token_id].detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        if state["token_id"] != self.token_id:
            raise ConfigError(
                f"the checkpoint's placeholder token has id {state['token_id']}, this run's "
                f"{self.token_id}: the base model changed; delete the job's checkpoints/ to start over"
            )
        with torch.no_grad():
            for weight in (self.weight, *self.copies):
                weight[self.token_id] = state["embedding"].to(weight.device, weight.dtype)

    def keep_others(self) -> None:
        """Undo the optimizer's changes (e.g. weight decay) to every row but the new one."""
        with torch.no_grad():
            keep = torch.ones(self.weight.shape[0], dtype=torch.bool, device=self.weight.device)
            keep[self.token_id] = False
            self.weight[keep] = self.frozen[keep].to(self.weight.device)


def add_token(spec: DreamBoothJobSpec, components) -> TokenEmbedding | None:
    """Add the placeholder token, initialised from the initializer token; None without TI."""
    ti = spec.training.textual_inversion
    if ti is None:
        return None
    if len(components.text_encoders) != 1:
        raise ConfigError(
            f"training.textualInversion is not supported for {components.family.title} models "
            "(it learns one text encoder's token): drop it, or train with "
            "training.trainTextEncoder instead"
        )
    [tokenizer], [text_encoder] = components.tokenizers, components.text_encoders
    init_ids = tokenizer.encode(ti.initializer_token, add_special_tokens=False)
    if len(init_ids) != 1:
        raise ConfigError(
            f"training.textualInversion.initializerToken {ti.initializer_token!r} is {len(init_ids)} "
            "tokens for this model's tokenizer: pick a single common word (e.g. 'cat', 'person')"
        )
    if tokenizer.add_tokens([ti.placeholder_token]) != 1:
        raise ConfigError(
            f"training.textualInversion.placeholderToken {ti.placeholder_token!r} is already in the "
            "tokenizer's vocabulary: pick a new string, e.g. '<zwx>'"
        )
    token_id = tokenizer.convert_tokens_to_ids(ti.placeholder_token)
    text_encoder.resize_token_embeddings(len(tokenizer))
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[token_id] = weight[init_ids[0]]
    return TokenEmbedding(text_encoder, token_id)


def train_only_the_embedding(text_encoder, token: TokenEmbedding, *, device) -> list[torch.Tensor]:
    """Freeze everything but the input embeddings (others are restored after each step);
    the text encoder stays in float32 (its embedding trains)."""
    from dreambooth.trainer.trainables import place

    place(text_encoder.requires_grad_(False), device, torch.float32).train()
    token.weight.requires_grad_(True)
    token.frozen = token.frozen.to(device)
    return [token.weight]

"""``lora:`` in a run YAML: parameter-efficient finetuning (LoRA, and QLoRA with ``quantize_base: nf4``).

Which module names a family accepts is part of the family's config dataclass (``lora_targets`` and
``lora_savable`` on foundry/config/model.py's classes), so a misspelled name fails here, before any
model is built, with the valid ones listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from foundry.config.checks import positive
from foundry.errors import ConfigError

QUANTIZE = (None, "nf4")


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / r (PEFT's lora_alpha)
    dropout: float = 0.0  # on the adapter's input only (PEFT's lora_dropout)
    # Leaf names of the Linear layers that get adapters (MPT: Wqkv, out_proj, up_proj, down_proj).
    target_modules: list[str] = field(default_factory=list)
    # Leaf names of whole modules trained and saved in full beside the adapters (e.g. norm_f).
    modules_to_save: list[str] = field(default_factory=list)
    # null: the frozen base stays in the run's compute dtype; nf4: 4-bit NormalFloat (QLoRA, torchao).
    quantize_base: str | None = None
    # Train the embedding rows of the special tokens the SFT data's tokenizer added (ChatML's
    # <|im_start|>, ...): only those rows, as PEFT's trainable_token_indices does.
    train_new_tokens: bool = True
    trainable_token_ids: list[int] = field(default_factory=list)  # more rows to train, by token id

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def validate(self, path: str, model_cfg) -> None:
        positive(self.r, f"{path}.r")
        positive(self.alpha, f"{path}.alpha")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"must be in [0, 1), got {self.dropout}", f"{path}.dropout")
        targets = tuple(getattr(model_cfg, "lora_targets", ()))
        savable = tuple(getattr(model_cfg, "lora_savable", ()))
        if not self.target_modules:
            raise ConfigError(
                f"name the layers to adapt, e.g. target_modules: [{', '.join(targets)}]",
                f"{path}.target_modules",
            )
        for i, name in enumerate(self.target_modules):
            if name not in targets:
                raise ConfigError(
                    f"{name!r} is not a {model_cfg.name} layer LoRA can adapt; valid: {', '.join(targets)}",
                    f"{path}.target_modules[{i}]",
                )
        for i, name in enumerate(self.modules_to_save):
            if name not in savable:
                raise ConfigError(
                    f"{name!r} is not a {model_cfg.name} module that can be trained whole; valid: "
                    f"{', '.join(savable)} (new tokens' embedding rows train by themselves: train_new_tokens)",
                    f"{path}.modules_to_save[{i}]",
                )
            if name in self.target_modules:
                raise ConfigError(
                    f"{name!r} is both adapted and trained whole", f"{path}.modules_to_save[{i}]"
                )
        if self.quantize_base not in QUANTIZE:
            raise ConfigError(
                f"{self.quantize_base!r} is not one of: null (no quantization), nf4", f"{path}.quantize_base"
            )
        for i, token in enumerate(self.trainable_token_ids):
            if token < 0:
                raise ConfigError(f"a token id is >= 0, got {token}", f"{path}.trainable_token_ids[{i}]")

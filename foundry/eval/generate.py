"""Text from a trained model: greedy or sampled (temperature, top-p) continuation with a KV cache, on
CPU or GPU. `foundry generate` (foundry/cli/generate.py) is the command line over it.

Prompts are encoded as training encoded them: `--chat` renders the run tokenizer's chat template
(`foundry data-prep sft` saves the one it trained with, ChatML by default) with the assistant's turn
opened, and generation stops at the template's end-of-turn token (ChatML's <|im_end|>) or EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from foundry.errors import ConfigError, FoundryError
from foundry.models.kv_cache import KVCache
from foundry.runtime.precision import autocast_for

PROBE_REPLY = "Hello there"  # what the end-of-turn probe puts in an assistant turn


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()
    use_cache: bool = True
    # Choose among the first `vocab_size` rows only: the embedding may have padding rows no token has.
    vocab_size: int | None = None

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"must be >= 1, got {self.max_new_tokens}", "--max-new-tokens")
        if self.temperature < 0:
            raise ConfigError(f"must be >= 0 (0 is greedy), got {self.temperature}", "--temperature")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"must be in (0, 1], got {self.top_p}", "--top-p")


def next_token(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> int:
    """One token from the last position's logits [V] (fp32)."""
    if s.vocab_size is not None:
        logits = logits[: s.vocab_size]
    if s.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / s.temperature, dim=-1)
    if s.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest set of most likely tokens whose mass reaches top_p (at least one).
        outside = sorted_probs.cumsum(0) - sorted_probs >= s.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate_ids(
    model: torch.nn.Module, prompt_ids: list[int], s: Sampling, *, device: torch.device, precision: str
) -> list[int]:
    """The new token ids after `prompt_ids` (a stop token, if reached, included)."""
    s.validate()
    if not prompt_ids:
        raise ConfigError("the prompt encodes to no tokens", "--prompt")
    model.eval()
    max_len = model.cfg.max_seq_len
    if len(prompt_ids) >= max_len:
        raise FoundryError(f"the prompt has {len(prompt_ids)} tokens; the model reads at most {max_len}")
    budget = min(s.max_new_tokens, max_len - len(prompt_ids))
    generator = None
    if s.seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(s.seed)
    tokens = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    cache = KVCache(len(model.blocks), len(prompt_ids) + budget) if s.use_cache else None
    step_input = tokens
    new: list[int] = []
    for _ in range(budget):
        with autocast_for(precision, device):
            logits = model(step_input, cache=cache) if cache is not None else model(tokens)
        token = next_token(logits[0, -1].float(), s, generator)
        new.append(token)
        if token in s.stop_ids:
            break
        step_input = torch.tensor([[token]], dtype=torch.long, device=device)
        tokens = torch.cat([tokens, step_input], dim=1)
    return new


# --- prompts and tokenizers -----------------------------------------------------------------------------


def _prefix_ids(tokenizer) -> list[int]:
    """What the tokenizer puts before a text (a BOS for Llama-style tokenizers; nothing for GPT-2's)."""
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return list(full[:k])
    return []


def encode_text(tokenizer, text: str) -> list[int]:
    """`text` as training saw it: the tokenizer's prefix (BOS), unless the text starts with it, then the
    text without any other special tokens (no EOS after it: the continuation follows)."""
    bos = tokenizer.bos_token
    prefix = [] if bos and text.startswith(bos) else _prefix_ids(tokenizer)
    return prefix + list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_messages(prompt: str, system: str | None = None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def chat_text(tokenizer, messages: list[dict]) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "the run's tokenizer has no chat template (was it trained on `foundry data-prep sft` data?); "
            "drop --chat, or pass --tokenizer with the SFT data's tokenizer folder",
            "--chat",
        )
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template puts after an assistant's reply (<|im_end|>, <|eot_id|>), if any."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": PROBE_REPLY}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template that refuses this conversation: fall back to EOS
        return None
    at = text.rfind(PROBE_REPLY)
    tail = text[at + len(PROBE_REPLY) :] if at >= 0 else ""
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    specials |= set(tokenizer.all_special_tokens)
    for token in sorted(specials, key=len, reverse=True):
        if tail.lstrip().startswith(token):
            return tokenizer.convert_tokens_to_ids(token)
    return None


@dataclass
class Generated:
    text: str
    prompt_ids: list[int]
    new_ids: list[int]
    stopped: bool  # ended at a stop token (rather than at max_new_tokens or the model's length)


def generate_text(
    model,
    tokenizer,
    prompt: str,
    s: Sampling,
    *,
    chat: bool = False,
    system: str | None = None,
    device: torch.device,
    precision: str,
) -> Generated:
    text = chat_text(tokenizer, chat_messages(prompt, system)) if chat else prompt
    prompt_ids = encode_text(tokenizer, text)
    stops = set(s.stop_ids)
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    if chat and (eot := end_of_turn_id(tokenizer)) is not None:
        stops.add(eot)
    s.stop_ids = tuple(sorted(stops))
    if s.vocab_size is None:
        s.vocab_size = len(tokenizer)
    new = generate_ids(model, prompt_ids, s, device=device, precision=precision)
    stopped = bool(new) and new[-1] in stops
    shown = new[:-1] if stopped else new
    return Generated(tokenizer.decode(shown, skip_special_tokens=False), prompt_ids, new, stopped)

"""lm-evaluation-harness over foundry's own model: an `LM` (its TemplateLM) around `input_ids -> logits`.

Tokenization, truncation and the request semantics follow lm-eval's Hugging Face backend (HFLM), so a
foundry model scores what `lm_eval --model hf` scores on the same weights exported with `convert to-hf`:

- loglikelihood: (context, continuation) -> (sum of continuation log-probs, is the continuation greedy);
  pairs are tokenized by lm-eval (context + continuation encoded whole, then split), inputs longer than
  max_length are cut from the left, rows are batched longest first.
- loglikelihood_rolling: a text's full log-likelihood in disjoint windows of max_length tokens, the first
  conditioned on the prefix token (BOS, else EOS).
- generate_until: greedy, at most max_gen_toks new tokens, stopped at EOS or any `until` string and cut
  there; contexts are left-truncated to leave room for the new tokens. Sampling is refused.

lm-eval is an optional dependency (`pip install foundry[eval]`): this module imports it at the top, so
import the module only when lm-eval is wanted.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - depends on the environment
    from foundry.errors import FoundryError

    raise FoundryError(
        "lm-evaluation-harness is not installed: pip install 'lm-eval==0.4.13' (or foundry[eval])"
    ) from e

from foundry.errors import FoundryError
from foundry.eval.icl.scoring import GenerationBatch, LogitsFn, LoglikelihoodBatch


class FoundryLM(TemplateLM):
    """lm-eval's LM API over a callable model (foundry's, or anything mapping input_ids to logits)."""

    backend = "causal"

    def __init__(
        self,
        model: LogitsFn,
        tokenizer,
        *,
        device: torch.device | str = "cpu",
        batch_size: int = 8,
        max_length: int = 2048,
        max_gen_toks: int = 256,
        precision: str = "fp32",
        add_bos_token: bool | None = None,
    ):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self._device = torch.device(device)
        self._batch_size = int(batch_size)
        self._max_length = int(max_length)
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.precision = precision
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad if pad is not None else 0
        if hasattr(model, "eval"):
            model.eval()

    # --- what lm-eval asks of a model ---------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "foundry").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            bos = self.tokenizer.bos_token
            if bos and string.startswith(bos):
                add_special_tokens = False  # the text already starts with BOS
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return list(self.tokenizer.encode(string, **kw))

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # --- scoring -----------------------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        autocast = (
            torch.autocast(self._device.type, dtype=torch.bfloat16)
            if self.precision == "amp_bf16"
            else nullcontext()
        )
        with torch.no_grad(), autocast:
            return self.model(x.to(self._device))

    def _score_rows(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Rows (context, continuation) -> (logprob, greedy), batched longest first, in the given order."""
        order = sorted(range(len(rows)), key=lambda i: -(len(rows[i][0]) + len(rows[i][1])))
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        for start in range(0, len(order), self._batch_size):
            chunk = order[start : start + self._batch_size]
            batch = LoglikelihoodBatch([rows[i] for i in chunk], self.pad_id)
            for i, score in zip(chunk, batch.read(self._forward(batch.inputs())), strict=True):
                out[i] = (score.logprob, score.greedy)
        return out  # type: ignore[return-value]

    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """HFLM's truncation: keep the last max_length + 1 tokens of context + continuation."""
        if not continuation:
            raise FoundryError("lm-eval sent a continuation with no tokens")
        if len(continuation) > self._max_length:
            raise FoundryError(
                f"a continuation of {len(continuation)} tokens is longer than max_length {self._max_length}"
            )
        whole = (context + continuation)[-(self._max_length + 1) :]
        return whole[: len(whole) - len(continuation)], continuation

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        rows = [self._fit(list(ctx), list(cont)) for _, ctx, cont in requests]
        results = self._score_rows(rows)
        for (key, _, _), answer in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            for window in get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self._max_length,
                context_len=1,
            ):
                context, continuation = make_disjoint_window(window)
                windows.append((list(context), list(continuation)))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._score_rows(windows), strict=True):
            totals[owner] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self._max_gen_toks)
            if kwargs.get("do_sample"):
                raise FoundryError(
                    "generate_until: sampling (do_sample) is not supported; foundry generates greedily"
                )
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = int(kwargs.pop("max_gen_toks"))
            room = self._max_length - max_new
            if room < 1:
                raise FoundryError(
                    f"max_gen_toks {max_new} leaves no room for a context in max_length {self._max_length}"
                )
            prompts = {i: self.tok_encode(requests[i].args[0])[-room:] for i in indices}
            order = sorted(indices, key=lambda i: -len(prompts[i]))
            for start in range(0, len(order), self._batch_size):
                chunk = order[start : start + self._batch_size]
                batch = GenerationBatch(
                    [prompts[i] or [self.prefix_token_id] for i in chunk],
                    max_new,
                    self.eot_token_id,
                    self.tok_decode,
                    until,
                    self.pad_id,
                )
                while (x := batch.inputs()) is not None:
                    batch.read(self._forward(x))
                for i, text in zip(chunk, batch.texts(), strict=True):
                    out[i] = postprocess_generated_text(text, until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out  # type: ignore[return-value]

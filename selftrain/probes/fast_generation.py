"""lm-eval's HFLM with greedy ``generate_until`` on the slot-refilling prompted decoder.

Generation tasks (GSM8K-style: long few-shot prompts, short answers cut at ``until``) spend
most of their time in HFLM's batched ``generate``: the batch is left-padded to its longest
prompt and every row is computed until the batch's last row stops. :class:`FastHFLM` answers
greedy requests with :class:`~selftrain.decoding.prompted.PromptedDecoder` instead (each row
prefilled on its own, finished rows replaced at once) and keeps everything else HFLM does:

- contexts are encoded by HFLM's own ``tok_batch_encode`` on the same batches (sorted and
  grouped by lm-eval's ``Collator``, so the BOS rule that looks at a batch's first string
  and the left truncation to ``max_length - max_gen_toks`` are HFLM's), then unpadded;
- a row stops on the model's generation EOS ids, after ``max_gen_toks`` tokens, or once a
  stop string (``until`` plus the tokenizer's EOS text, as HFLM adds) appears in its decoded
  continuation; the answer is HFLM's ``tok_decode`` cut at the first stop string;
- argmax over all of the model's logits under HFLM's ``mixed_precision_dtype`` autocast.

Requests that are not plain greedy (sampling, extra generate kwargs, a model generation config
with penalties or beams, ``think_end_token``, ``batch_size: auto``) go to HFLM's own path.
Built like HFLM: ``FastHFLM(pretrained=model, tokenizer=tokenizer, batch_size=8)``.
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs

from selftrain.decoding.prompted import Prompt, PromptedDecoder

_GREEDY_KWARGS = {"do_sample", "temperature", "until", "max_gen_toks"}
"""Generation kwargs the fast path handles; any other sends a request to HFLM's path."""

_NEUTRAL_CONFIG = {
    "repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0), "min_length": (None, 0), "min_new_tokens": (None, 0),
    "num_beams": (None, 1), "num_beam_groups": (None, 1), "bad_words_ids": (None,),
    "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,), "forced_eos_token_id": (None,), "sequence_bias": (None,),
    "exponential_decay_length_penalty": (None,), "renormalize_logits": (None, False),
    "guidance_scale": (None, 1.0), "watermarking_config": (None,), "stop_strings": (None,),
    "max_time": (None,), "prompt_lookup_num_tokens": (None,), "remove_invalid_values": (
        None, False), "num_return_sequences": (None, 1)}
"""Model generation-config fields whose other values change what greedy ``generate`` returns."""


class FastHFLM(HFLM):
    """HFLM whose greedy ``generate_until`` runs on the slot-refilling prompted decoder.

    Args:
        *args: HFLM's arguments.
        **kwargs: HFLM's keyword arguments (``pretrained``, ``tokenizer``, ``batch_size``...).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fast_requests = 0
        """requests answered by the prompted decoder (the rest went to HFLM's path)."""

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """HFLM's ``generate_until``; greedy requests go through the prompted decoder.

        Args:
            requests: lm-eval ``Instance`` objects, ``args`` = (context, gen_kwargs).
            disable_tqdm: passed on to HFLM for the requests it answers.

        Returns:
            one continuation per request, in order.
        """
        fast = [i for i, request in enumerate(requests) if self._fast(request.args[1])]
        results: list[str | None] = [None] * len(requests)
        fast_set = set(fast)
        slow = [i for i in range(len(requests)) if i not in fast_set]
        if slow:
            answers = super().generate_until([requests[i] for i in slow], disable_tqdm)
            for i, answer in zip(slow, answers, strict=True):
                results[i] = answer
        if fast:
            answers = self._generate_greedy([requests[i].args for i in fast])
            for i, answer in zip(fast, answers, strict=True):
                results[i] = answer
        self.fast_requests += len(fast)
        return results  # type: ignore[return-value]

    def _fast(self, gen_kwargs: Any) -> bool:
        """Whether a request's generation is plain greedy, which the decoder reproduces."""
        if (not isinstance(gen_kwargs, dict) or self.think_end_token is not None
                or self.backend != "causal" or not isinstance(self.batch_size, int)
                or set(gen_kwargs) - _GREEDY_KWARGS - {"max_new_tokens"}):
            return False
        if normalize_gen_kwargs(gen_kwargs, self.max_gen_toks).get("do_sample"):
            return False
        config = getattr(self.model, "generation_config", None)
        return all(getattr(config, name, None) in neutral
                   for name, neutral in _NEUTRAL_CONFIG.items())

    def _generate_greedy(self, args: list[tuple[str, dict]]) -> list[str]:
        """Greedy continuations of (context, gen_kwargs) pairs, in order."""
        collator = Collator(args, sort_fn=lambda req: (-len(self.tok_encode(req[0])), req[0]),
                            group_by="gen_kwargs", group_fn=lambda req: req[1])
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        prompts, keys = [], []
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            contexts, all_gen_kwargs = zip(*chunk, strict=True)
            kwargs = normalize_gen_kwargs(all_gen_kwargs[0], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            max_ctx_len = self.max_length - max_gen_toks
            assert max_ctx_len > 0, (f"max_gen_toks {max_gen_toks} must be less than the "
                                     f"model's maximum sequence length {self.max_length}")
            context_enc, attn_masks = self.tok_batch_encode(
                list(contexts), left_truncate_len=max_ctx_len, truncation=self.truncation)
            stop = [term for term in until if term] or None
            for row, context in enumerate(contexts):
                tokens = context_enc[row][attn_masks[row].bool()].tolist()
                prompts.append(Prompt(id=len(prompts), tokens=tokens,
                                      max_new_tokens=max_gen_toks, stop=stop))
                keys.append((context, all_gen_kwargs[0]))
        eos_ids = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        decoder = PromptedDecoder(self.model, eos_ids, batch_size=self.batch_size,
                                  decode=self.tok_decode)
        texts: list[str] = [""] * len(prompts)
        with torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                            enabled=self.mixed_precision_dtype is not None):
            for completion in decoder.generate(prompts):
                texts[completion.id] = completion.text or ""
        for key, text in zip(keys, texts, strict=True):
            self.cache_hook.add_partial("generate_until", key, text)
        return collator.get_original(texts)

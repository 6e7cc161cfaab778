"""selftrain.decoding.prompted and selftrain.probes.fast_generation: equal to the plain path.

Prompted, slot-refilled greedy decoding equals an unbatched greedy loop (one row, full
forward), and FastHFLM's ``generate_until`` returns HFLM's strings exactly, on the project's
generation tasks and on GSM8K-shaped requests, for three model families.
"""

import copy
import logging

import pytest
import torch
from helpers import REPO
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from selftrain.curation.lm_eval_tasks import task_manager
from selftrain.decoding import slots
from selftrain.decoding.prompted import Prompt, PromptedDecoder, common_prefix, cut_at_stop
from selftrain.errors import SelftrainError
from selftrain.models import load_model, load_tokenizer
from selftrain.probes.fast_generation import FastHFLM

FAMILIES = ["qwen2", "llama", "gpt_neox"]
SHOTS = [
    "Question: Tom has 3 boxes with 4 apples each. He eats 2. How many are left?\n"
    "Answer: 3 boxes hold 3 * 4 = 12 apples.\nHe eats 2, so 12 - 2 = 10.\n#### 10",
    "Question: A bus carries 20 people; 7 get off and 5 get on. How many now?\n"
    "Answer: 20 - 7 = 13.\n13 + 5 = 18.\n#### 18",
    "Question: Ann reads 6 pages a day for 5 days. How many pages?\n"
    "Answer: 6 * 5 = 30 pages.\n#### 30",
]


def _model(family: str, varied: bool = True):
    """A tiny model; ``varied`` adds a fixed pseudo-random function of the hidden state.

    That and a raised newline make greedy answers differ, span lines and end on stop strings
    at staggered points (the random weights alone repeat one token).
    """
    tokenizer = load_tokenizer(f"tiny:{family}")
    model = load_model(f"tiny:{family}").eval()
    if varied:
        newline = tokenizer.encode("\n")[-1]
        head = model.get_output_embeddings().weight
        generator = torch.Generator().manual_seed(0)
        scramble = 40 * torch.randn(head.shape[1], head.shape[0], generator=generator)

        def vary(module, inputs, logits):
            logits = logits + torch.sin(inputs[0].float() @ scramble).to(logits.dtype)
            logits[..., newline] += 1.0
            return logits

        model.get_output_embeddings().register_forward_hook(vary)
    return model, tokenizer


def _gsm8k_requests(count: int = 9, max_gen_toks: int = 32) -> list[Instance]:
    """Few-shot prompts of 0-3 shots, one too long for the tiny context (left-truncated)."""
    requests = []
    for i in range(count):
        shots = SHOTS[: i % 4] if i != count - 1 else SHOTS * 2
        question = f"Question: Sam has {i + 3} coins and finds {2 * i} more. How many?\nAnswer:"
        context = "\n\n".join([*shots, question])
        kwargs = {"until": ["\n\n", "Question:"], "max_gen_toks": max_gen_toks,
                  "do_sample": False}
        requests.append(Instance("generate_until", {}, (context, kwargs), i))
    return requests


def _both(model, tokenizer, requests, batch_size: int = 4) -> tuple[list[str], list[str], int]:
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    plain = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
    fast = FastHFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer),
                    batch_size=batch_size)
    expected = plain.generate_until(requests, disable_tqdm=True)
    return expected, fast.generate_until(requests, disable_tqdm=True), fast.fast_requests


def _greedy_loop(model, tokenizer, prompt: Prompt) -> list[int]:
    """The reference: one row, a full forward per token, argmax, the same stop rules."""
    ids, new = list(prompt.tokens), []
    with torch.no_grad():
        while len(new) < prompt.max_new_tokens:
            new.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            ids.append(new[-1])
            text = tokenizer.decode(new, skip_special_tokens=True)
            if new[-1] == tokenizer.eos_token_id or any(s in text for s in prompt.stop or []):
                break
    return new


@pytest.mark.parametrize("family, attention", [
    ("qwen2", "sdpa"), ("llama", "sdpa"), ("gpt_neox", "sdpa"), ("llama", "eager")])
def test_prompted_decoding_equals_an_unbatched_greedy_loop(family, attention):
    model, tokenizer = _model(family)
    model.set_attn_implementation(attention)
    generator = torch.Generator().manual_seed(0)
    prompts = []
    for i in range(12):
        length = int(torch.randint(1, 100, (1,), generator=generator))
        tokens = torch.randint(0, 250, (length,), generator=generator).tolist()
        prompts.append(Prompt(i, tokens, max_new_tokens=int(torch.randint(
            1, 24, (1,), generator=generator)), stop=["\n\n"] if i % 2 else None))
    decoder = PromptedDecoder(model, tokenizer.eos_token_id, batch_size=2,
                              decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    completions = {c.id: c for c in decoder.generate(prompts)}
    assert sorted(completions) == list(range(12))
    for prompt in prompts:
        got = completions[prompt.id]
        assert got.tokens == _greedy_loop(model, tokenizer, prompt), prompt.id
        text = tokenizer.decode(got.tokens, skip_special_tokens=True)
        assert got.text == cut_at_stop(text, prompt.stop or [])
    assert {c.reason for c in completions.values()} >= {"stop", "length"}
    assert decoder.rewinds > 0


def _stop_prompts(count: int = 16) -> list[Prompt]:
    """Random prompts of 1-60 tokens and caps of 1-24, every other one with a stop string."""
    generator = torch.Generator().manual_seed(1)
    prompts = []
    for i in range(count):
        length = int(torch.randint(1, 60, (1,), generator=generator))
        prompts.append(Prompt(i, torch.randint(0, 250, (length,), generator=generator).tolist(),
                              max_new_tokens=int(torch.randint(1, 24, (1,), generator=generator)),
                              stop=["\n\n", "a"] if i % 2 else None))
    return prompts


@pytest.mark.parametrize("family, temperature", [
    ("qwen2", 0.0), ("llama", 1.0), pytest.param("gpt_neox", 0.0, marks=pytest.mark.slow)])
def test_completions_are_the_same_for_every_host_interval_and_static_shapes(family,
                                                                           temperature):
    # stop strings are checked only when the host looks, at every length reached since
    model, tokenizer = _model(family)
    prompts = _stop_prompts()

    def completions(**kwargs) -> tuple[dict, PromptedDecoder]:
        decoder = PromptedDecoder(
            model, tokenizer.eos_token_id, batch_size=kwargs.pop("batch_size", 4),
            temperature=temperature, seed=3, vocab_size=len(tokenizer),
            decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True), **kwargs)
        return {c.id: (c.tokens, c.reason, c.text) for c in decoder.generate(prompts)}, decoder

    reference, _ = completions(host_every=1)
    assert {reason for _, reason, _ in reference.values()} >= {"stop", "length"}
    for every, batch, static in [(3, 4, False), (8, 3, False), (16, 5, True)]:
        got, decoder = completions(host_every=every, batch_size=batch, static_shapes=static)
        assert got == reference, (every, batch, static)
        assert decoder.host_reads * every == decoder.steps


def test_sampled_completion_does_not_depend_on_the_batch_or_the_order():
    model, tokenizer = _model("llama", varied=False)
    prompts = [Prompt(i, list(range(1 + 7 * i % 40)), max_new_tokens=12) for i in range(20)]
    kwargs = {"eos_token_id": tokenizer.eos_token_id, "temperature": 1.0, "seed": 5}
    one = {c.id: c.tokens for c in PromptedDecoder(model, batch_size=16, **kwargs).generate(
        prompts)}
    two = {c.id: c.tokens for c in PromptedDecoder(model, batch_size=3, **kwargs).generate(
        prompts[::-1])}
    assert one == two and len({tuple(tokens) for tokens in one.values()}) > 15


@pytest.mark.parametrize("family", FAMILIES)
def test_gsm8k_shaped_requests_equal_hflm(family):
    model, tokenizer = _model(family)
    expected, got, fast = _both(model, tokenizer, _gsm8k_requests())
    assert got == expected and fast == len(expected)
    assert any("\n" in text for text in got) and len(set(got)) > 5


def test_fasthflm_looking_every_8_steps_as_on_a_gpu_still_equals_hflm(monkeypatch):
    # FastHFLM takes the device's default interval: 8 on a GPU, here forced on the CPU
    monkeypatch.setitem(slots.HOST_EVERY, "cpu", 8)
    model, tokenizer = _model("qwen2")
    expected, got, fast = _both(model, tokenizer, _gsm8k_requests(max_gen_toks=40))
    assert got == expected and fast == len(expected)
    assert any("\n" in text for text in got) and len(set(got)) > 5


@pytest.mark.parametrize("family", FAMILIES)
def test_a_shared_few_shot_block_is_prefilled_once_per_batch_and_answers_equal_hflm(family):
    """MATH's fixed 4-shot prompt: every prompt starts with the same block of shots."""
    block = "\n\n".join(SHOTS)
    requests = [Instance("generate_until", {}, (
        f"{block}\n\nQuestion: Sam has {i + 3} coins and finds {2 * i} more. How many?\nAnswer:",
        {"until": ["\n\n", "Question:"], "max_gen_toks": 24, "do_sample": False}), i)
        for i in range(8)]
    model, tokenizer = _model(family)
    expected, got, fast = _both(model, tokenizer, requests)
    assert got == expected and fast == len(expected) and len(set(got)) > 3
    prompts = [Prompt(i, tokenizer.encode(r.args[0]), 4) for i, r in enumerate(requests)]
    decoder = PromptedDecoder(model, None, batch_size=4)
    list(decoder.generate(prompts))
    shots = common_prefix([prompt.tokens for prompt in prompts])
    assert shots > len(tokenizer.encode(block)) - 2  # the block, bar a merge at its end
    every_token = sum(len(prompt.tokens) - 1 for prompt in prompts)
    assert decoder.prefilled_tokens == every_token - shots * (len(prompts) - 2)  # 2 batches


def test_common_prefix():
    assert common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix([[1, 2], [3]]) == 0 and common_prefix([[5, 6]]) == 2
    assert common_prefix([]) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_the_project_generation_tasks_equal_hflm(family):
    manager = task_manager([str(REPO / "configs/tasks")], ["selftrain_local"], defaults=False)
    requests = []
    for task in manager.load(["selftrain_local"])["tasks"].values():
        if task.config.output_type == "generate_until":
            task.set_fewshot_seed(seed=1234)
            task.build_all_requests(rank=0, limit=None, world_size=1)
            requests += task.instances
    assert requests
    model, tokenizer = _model(family)
    expected, got, fast = _both(model, tokenizer, requests, batch_size=8)
    assert got == expected and fast == len(expected)


def test_sampling_requests_go_to_hflm():
    model, tokenizer = _model("qwen2", varied=False)
    requests = _gsm8k_requests(count=3, max_gen_toks=4)
    for request in requests:
        request.arguments[1].update(do_sample=True, temperature=0.7)
    fast = FastHFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=2)
    assert len(fast.generate_until(requests, disable_tqdm=True)) == 3 and fast.fast_requests == 0


@pytest.mark.parametrize("change, message", [
    ({"stop": []}, "non-empty list"), ({"stop": [1]}, "non-empty list"),
    ({"stop": [""]}, "non-empty list"), ({"tokens": list(range(500))}, "max_new_tokens"),
    ({"tokens": []}, "empty")])
def test_bad_prompts_are_one_line_errors(change, message):
    model, tokenizer = _model("qwen2", varied=False)
    decoder = PromptedDecoder(model, tokenizer.eos_token_id, batch_size=2, decode=str)
    prompt = Prompt(0, [1, 2, 3], max_new_tokens=16)
    for key, value in change.items():
        setattr(prompt, key, value)
    with pytest.raises(SelftrainError, match=message) as error:
        list(decoder.generate([prompt]))
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_embedded_smollm2_generation_equals_hflm():
    model = load_model("embedded:smollm2-135m").eval()
    tokenizer = load_tokenizer("embedded:smollm2-135m")
    expected, got, fast = _both(model, tokenizer, _gsm8k_requests(count=6, max_gen_toks=24))
    assert got == expected and fast == 6


def test_benchmark_eval_with_fast_generation_logs_the_same_scores(tmp_path):
    """BenchmarkEval's ``fast_generation`` switch: the same scores in a fit (float32)."""
    from helpers import BENCHMARK, callbacks_config, fit, history

    scores = []
    for fast in (False, True):
        run = tmp_path / f"fast={fast}"
        config = callbacks_config(tmp_path / f"fast={fast}.yaml", (BENCHMARK, {
            "tasks": {"selftrain_arith": 3}, "include_path": str(REPO / "configs" / "tasks"),
            "limit": 6, "fast_generation": fast}))
        fit(run, "--config", config, "--trainer.max_epochs", "1", "--model.export_hf",
            "never", callbacks=False)
        scores.append([record["metrics"] for record in history(run, "benchmark")])
    assert scores[0] == scores[1] and len(scores[0]) == 2

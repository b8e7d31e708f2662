"""The batching scheduler: every request's greedy tokens equal its solo run whatever shares the batch (tiny ChatGLM3
and the embedded SmolLM2, fp32), FIFO admission, batch limits, cancels, a failing request failing alone, flat
memory; and the text pieces: incremental detokenization and stop strings across piece boundaries."""

from __future__ import annotations

import random
import threading

import pytest

from catdog_glm.chat.engine import ChatEngine
from catdog_glm.chat.loading import load_chat_model
from catdog_glm.chat.streaming import IncrementalDetokenizer, StopStrings
from catdog_glm.errors import ConfigError
from tests.chatglm_tiny import make_tiny_chatglm3

NEAR_TIE = 1e-4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_chatglm3(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    chat = load_chat_model(str(tiny_dir), dtype="fp32")
    chat.stop_ids = set()  # the random model would stop at random: every request makes all its tokens
    return chat


SMOL_QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about a cat that likes to sleep in the sun all day long.",
    "Name three colours.",
    "Why is the sky blue? Explain it to a child in two short sentences please.",
    "How many legs does a spider have?",
    "Give me a tip for learning Python.",
    "What is 2 + 2?",
    "Tell me a joke about a dog who wanted to become a famous astronaut one day.",
]
SMOL_LENGTHS = [24 - i for i in range(8)]  # the first requests run longest, so all 8 share steps


@pytest.fixture(scope="module")
def smol():
    chat = load_chat_model(None, dtype="fp32")
    chat.stop_ids = set()  # short answers would end before the last request joins
    return chat


@pytest.fixture(scope="module")
def smol_solo(smol):
    """Each question's reply run alone."""
    engine = ChatEngine(smol, max_batch_size=16, max_batch_tokens=8192)
    solo = [
        engine.chat([{"role": "user", "content": q}], temperature=0, max_new_tokens=n)
        for q, n in zip(SMOL_QUESTIONS, SMOL_LENGTHS, strict=True)
    ]
    engine.close()
    return solo


def _prompts(n: int, words: list[str]) -> list[list[dict]]:
    rng = random.Random(n)
    return [[{"role": "user", "content": " ".join(rng.choice(words) for _ in range(1 + 7 * i))}] for i in range(n)]


def _run_staggered(engine: ChatEngine, prompts, max_new_tokens: list[int], **sampling):
    """Start the first request; each next one joins once the one before has made 1 or 2 tokens (so they join the
    running batch at different steps); read every stream to its end. Returns (generations, pieces per request)."""
    gens, iters, pieces = [], [], []
    for i, messages in enumerate(prompts):
        if gens:
            while gens[-1].completion_tokens < 1 + i % 2 and gens[-1].reply is None:
                try:
                    pieces[-1].append(next(iters[-1]))
                except StopIteration:
                    break
        gens.append(engine.stream(messages, max_new_tokens=max_new_tokens[i], **({"temperature": 0} | sampling)))
        iters.append(iter(gens[-1]))
        pieces.append([])
    for it, got in zip(iters, pieces, strict=True):
        got.extend(it)
    return gens, pieces


def _assert_same_or_near_tie(chat, prompt: list[int], solo: list[int], batched: list[int]) -> None:
    """Equal tokens, or they part where the solo run's two best logits were within NEAR_TIE of each other."""
    if solo == batched:
        return
    import torch

    k = next((i for i, (a, b) in enumerate(zip(solo, batched, strict=False)) if a != b), min(len(solo), len(batched)))
    with torch.inference_mode():
        logits = chat.model(input_ids=torch.tensor([prompt + solo[:k]])).logits[0, -1].float()
    top = logits.topk(2).values
    gap = float(top[0] - top[1])
    assert gap < NEAR_TIE, f"batched run left the solo run at token {k} although the top-2 logits were {gap:.2e} apart"


@pytest.mark.parametrize("concurrent", [1, 3, 8])
def test_tiny_chatglm3_batched_tokens_equal_solo_runs(tiny, concurrent):
    engine = ChatEngine(tiny, max_batch_size=8, max_batch_tokens=4096)
    prompts = _prompts(concurrent, ["hello", "world", "capital", "France", "猫", "狗", "tiny", "corpus"])
    lengths = [60 - 4 * i for i in range(concurrent)]
    solo = [engine.chat(p, temperature=0, max_new_tokens=n) for p, n in zip(prompts, lengths, strict=True)]
    assert engine.load()["peak_batch"] == 1
    gens, pieces = _run_staggered(engine, prompts, lengths)
    assert engine.load()["peak_batch"] == concurrent  # they really shared steps
    for messages, alone, gen, got in zip(prompts, solo, gens, pieces, strict=True):
        reply = gen.reply
        _assert_same_or_near_tie(tiny, tiny.encode_chat(messages), alone.token_ids, reply.token_ids)
        if reply.token_ids == alone.token_ids:
            assert reply.text == alone.text
        # nothing lost, duplicated or interleaved; usage exact
        assert "".join(got) == reply.text
        assert reply.completion_tokens == len(reply.token_ids) == alone.completion_tokens
        assert reply.prompt_tokens == len(tiny.encode_chat(messages)) == alone.prompt_tokens
    engine.close()


@pytest.mark.slow
@pytest.mark.parametrize("concurrent", [1, 3, 8])
def test_smollm2_fp32_batched_tokens_equal_solo_runs(smol, smol_solo, concurrent):
    import torch

    engine = ChatEngine(smol, max_batch_size=16, max_batch_tokens=8192)
    prompts = [[{"role": "user", "content": q}] for q in SMOL_QUESTIONS[:concurrent]]
    lengths = SMOL_LENGTHS[:concurrent]
    if concurrent == 1:  # the scheduler's packed forward against a plain loop on transformers' forward and cache
        from transformers import DynamicCache

        prompt = smol.encode_chat(prompts[0])
        reference, cache, step = [], DynamicCache(), torch.tensor([prompt])
        with torch.inference_mode():
            for _ in range(lengths[0]):
                reference.append(int(smol.model(input_ids=step, cache=cache, use_cache=True).logits[0, -1].argmax()))
                step = torch.tensor([reference[-1:]])
        _assert_same_or_near_tie(smol, prompt, reference, smol_solo[0].token_ids)
    gens, pieces = _run_staggered(engine, prompts, lengths)
    assert engine.load()["peak_batch"] == concurrent
    for messages, alone, gen, got in zip(prompts, smol_solo, gens, pieces, strict=False):
        _assert_same_or_near_tie(smol, smol.encode_chat(messages), alone.token_ids, gen.reply.token_ids)
        assert "".join(got) == gen.reply.text and gen.reply.completion_tokens == len(gen.reply.token_ids)
        assert gen.reply.prompt_tokens == alone.prompt_tokens
    engine.close()


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_layers_take_the_packed_batch(tiny_dir, bits):
    chat = load_chat_model(str(tiny_dir), dtype="fp32", quantize=bits, use_cache=False)
    chat.stop_ids = set()
    engine = ChatEngine(chat, max_batch_size=8, max_batch_tokens=4096)
    prompts = _prompts(4, ["hello", "world", "capital", "France"])
    lengths = [30 - 2 * i for i in range(4)]
    solo = [engine.chat(p, temperature=0, max_new_tokens=n) for p, n in zip(prompts, lengths, strict=True)]
    gens, _ = _run_staggered(engine, prompts, lengths)
    assert engine.load()["peak_batch"] == 4
    for messages, alone, gen in zip(prompts, solo, gens, strict=True):
        _assert_same_or_near_tie(chat, chat.encode_chat(messages), alone.token_ids, gen.reply.token_ids)
    engine.close()


def test_a_seeded_request_samples_the_same_reply_alone_and_in_a_batch(tiny):
    engine = ChatEngine(tiny, max_batch_size=8, max_batch_tokens=4096)
    prompts = _prompts(4, ["hello", "world", "capital", "France"])
    settings = {"temperature": 0.9, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.2, "seed": 7}
    solo = [engine.chat(p, max_new_tokens=30, **settings) for p in prompts]
    gens, _ = _run_staggered(engine, prompts, [30] * 4, **settings)
    assert engine.load()["peak_batch"] == 4
    assert [g.reply.token_ids for g in gens] == [r.token_ids for r in solo]
    engine.close()


@pytest.mark.parametrize("vocab", [4, 65024])
def test_nucleus_sampling_draws_the_nucleus_renormalized(vocab):
    import math

    import torch

    from catdog_glm.chat.sampling import Sampling, TokenSampler

    logits = torch.full((vocab,), -40.0)
    logits[:4] = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    sampler = TokenSampler(Sampling(temperature=1.0, top_p=0.8, seed=0), [0])
    draws = [sampler(logits.clone()) for _ in range(4000)]
    assert set(draws) == {0, 1}  # 0.5 + 0.3 covers 0.8: the rest never comes
    assert math.isclose(draws.count(0) / len(draws), 0.5 / 0.8, abs_tol=0.03)
    again = TokenSampler(Sampling(temperature=1.0, top_p=0.8, seed=0), [0])
    assert [again(logits.clone()) for _ in range(50)] == draws[:50]  # a seed replays the same draws


def test_models_without_the_attention_interface_run_one_request_per_forward(tiny):
    packed = ChatEngine(tiny, max_batch_size=8, max_batch_tokens=4096)
    prompts = _prompts(3, ["hello", "world", "France"])
    solo = [packed.chat(p, temperature=0, max_new_tokens=20) for p in prompts]
    packed.close()
    engine = ChatEngine(tiny, max_batch_size=8, max_batch_tokens=4096)
    engine._scheduler._packed = False  # what a remote-code model gets: its own forward and DynamicCache each
    gens, _ = _run_staggered(engine, prompts, [20] * 3)
    assert engine.load()["peak_batch"] == 3
    for messages, alone, gen in zip(prompts, solo, gens, strict=True):
        _assert_same_or_near_tie(tiny, tiny.encode_chat(messages), alone.token_ids, gen.reply.token_ids)
    engine.close()


def test_admission_is_fifo_and_bounded_by_batch_size(tiny):
    engine = ChatEngine(tiny, max_batch_size=1, max_batch_tokens=4096)
    finished: list[int] = []
    lock = threading.Lock()

    def ask(i: int, gen):
        gen.text()
        with lock:
            finished.append(i)

    gens = [
        engine.stream([{"role": "user", "content": f"hello {i}"}], temperature=0, max_new_tokens=30) for i in range(4)
    ]
    threads = [threading.Thread(target=ask, args=(i, g)) for i, g in enumerate(gens)]
    for t in reversed(threads):  # readers start in reverse: the order must still be the order of arrival
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert finished == [0, 1, 2, 3] and engine.load()["peak_batch"] == 1
    engine.close()


def test_kv_token_budget_queues_requests_and_refuses_one_that_can_never_fit(tiny):
    prompt = [{"role": "user", "content": "hello world"}]
    need = len(tiny.encode_chat(prompt)) + 20
    engine = ChatEngine(tiny, max_batch_size=8, max_batch_tokens=2 * need)
    gens = [engine.stream(prompt, temperature=0, max_new_tokens=20) for _ in range(5)]
    assert all(g.text() is not None for g in gens) and all(g.reply.completion_tokens == 20 for g in gens)
    assert engine.load()["peak_batch"] == 2  # two requests' reservations fit, never three
    with pytest.raises(ConfigError, match="max-batch-tokens"):
        engine.stream(prompt, temperature=0, max_new_tokens=3 * need)
    engine.close()


def test_cancel_frees_the_slot_within_one_step(tiny):
    engine = ChatEngine(tiny, max_batch_size=1, max_batch_tokens=4096)
    prompt = [{"role": "user", "content": "hello"}]
    running = engine.stream(prompt, temperature=0, max_new_tokens=200)
    queued = engine.stream(prompt, temperature=0, max_new_tokens=5)
    dropped = engine.stream(prompt, temperature=0, max_new_tokens=5)
    dropped.cancel()  # still waiting: it leaves the queue without running
    it = iter(running)
    next(it)
    made = running.completion_tokens
    running.cancel()
    list(it)
    assert running.reply.finish_reason == "cancelled" and running.reply.completion_tokens <= made + 1
    assert queued.text() is not None and queued.reply.completion_tokens == 5
    assert dropped.text() == "" and dropped.reply.finish_reason == "cancelled"
    assert dropped.reply.completion_tokens == 0
    engine.close()


def test_a_failing_request_fails_alone(tiny):
    from catdog_glm.chat.sampling import Sampling
    from catdog_glm.chat.scheduler import Request
    from catdog_glm.chat.streaming import ThreadInbox

    engine = ChatEngine(tiny, max_batch_size=8, max_batch_tokens=4096)
    prompts = _prompts(3, ["hello", "world", "France"])
    solo = [engine.chat(p, temperature=0, max_new_tokens=30) for p in prompts]
    with pytest.raises(ConfigError, match="stop"):  # bad input is refused before it reaches the batch
        engine.stream(prompts[0], stop=[""])
    monkey_window = tiny.context_window
    with pytest.raises(ConfigError, match="context"):  # so is a prompt that can never fit
        engine.stream([{"role": "user", "content": "hello " * monkey_window}], max_new_tokens=8)

    def broken_decode(ids):
        raise RuntimeError("decoder exploded")

    gens = [engine.stream(p, temperature=0, max_new_tokens=30) for p in prompts]
    bad = Request(
        tiny.encode_chat(prompts[0]),
        30,
        Sampling(temperature=0),
        stop_ids=(),
        decode=broken_decode,
        inbox=ThreadInbox(),
    )
    engine._scheduler.submit(bad)
    assert bad.inbox.get() is not None and bad.error is not None and "exploded" in str(bad.error)
    for gen, alone in zip(gens, solo, strict=True):
        assert gen.text() == alone.text and gen.reply.token_ids == alone.token_ids
    engine.close()


def test_memory_stays_flat_over_500_requests_with_random_cancels(tiny):
    import psutil

    engine = ChatEngine(tiny, max_batch_size=16, max_batch_tokens=1 << 16)
    rng = random.Random(0)
    process = psutil.Process()

    def wave(n: int) -> None:
        gens = [
            engine.stream(
                [{"role": "user", "content": "hello " * rng.randint(1, 40)}],
                temperature=rng.choice([0, 0.8]),
                max_new_tokens=rng.randint(1, 12),
            )
            for _ in range(n)
        ]
        for gen in gens:
            if rng.random() < 0.3:
                gen.cancel()
            for i, _ in enumerate(gen):
                if i == 2 and rng.random() < 0.3:
                    gen.cancel()
            assert gen.reply is not None

    for _ in range(5):  # warm-up: allocator pools, buffer sizes
        wave(20)
    before = process.memory_info().rss
    for _ in range(20):
        wave(20)
    growth = (process.memory_info().rss - before) / 2**20
    assert engine.load()["running"] == engine.load()["waiting"] == 0
    assert growth < 30, f"resident memory grew by {growth:.0f} MiB over 400 requests"
    engine.close()


def test_closing_the_engine_ends_queued_and_running_requests(tiny):
    from catdog_glm.chat.engine import EngineClosedError

    engine = ChatEngine(tiny, max_batch_size=1, max_batch_tokens=4096)
    running = engine.stream([{"role": "user", "content": "hello"}], temperature=0, max_new_tokens=500)
    queued = engine.stream([{"role": "user", "content": "hello"}], temperature=0, max_new_tokens=5)
    it = iter(running)
    next(it)
    engine.close()
    for gen, rest in ((running, it), (queued, iter(queued))):
        with pytest.raises(EngineClosedError):
            list(rest)
        assert gen.error is not None
    with pytest.raises(EngineClosedError):
        engine.stream([{"role": "user", "content": "hello"}])


@pytest.mark.slow
def test_incremental_detokenizer_pieces_join_to_the_full_decode(smol):
    text = "Hello, wörld! 你好，很高兴认识你。 Emoji: 🐱🐶 tabs\tand  spaces, numbers 12345."
    ids = smol.encode_chat([{"role": "assistant", "content": text}])
    detok = IncrementalDetokenizer(smol.decode)
    pieces = [detok.push(t) for t in ids]
    assert "".join(pieces) == smol.decode(ids)
    assert not any("\ufffd" in p for p in pieces)  # never half a character


def test_stop_strings_across_piece_boundaries():
    stops = StopStrings(["STOP", "\n\n"])
    shown = []
    for piece in ["Hello ", "wor", "ld S", "TO", "P and more"]:
        out, stopped = stops.feed(piece)
        shown.append(out)
        if stopped:
            break
    assert "".join(shown) == "Hello world " and stopped
    stops = StopStrings(["abab"])
    out = [stops.feed(p)[0] for p in ["xab", "a", "c"]]
    assert "".join(out) == "xabac"  # a held-back prefix that did not become a stop string is shown in the end
    stops = StopStrings(["END"])
    assert stops.feed("the EN") == ("the ", False) and stops.flush() == "EN"

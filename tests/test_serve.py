"""strata serve: a real server on 127.0.0.1, talked to with the official ``openai`` client and
with plain HTTP. Held to ``strata generate`` (32 concurrent greedy requests), to its own cold run
(prefix hits), and kept serving through every fault of the issue."""

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest
import torch

from cli_runner import REPRODUCIBLE_BLAS
from strata import build_model, load_config
from strata.data import ByteTokenizer, load_hf_tokenizer
from strata.data import corpus_path
from strata.inference.generate import generate
from strata.serve.chat import TemplateError, chat_template
from strata.serve.engine import Done, Engine, Request, Sampling, Token
from strata.serve.metrics import Histogram
from strata.serve.prefix_cache import PrefixCache
from strata.train.runs import TrainedModel, from_pretrained, save_as_run
from tokenizer_files import BOS, EOS, llama_like, save_with_config

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def random_run(family: str, out: Path, *overrides: str, tokenizer=None) -> Path:
    """A run directory of a tiny preset with random weights (init 0.1, so greedy paths vary)."""
    torch.manual_seed(0)
    config = load_config(TINY / f"{family}.yaml", ["model.init_std=0.1", *overrides])
    model = build_model(config).eval()
    return save_as_run(TrainedModel(config, model, tokenizer or ByteTokenizer(), out), out)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def post(url: str, body: dict | bytes) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


class Server:
    def __init__(self, process: subprocess.Popen, port: int, name: str):
        self.process, self.base, self.name = process, f"http://127.0.0.1:{port}", name
        self.client = openai.OpenAI(base_url=f"{self.base}/v1", api_key="none", max_retries=0, timeout=120)

    def healthy(self) -> bool:
        return get(f"{self.base}/health") == (200, '{"status":"ok"}')

    def metrics(self) -> dict[str, float]:
        lines = get(f"{self.base}/metrics")[1].splitlines()
        return {line.split(" ")[0]: float(line.split(" ")[1]) for line in lines if line and not line.startswith("#")}


@contextmanager
def serving(directory: Path, *options: str, env=None):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "strata.cli", "serve", str(directory), "--port", str(port), "--quiet",
                                *options], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    server = Server(process, port, directory.name)
    try:
        deadline = time.time() + 120
        while True:
            if process.poll() is not None:
                raise AssertionError(f"the server exited ({process.returncode}):\n{process.stdout.read()}")
            try:
                if server.healthy():
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise AssertionError("the server did not answer /health within 120 s")
            time.sleep(0.1)
        yield server
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


@pytest.fixture(scope="module")
def shakespeare() -> str:
    return corpus_path("shakespeare").read_text(encoding="utf-8")


# --- the API through the openai client -------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, shakespeare):
    """A tiny transformer with a Llama-3-style BPE tokenizer that has ChatML markers, and a chat
    template beside it; <|im_end|> ends a turn (generation_config.json)."""
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer = llama_like(shakespeare[:200_000], vocab_size=600)
    tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    save_with_config(tokenizer, folder, bos_token=BOS, eos_token=EOS)
    hf_tokenizer = load_hf_tokenizer(folder)
    run = random_run("transformer", tmp_path_factory.mktemp("chat") / "chat-model", f"model.vocab_size={hf_tokenizer.vocab_size}",
                     "model.context_length=256", tokenizer=hf_tokenizer)
    (run / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    end = tokenizer.token_to_id("<|im_end|>")
    (run / "generation_config.json").write_text(json.dumps({"eos_token_id": [end]}))
    return run, end


def test_completions_chat_and_streaming_through_the_openai_client(chat_run):
    chat_run, end = chat_run
    trained = from_pretrained(chat_run)
    prompt = "Shall I compare thee"
    expected = generate(trained.model, prompt, 12, tokenizer=trained.tokenizer)[0]
    with serving(chat_run) as server:
        client = server.client
        assert [model.id for model in client.models.list().data] == ["chat-model"]

        completion = client.completions.create(model="chat-model", prompt=prompt, max_tokens=12, temperature=0, logprobs=2)
        choice = completion.choices[0]
        assert choice.text == expected.text and choice.finish_reason == "length"
        assert len(choice.logprobs.tokens) == len(expected.tokens) and all(len(top) == 2 for top in choice.logprobs.top_logprobs)
        assert all(lp == max(top.values()) for lp, top in zip(choice.logprobs.token_logprobs, choice.logprobs.top_logprobs))
        assert completion.usage.prompt_tokens == 1 + len(trained.tokenizer.encode(prompt.encode()))
        assert completion.usage.completion_tokens == len(expected.tokens)

        streamed = client.completions.create(model="chat-model", prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                             stream_options={"include_usage": True})
        chunks = list(streamed)
        assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == expected.text
        assert chunks[-1].usage.completion_tokens == len(expected.tokens) and len(chunks) > 3

        messages = [{"role": "system", "content": "Speak in verse."}, {"role": "user", "content": "Who art thou?"}]
        chat = client.chat.completions.create(model="chat-model", messages=messages, max_tokens=10, temperature=0,
                                              logprobs=True, top_logprobs=3)
        ids = [trained.tokenizer.bos_id, *trained.tokenizer.encode_with_specials(
            "<|im_start|>system\nSpeak in verse.<|im_end|>\n<|im_start|>user\nWho art thou?<|im_end|>\n"
            "<|im_start|>assistant\n").tolist()]
        assert end in ids  # the markers are the special tokens, not their spelling
        reference = generate(trained.model, ids, 10, tokenizer=trained.tokenizer, stop_tokens=[end])[0]
        assert chat.choices[0].message.content == reference.text
        assert chat.usage.prompt_tokens == len(ids)
        assert len(chat.choices[0].logprobs.content) == len(reference.tokens)
        assert all(len(entry.top_logprobs) == 3 for entry in chat.choices[0].logprobs.content)

        pieces = client.chat.completions.create(model="chat-model", messages=messages, max_tokens=10, temperature=0,
                                                stream=True)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in pieces) == reference.text

        sampled = client.completions.create(model="chat-model", prompt=[prompt, "Now is the winter"], max_tokens=8, n=2,
                                            temperature=1.0, top_p=0.9, seed=7, extra_body={"top_k": 20, "repetition_penalty": 1.2})
        again = client.completions.create(model="chat-model", prompt=[prompt, "Now is the winter"], max_tokens=8, n=2,
                                          temperature=1.0, top_p=0.9, seed=7, extra_body={"top_k": 20, "repetition_penalty": 1.2})
        assert [c.index for c in sampled.choices] == [0, 1, 2, 3]
        assert [c.text for c in sampled.choices] == [c.text for c in again.choices]  # seeded
        stopped = client.completions.create(model="chat-model", prompt=prompt, max_tokens=12, temperature=0,
                                            stop=[expected.text[4:7]])
        assert stopped.choices[0].text == expected.text[: expected.text.index(expected.text[4:7])]
        assert stopped.choices[0].finish_reason == "stop"


def test_a_checkpoint_without_a_chat_template_refuses_chat_and_serves_completions(tmp_path):
    run = random_run("transformer", tmp_path / "plain")
    with serving(run) as server:
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            server.client.chat.completions.create(model="plain", messages=[{"role": "user", "content": "hi"}])
        assert server.client.completions.create(model="plain", prompt="hi", max_tokens=3).choices[0].finish_reason
        assert server.healthy()


# --- continuous batching ---------------------------------------------------------------------------


def test_32_concurrent_greedy_requests_equal_strata_generate_alone(tmp_path, shakespeare):
    """32 clients at once against one tiny hybrid; each answer is what ``strata generate`` gives
    for its prompt alone, and the engine really decoded them together."""
    run = random_run("inter", tmp_path / "inter")
    lines = [line for line in shakespeare.splitlines() if len(line) > 10]
    prompts = [" ".join(lines[7 * i : 7 * i + 1 + i % 4])[: 20 + 9 * i] for i in range(32)]  # 20 .. 300 bytes
    trained = from_pretrained(run)
    expected = [generate(trained.model, prompt, 40, tokenizer=trained.tokenizer)[0] for prompt in prompts]
    with serving(run, "--snapshot-every", "64") as server:
        def ask(prompt):
            answer = server.client.completions.create(model="inter", prompt=prompt, max_tokens=40, temperature=0)
            return answer.choices[0]

        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(ask, prompts))
        metrics = server.metrics()
    assert [a.text for a in answers] == [e.text for e in expected]
    assert [a.finish_reason for a in answers] == [{"eos": "stop"}.get(e.finish_reason, e.finish_reason) for e in expected]
    assert metrics["strata_decoded_rows_total"] / metrics["strata_decode_steps_total"] > 4  # batched, not one by one
    for name in ("time_to_first_token_seconds", "request_duration_seconds"):
        buckets = [value for key, value in metrics.items() if key.startswith(f"strata_{name}_bucket")]
        assert buckets == sorted(buckets) and buckets[-1] == metrics[f"strata_{name}_count"] == 32
    assert metrics["strata_request_duration_seconds_sum"] > metrics["strata_time_to_first_token_seconds_sum"] > 0


def test_latency_histograms_count_each_observation_in_its_cumulative_buckets():
    histogram = Histogram((0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 1.0, 3.0):  # a bound belongs to its bucket (le: less or equal)
        histogram.observe(seconds)
    assert histogram.samples("x") == [('x_bucket{le="0.1"}', 2), ('x_bucket{le="1.0"}', 4), ('x_bucket{le="+Inf"}', 5),
                                      ("x_sum", 4.65), ("x_count", 5)]


def test_a_step_prefills_waiting_prompts_up_to_its_token_budget(tmp_path):
    """Six prompts wait at once. Each step reads whole blocks, oldest prompt first, until its
    ``prefill_tokens`` are spent (one block at least), then decodes: one block a step at the
    smallest budget, every prompt before the first decoding step at a large one. The greedy
    answers are the same at every budget, and what ``strata generate`` gives each prompt alone."""
    trained = from_pretrained(random_run("inter", tmp_path / "inter"))
    prompts = [("Now is the winter of our discontent made glorious summer " * 2)[: 19 + 9 * i] for i in range(6)]
    ids = [[trained.tokenizer.bos_id, *trained.tokenizer.encode(prompt.encode()).tolist()] for prompt in prompts]
    expected = [generate(trained.model, prompt, 12, tokenizer=trained.tokenizer)[0].tokens for prompt in prompts]
    block, total = 16, sum(len(prompt) for prompt in ids)  # 20 .. 65 tokens: 2 .. 5 blocks each
    for budget in (block, 64, 10 * total):
        engine = Engine(trained.model, trained.tokenizer, block=block, prefill_tokens=budget)
        steps: list[list[int]] = []  # the prompt tokens each step reads
        iterate = engine._iterate
        engine._iterate = lambda: (steps.append([]), iterate())
        hook = trained.model.register_forward_pre_hook(
            lambda _model, args: None if args[1] is engine._cache else steps[-1].append(args[0].shape[1]))
        answers, done = [[] for _ in ids], []

        def listen(index):
            return lambda event: (answers[index].append(event.token) if isinstance(event, Token) else
                                  done.append(index) if isinstance(event, Done) else None)

        for index, prompt in enumerate(ids):
            engine.submit(Request(prompt, Sampling(max_tokens=12, temperature=0), listen(index)))
        try:
            engine.run(until=lambda: len(done) == len(ids))
        finally:
            hook.remove()
        read = [sum(step) for step in steps if step]
        assert read == [sum(step) for step in steps[: len(read)]]  # no step reads nothing while prompts wait
        assert sum(read) == total and all(size <= max(budget, block) for size in read)
        assert all(size + block > budget for size in read[:-1])  # a step stops only when the next block would not fit
        if budget == block:
            assert len(read) == sum(-(-len(prompt) // block) for prompt in ids)
        if budget > total:
            assert read == [total]
        assert [[token for token in answer if token is not None] for answer in answers] == expected, budget


@pytest.mark.parametrize("family", ["swa", "intra", "gdn", "aunet2"])
def test_every_kind_of_cache_joins_and_leaves_the_batch(tmp_path, family):
    """Ring buffers, intra-layer hybrid caches, Gated DeltaNet states and AU-Net stage caches in a
    batch that requests join and leave (8 at once, of different lengths and max_tokens)."""
    run = random_run(family, tmp_path / family)
    prompts = [("Now is the winter of our discontent " * 3)[: 5 + 11 * i] for i in range(8)]
    lengths = [10 + 7 * i for i in range(8)]
    trained = from_pretrained(run)
    expected = [generate(trained.model, prompt, n, tokenizer=trained.tokenizer)[0].text for prompt, n in zip(prompts, lengths)]
    with serving(run, "--snapshot-every", "16") as server:
        def ask(job):
            prompt, n = job
            return server.client.completions.create(model=family, prompt=prompt, max_tokens=n, temperature=0).choices[0].text

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(ask, zip(prompts, lengths))) == expected


# --- prefix caching --------------------------------------------------------------------------------


def test_the_prefix_cache_keeps_chains_and_evicts_least_recently_used_leaves_first():
    cache = PrefixCache(block=2, capacity=10)
    a, b = [1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 9, 9, 9]
    for end in (2, 4, 6):
        cache.insert(a[:end], f"a{end}", 3)
    assert cache.lookup(a) == ["a2", "a4", "a6"]
    assert cache.lookup(a[:6]) == ["a2", "a4"]  # one token is always left to prefill
    assert cache.lookup(b) == ["a2", "a4"]  # the shared blocks
    cache.insert([5, 5, 5, 5], "orphan", 1)  # its first block is not stored: no lookup could reach it
    assert len(cache) == 3
    cache.insert(b[:6], "b6", 3)  # 12 bytes > 10: the least recently used block goes, a leaf (a6)
    assert cache.lookup(a) == ["a2", "a4"] and cache.lookup(b) == ["a2", "a4", "b6"] and cache.nbytes == 9
    cache.insert([7, 7], "c2", 3)  # a2 is younger than its blocks; evicting it would take them too
    assert cache.lookup(b) == ["a2", "a4"] and cache.nbytes == 9  # b6 was the oldest
    assert PrefixCache(block=2, capacity=0).wants([1, 2]) is False


def test_a_chat_template_from_tokenizer_config_and_its_errors(tmp_path, shakespeare):
    tokenizer = llama_like(shakespeare[:50_000], vocab_size=400)
    tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    named = [{"name": "tool_use", "template": "unused"}, {"name": "default", "template": CHAT_TEMPLATE.replace(
        "{% for", "{% if messages[0].role != 'system' %}{{ raise_exception('a system message comes first') }}{% endif %}"
        "{% for")}]
    save_with_config(tokenizer, tmp_path, bos_token=BOS, eos_token=EOS, chat_template=named)
    template = chat_template(load_hf_tokenizer(tmp_path))
    ids = template.encode([{"role": "system", "content": "Be brief."}])
    assert ids[0] == tokenizer.token_to_id(BOS) and ids[1] == tokenizer.token_to_id("<|im_start|>")
    assert ids.count(tokenizer.token_to_id("<|im_end|>")) == 1
    with pytest.raises(TemplateError, match="a system message comes first"):
        template.encode([{"role": "user", "content": "hi"}])
    assert chat_template(ByteTokenizer()) is None


def test_the_chat_template_travels_with_the_tokenizer_through_convert_and_fine_tuning(chat_run, tmp_path, shakespeare):
    """A run's template and end token go with its tokenizer: exported to Hugging Face (which reads
    the template), converted back, and fine-tuned from, each serves chat as the original."""
    from transformers import AutoTokenizer

    from strata.cli import main

    run, end = chat_run
    messages = [{"role": "user", "content": "Who goes there?"}]
    expected = chat_template(from_pretrained(run).tokenizer).encode(messages)
    assert main(["convert", str(run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert main(["convert", str(tmp_path / "hf"), "--to", "strata", "--out", str(tmp_path / "back")]) == 0
    (tmp_path / "text.txt").write_text(shakespeare[:20_000])
    assert main(["train", str(TINY / "transformer.yaml"), "--init-from", str(tmp_path / "back"), "--data",
                 str(tmp_path / "text.txt"), "--steps", "1", "--out", str(tmp_path / "tuned"), "--quiet",
                 "train.batch_size=2", "train.eval_bytes=1024"]) == 0
    for folder in ("hf", "back", "tuned"):
        template = chat_template(from_pretrained(tmp_path / folder).tokenizer)
        assert template.encode(messages) == expected and template.end_tokens == {end}, folder
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").chat_template == CHAT_TEMPLATE


@pytest.mark.parametrize("family", ["transformer", "mamba2", "intra"])
def test_a_prefix_hit_returns_the_cold_tokens_and_logprobs(tmp_path, family):
    """Two prompts share 100 tokens. On a server with the prefix cache, the second restores the
    first's blocks (usage says so); on one without, it runs cold. Tokens and log-probabilities
    are equal, bit for bit (single-threaded servers, so that the two processes round alike)."""
    run = random_run(family, tmp_path / family, "model.context_length=256")
    shared = bytes(range(32, 132)).decode("latin-1")
    first = shared + " first"
    second = shared + " and then the second, which goes on long enough to span blocks of its own"  # 176 tokens

    def answers(server):
        results = []
        for prompt in (first, second, second):
            answer = server.client.completions.create(model=family, prompt=prompt, max_tokens=16, temperature=0, logprobs=1)
            results.append(answer)
        return results

    with serving(run, "--snapshot-every", "32", env=REPRODUCIBLE_BLAS) as cached:
        hits = answers(cached)
        metrics = cached.metrics()
    with serving(run, "--snapshot-every", "32", "--cache-memory", "0", env=REPRODUCIBLE_BLAS) as cold:
        colds = answers(cold)
    assert [a.usage.prompt_tokens_details.cached_tokens for a in hits] == [0, 96, 160]
    assert [a.usage.prompt_tokens_details.cached_tokens for a in colds] == [0, 0, 0]
    assert metrics["strata_prefix_hits_total"] == 2
    for hit, reference in zip(hits, colds, strict=True):
        assert hit.choices[0].logprobs.tokens == reference.choices[0].logprobs.tokens
        assert hit.choices[0].logprobs.token_logprobs == reference.choices[0].logprobs.token_logprobs
        assert hit.choices[0].logprobs.top_logprobs == reference.choices[0].logprobs.top_logprobs


# --- limits and faults -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    """One slot, one place in the queue: a Mamba-2 model (no context limit, so a long request is
    easy to make) and a transformer's context check on the other server below."""
    run = random_run("mamba2", tmp_path_factory.mktemp("faults") / "mamba")
    with serving(run, "--max-batch", "1", "--max-queue", "1") as server:
        yield server


def stream_request(server: Server, max_tokens: int):
    """A streaming completion left open; returns (response, the first chunk's bytes)."""
    body = json.dumps({"model": server.name, "prompt": "go", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    request = urllib.request.Request(f"{server.base}/v1/completions", data=body, headers={"content-type": "application/json"})
    response = urllib.request.urlopen(request, timeout=60)
    return response, response.readline()


def wait_for(condition, seconds: float = 30) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_a_full_queue_gets_429_and_a_client_that_leaves_frees_its_slot(small_server):
    server = small_server
    running, first = stream_request(server, 100_000)  # holds the one slot
    assert first.startswith(b"data: ")
    waiting = threading.Thread(target=lambda: post(f"{server.base}/v1/completions",
                                                   {"model": server.name, "prompt": "wait", "max_tokens": 4}))
    waiting.start()
    assert wait_for(lambda: server.metrics()["strata_queue_length"] == 1)
    status, body = post(f"{server.base}/v1/completions", {"model": server.name, "prompt": "more", "max_tokens": 4})
    assert status == 429 and "busy" in body["error"]["message"]
    assert server.healthy()

    generated = server.metrics()["strata_generated_tokens_total"]
    running.close()  # the client goes away mid-stream
    waiting.join(timeout=60)  # the waiting request got the slot and finished
    assert not waiting.is_alive()
    assert wait_for(lambda: server.metrics()["strata_batch_size"] == 0)
    assert server.metrics()["strata_generated_tokens_total"] < generated + 5_000  # stopped long before 100,000
    assert server.healthy()


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    ({"model": "mamba", "prompt": "x", "temperature": "hot"}, 422, "temperature"),
    ({"model": "mamba", "prompt": "x", "max_tokens": 0}, 422, "max_tokens"),
    ({"model": "mamba", "prompt": "x", "top_p": 1.5}, 422, "top_p"),
    ({"model": "mamba", "prompt": "x", "n": 100}, 422, "n"),
    ({"model": "mamba", "prompt": "x", "logprobs": 9}, 422, "logprobs"),
    ({"model": "mamba", "prompt": "x", "best_of": 2}, 422, "best_of"),
    ({"model": "mamba", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
    ({"model": "mamba", "prompt": [1, 2, 999]}, 400, "prompt"),
    ({"model": "mamba"}, 422, "prompt"),
    ({"model": "other", "prompt": "x"}, 404, "model"),
])
def test_bad_requests_are_refused_with_the_field_named(small_server, body, status, param):
    got, answer = post(f"{small_server.base}/v1/completions", body)
    assert got == status
    assert answer["error"]["param"] == param and answer["error"]["message"]
    assert small_server.healthy()


def test_prompt_and_max_tokens_are_checked_against_the_context(tmp_path):
    run = random_run("transformer", tmp_path / "short", "model.context_length=64")
    with serving(run) as server:
        status, answer = post(f"{server.base}/v1/completions", {"model": "short", "prompt": "x" * 80})
        assert status == 400 and answer["error"]["param"] == "prompt" and "context of 64" in answer["error"]["message"]
        assert server.healthy()
        status, answer = post(f"{server.base}/v1/completions", {"model": "short", "prompt": "x" * 40, "max_tokens": 30})
        assert status == 400 and answer["error"]["param"] == "max_tokens" and "at most 23" in answer["error"]["message"]
        assert server.healthy()


def test_sigterm_drains_running_requests_and_exits(tmp_path):
    run = random_run("mamba2", tmp_path / "draining")
    with serving(run) as server:
        response, first = stream_request(server, 300)
        server.process.send_signal(signal.SIGTERM)
        rest = response.read().decode()
        assert rest.rstrip().endswith("data: [DONE]")
        events = [json.loads(line[6:]) for line in (first.decode() + rest).splitlines() if line.startswith("data: {")]
        assert events[-1]["usage"]["completion_tokens"] == 300  # the whole answer, after SIGTERM
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        assert server.process.wait(timeout=60) == 0

"""strata serve under load: continuous batching against one request at a time, prefix hits against
cold prompts, and transformers' own server on the same weights.

    python benchmarks/serve.py [--requests 64] [--max-tokens 64] [--clients 1 8 32] [--rounds 3] [--shared 2048]
                               [--trials 5] [--prefill-tokens 1024 [256 ...]] [--no-peer]
                               [--json results.jsonl]

The model is the tiny inter-layer hybrid (1 attention + 5 Mamba-2 blocks) with random weights,
a 2,000-token byte-level BPE trained on Shakespeare and a 4K context, saved as a strata run and
exported (``save_hf``) as the Hugging Face directory the peer serves. The requests are the same
for every server: Shakespeare passages of 40-300 tokens, greedy, ``--max-tokens`` new tokens each
(strata is told ``ignore_eos`` so every answer has that length; the peer may stop at EOS, and
throughput counts the tokens each server reports in ``usage``). ``--clients`` threads send them
through the official ``openai`` client, each waiting for its answer before sending the next:
1 client is sequential serving. Throughput is generated tokens over the wall time of all requests;
latency is per request (p50, p99). Each server runs ``--rounds`` rounds of every client count in
turn and reports the medians, and the median of each round's ratio to its 1-client run: the
machine's slow spells then fall on sequential and concurrent serving alike.

Prefix caching: ``--trials`` times, a ``--shared``-token passage (a new one each trial, so the
first request is cold) is sent with one ending, then with another; time to first token is read
from the stream (the first chunk with text). Reported: median cold and hit TTFT and their ratio.

The peer is ``transformers serve`` (it needs ``accelerate``) on the exported directory: its
default generation, ``--compile``, and ``--continuous-batching`` where it starts. Both servers run
on ``--device`` (the CPU in float32 by default; a GPU in bfloat16).
Servers run one at a time, each as its own process with the machine's default threads.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from results import append_json_lines

from strata import build_model, load_config
from strata.data import corpus_path, load_hf_tokenizer
from strata.interop.pretrained import save_hf
from strata.train.runs import TrainedModel, save_as_run

ROOT = Path(__file__).resolve().parents[1]
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def build_model_directories(folder: Path, vocab_size: int) -> tuple[Path, Path, str]:
    """(the strata run, its Hugging Face export, the corpus text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = corpus_path("shakespeare").read_text(encoding="utf-8")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([text[:300_000]], trainer)
    (folder / "tokenizer").mkdir()
    tokenizer.save(str(folder / "tokenizer" / "tokenizer.json"))
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS}))
    hf_tokenizer = load_hf_tokenizer(folder / "tokenizer")
    torch.manual_seed(0)
    config = load_config(ROOT / "configs/tiny/inter.yaml", [f"model.vocab_size={hf_tokenizer.vocab_size}",
                                                            "model.context_length=4096", "model.init_std=0.1"])
    trained = TrainedModel(config, build_model(config).eval(), hf_tokenizer, folder)
    run = save_as_run(trained, folder / "inter")
    return run, save_hf(trained.model, hf_tokenizer, folder / "inter-hf"), text


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """A server process on 127.0.0.1 that answers the OpenAI API at ``base``/v1."""

    def __init__(self, command: list[str], port: int, log: Path, ready_path: str):
        self.port, self.base = port, f"http://127.0.0.1:{port}"
        self.log = log.open("w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"exited with {self.process.returncode}: {log.read_text()[-600:]}")
            try:
                with urllib.request.urlopen(self.base + ready_path, timeout=5):
                    break
            except OSError:
                if time.time() > deadline:
                    self.stop()
                    raise RuntimeError("did not answer within 300 s") from None
                time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def client(server: Server):
    import openai

    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="none", max_retries=0, timeout=600)


def load(server: Server, model: str, prompts: list[str], max_tokens: int, clients: int, extra: dict) -> dict:
    """Every prompt through ``clients`` concurrent clients: throughput and latencies."""
    api = client(server)

    def ask(prompt: str) -> tuple[float, int]:
        start = time.perf_counter()
        answer = api.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=extra)
        return time.perf_counter() - start, answer.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        timings = list(pool.map(ask, prompts))
    wall = time.perf_counter() - start
    latencies = sorted(latency for latency, _ in timings)
    tokens = sum(count for _, count in timings)
    return {"clients": clients, "requests": len(prompts), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "p50_s": statistics.median(latencies), "p99_s": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]}


def time_to_first_token(api, model: str, prompt: str) -> float:
    start = time.perf_counter()
    for chunk in api.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].text:
            return time.perf_counter() - start
    return time.perf_counter() - start


def prefix_trials(server: Server, model: str, text: str, tokenizer, shared: int, trials: int) -> dict:
    """Median TTFT of a prompt whose ``shared``-token prefix is new (cold) and of one that reuses it."""
    colds, hits = [], []
    api = client(server)  # one client, as an application keeps one: its set-up is not the server's time
    time_to_first_token(api, model, "Warm up")
    ids = tokenizer.encode(text.encode()).tolist()
    for trial in range(trials):
        start = 10_000 + trial * (shared + 500)
        prefix = tokenizer.decode(ids[start : start + shared]).decode("utf-8", errors="ignore")
        colds.append(time_to_first_token(api, model, prefix + " Say first, what is"))
        hits.append(time_to_first_token(api, model, prefix + " And then, who goes there"))
    cold, hit = statistics.median(colds), statistics.median(hits)
    return {"shared_tokens": shared, "trials": trials, "cold_ttft_s": cold, "hit_ttft_s": hit, "speedup": cold / hit}


def passages(text: str, tokenizer, count: int) -> list[str]:
    ids = tokenizer.encode(text.encode()).tolist()
    lengths = [40 + (37 * i) % 261 for i in range(count)]  # 40 .. 300 tokens
    return [tokenizer.decode(ids[500 * i : 500 * i + n]).decode("utf-8", errors="ignore") for i, n in enumerate(lengths)]


def serve_all(name: str, server: Server, model: str, prompts, args, extra: dict) -> list[dict]:
    """``--rounds`` rounds of every client count in turn (so a slow spell of the machine lands on
    all of them alike); a row per client count with the medians of its rounds, and, where 1 client
    ran, the median over rounds of each round's ratio to it."""
    load(server, model, prompts[:2], 4, 1, extra)  # warm-up
    rounds: dict[int, list[dict]] = {clients: [] for clients in args.clients}
    for index in range(args.rounds):
        for clients in args.clients:
            row = load(server, model, prompts, args.max_tokens, clients, extra)
            rounds[clients].append(row)
            print(f"{name:32} {clients:3} clients: {row['tokens_per_s']:8.1f} tok/s, p50 {row['p50_s']:6.2f} s, "
                  f"p99 {row['p99_s']:6.2f} s (round {index + 1} of {args.rounds})", flush=True)
    rows = []
    for clients, measured in rounds.items():
        row = {"server": name, "clients": clients, "rounds": len(measured), "requests": len(prompts),
               **{key: statistics.median(run[key] for run in measured) for key in ("tokens", "wall_s", "tokens_per_s", "p50_s", "p99_s")}}
        if 1 in rounds:
            ratios = [run["tokens_per_s"] / alone["tokens_per_s"] for run, alone in zip(measured, rounds[1], strict=True)]
            row["vs_sequential"], row["vs_sequential_rounds"] = statistics.median(ratios), ratios
        print(f"{name:32} {clients:3} clients: {row['tokens_per_s']:8.1f} tok/s, p50 {row['p50_s']:6.2f} s, "
              f"p99 {row['p99_s']:6.2f} s (median of {len(measured)})", flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of every client count, in turn; medians are reported (default 3)")
    parser.add_argument("--shared", type=int, default=2048, help="tokens of the shared prefix (default 2048)")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--prefill-tokens", type=int, nargs="+", default=[1024],
                        help="strata serve's --prefill-tokens; several: a server for each (default 1024)")
    parser.add_argument("--no-peer", action="store_true", help="skip transformers serve")
    parser.add_argument("--device", default="cpu", help="where both servers run the model: cpu (default) or cuda")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="strata-serve-bench-"))
    try:
        run, hf_dir, text = build_model_directories(folder, args.vocab)
        tokenizer = load_hf_tokenizer(run)
        prompts = passages(text, tokenizer, args.requests)
        where = (torch.cuda.get_device_name() if args.device != "cpu"
                 else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
        print(f"{where}, torch {torch.__version__}; "
              f"tiny inter (random weights), {args.requests} requests of 40-300 tokens, {args.max_tokens} new tokens each")
        rows = []
        for budget in args.prefill_tokens:
            name = "strata serve" if len(args.prefill_tokens) == 1 else f"strata serve --prefill-tokens {budget}"
            rows += strata_rows(name, run, budget, prompts, text, tokenizer, args, folder,
                                with_prefix=budget == args.prefill_tokens[0])
        if not args.no_peer:
            rows += peer_rows(hf_dir, prompts, args, folder)
        append_json_lines(args.json, rows)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def strata_rows(name: str, run: Path, budget: int, prompts, text: str, tokenizer, args, folder: Path,
                with_prefix: bool) -> list[dict]:
    """strata serve's load rows (each with its ratio to the 1-client row) and, ``with_prefix``, its
    prefix-hit row."""
    port = free_port()
    strata = Server([sys.executable, "-m", "strata.cli", "serve", str(run), "--port", str(port), "--quiet",
                     "--device", args.device, *(["--dtype", "bfloat16"] if args.device != "cpu" else []),
                     "--prefill-tokens", str(budget), "--model-name", "inter"], port, folder / "strata.log", "/health")
    try:
        rows = serve_all(name, strata, "inter", prompts, args, {"ignore_eos": True})
        prefix = prefix_trials(strata, "inter", text, tokenizer, args.shared, args.trials) if with_prefix else None
    finally:
        strata.stop()
    for row in rows:
        row["prefill_tokens"] = budget
        if row["clients"] == 32 and "vs_sequential" in row:
            each = ", ".join(f"{ratio:.2f}" for ratio in row["vs_sequential_rounds"])
            print(f"{name}: 32 clients against sequential: {row['vs_sequential']:.2f}x the throughput, median of "
                  f"{row['rounds']} rounds ({each}; target 4x)")
    if prefix:
        print(f"prefix hit on a {args.shared}-token shared prompt: TTFT {prefix['cold_ttft_s'] * 1e3:.0f} ms cold, "
              f"{prefix['hit_ttft_s'] * 1e3:.0f} ms hit, {prefix['speedup']:.1f}x (target 5x)")
        rows.append({"server": name, **prefix})
    return rows


def peer_rows(hf_dir: Path, prompts, args, folder: Path) -> list[dict]:
    rows = []
    variants = (("transformers serve", []), ("transformers serve --compile", ["--compile"]),
                ("transformers serve --continuous-batching", ["--continuous-batching"]))
    for name, flags in variants:
        port = free_port()
        dtype = "float32" if args.device == "cpu" else "bfloat16"
        command = ["transformers", "serve", str(hf_dir), "--device", args.device, "--dtype", dtype, "--port", str(port),
                   "--host", "127.0.0.1", *flags]
        try:
            peer = Server(command, port, folder / "peer.log", "/v1/models")
        except (RuntimeError, OSError) as error:
            print(f"{name}: not run: {str(error).strip().splitlines()[-1]}", flush=True)
            rows.append({"server": name, "not_run": str(error).strip().splitlines()[-1]})
            continue
        try:
            rows += serve_all(name, peer, str(hf_dir), prompts, args, {})
        except Exception as error:  # noqa: BLE001 - a peer that fails under load is reported, not fatal
            print(f"{name}: failed: {error}", flush=True)
            rows.append({"server": name, "failed": str(error)[:300]})
        finally:
            peer.stop()
    return rows


if __name__ == "__main__":
    main()

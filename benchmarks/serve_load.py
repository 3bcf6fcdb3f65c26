"""`sftlab serve` under load: N streaming requests sent C at a time on loopback, against the same requests sent
one at a time, in one run (interleaved A B A B A B, medians of 3).

    .venv/bin/python benchmarks/serve_load.py [--requests 32] [--concurrency 8] [--max_tokens 32] [--adapter RUN]

The server is `sftlab serve` itself, started as a subprocess (the tiny GLM-4 base by default: greedy, it rarely
stops early, so both variants generate about the same tokens). Prints requests/s, p50/p95 latency and time to
first token per variant, and the throughput ratio. Target (issue #12): >= 3x at concurrency 8 on 2 CPU cores.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    target = ["--adapter", args.adapter] if args.adapter else ["--model", "sftlab:tiny-glm4"]
    log = tempfile.TemporaryFile("w+")
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("sftlab")), "serve", *target, "--port", str(port), "--device", "cpu",
         "--max_tokens", str(args.max_tokens), "--max_batch", str(args.concurrency)],
        # its access log (a line per request) to a file: a pipe nobody reads would fill and stall the server
        stdout=subprocess.DEVNULL, stderr=log, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.2)
    server.kill()
    log.seek(0)
    raise SystemExit(f"the server did not start: {log.read()[-2000:]}")


def one_request(client: httpx.Client, url: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(latency, time to first token, status) of one streaming request."""
    start, first = time.perf_counter(), None
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True}
    with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as response:
        for line in response.iter_lines():
            if first is None and line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get(
                    "content"):
                first = time.perf_counter()
    end = time.perf_counter()
    return end - start, (first or end) - start, response.status_code


def run(url: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    start = time.perf_counter()
    # one client with keep-alive connections, as the openai client does
    with httpx.Client(limits=httpx.Limits(max_connections=concurrency)) as client, \
            ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: one_request(client, url, p, max_tokens), prompts))
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    return {"requests_per_s": len(prompts) / wall, "p50_latency_s": statistics.median(latencies),
            "p95_latency_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
            "p50_ttft_s": statistics.median(r[1] for r in results),
            "errors": sum(r[2] != 200 for r in results)}


def engine_only(args, prompts: list[str]) -> dict[str, float]:
    """The same requests given to the engine in this process, without HTTP: where the time goes."""
    import asyncio

    from sftlab.infer.engine import Engine, Job
    from sftlab.model.load import load_for_inference

    model, tokenizer = load_for_inference(adapter=args.adapter, device="cpu") if args.adapter else \
        load_for_inference(model="sftlab:tiny-glm4", device="cpu")
    engine = Engine(model, tokenizer, max_batch=args.concurrency)
    ids = [engine.renderer.prompt_ids([{"role": "user", "content": p}]) for p in prompts]

    async def run_all(concurrency: int) -> float:
        gate, loop = asyncio.Semaphore(concurrency), asyncio.get_running_loop()

        async def one(prompt):
            async with gate:
                job = Job(prompt, args.max_tokens, 0, 1.0, loop=loop, updates=asyncio.Event())
                engine.submit(job)
                while not job.done:
                    await job.wait()
                engine.release(job)

        start = time.perf_counter()
        await asyncio.gather(*(one(p) for p in ids))
        return len(ids) / (time.perf_counter() - start)

    rates = {1: [], args.concurrency: []}
    for _ in range(args.repeats):
        for concurrency in rates:
            rates[concurrency].append(asyncio.run(run_all(concurrency)))
    engine.close()
    return {c: statistics.median(r) for c, r in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--adapter", help="A run folder to serve instead of the tiny base model.")
    args = parser.parse_args()
    from sftlab.data.load import demo_data_path, read_source

    rows = [r.row for r in read_source(str(demo_data_path()))]
    prompts = [rows[i % len(rows)]["instruction"] for i in range(args.requests)]
    port = free_port()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    server = start_server(args, port)
    url = f"http://127.0.0.1:{port}"
    try:
        run(url, prompts[:args.concurrency], args.concurrency, args.max_tokens)  # warm-up
        runs = {"one at a time": [], f"concurrency {args.concurrency}": []}
        for _ in range(args.repeats):  # interleaved: A B A B A B
            runs["one at a time"].append(run(url, prompts, 1, args.max_tokens))
            runs[f"concurrency {args.concurrency}"].append(run(url, prompts, args.concurrency, args.max_tokens))
        stats = httpx.get(f"{url}/health").json()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"{args.requests} streaming requests, max_tokens {args.max_tokens}, greedy, "
          f"{'--adapter ' + args.adapter if args.adapter else 'sftlab:tiny-glm4'}, loopback, median of {args.repeats}")
    print("| variant | requests/s | p50 latency | p95 latency | p50 time to first token | errors |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    medians = {}
    for name, results in runs.items():
        median = {key: statistics.median(r[key] for r in results) for key in results[0]}
        medians[name] = median
        print(f"| {name} | {median['requests_per_s']:.2f} | {median['p50_latency_s']:.3f} s | "
              f"{median['p95_latency_s']:.3f} s | {median['p50_ttft_s']:.3f} s | {median['errors']:.0f} |")
    one, many = medians.values()
    print(f"ratio (concurrency {args.concurrency} / one at a time, requests/s): "
          f"{many['requests_per_s'] / one['requests_per_s']:.2f}x")
    print(f"server: {stats['batches']} batches, {stats['rows'] / max(1, stats['batches']):.1f} requests per batch, "
          f"{stats['generate_s']:.1f} s generating")
    engine = engine_only(args, prompts)
    one_rate, many_rate = engine.values()
    print(f"profile, the engine alone (same requests, no HTTP, no client in this process's way): one at a time "
          f"{one_rate:.2f} requests/s, concurrency {args.concurrency} {many_rate:.2f} requests/s: "
          f"{many_rate / one_rate:.2f}x")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

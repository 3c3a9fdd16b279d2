"""32 concurrent clients against the serve page on loopback: how many generations are served, how many refused as
busy, and how fast the page itself (GET /) answers meanwhile.

    python -m benchmarks.serve_load --clients 32 [--size tiny]

Starts scripts/serve.py on a free loopback port with the tiny FLUX and three random LoRAs, sends one /compare
submission per client at once (bounded: one request each, a time limit), polls GET / from another thread, stops the
server, prints one JSON line. Every request goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from benchmarks.cases import REPO, Env, lora_dir, model_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 30) -> float:
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=timeout) as response:
        response.read()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--size", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=300, help="seconds the whole load may take")
    args = parser.parse_args()

    env = Env(args.size)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    votes = Path(tempfile.mkdtemp()) / "votes.sqlite"
    # Every client here shares one address, so the per-client limit is raised: this measures the queue.
    server = subprocess.Popen([sys.executable, str(REPO / "scripts/serve.py"), "--pretrained_model_name_or_path",
                               str(model_dir(args.size)), "--lora_dir", str(lora_dir(env)), "--votes_db", str(votes),
                               "--port", str(port), "--max_sequence_length", "64", "--generations_per_minute", "1000"],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            try:
                _get(url + "/", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.5)
        from gradio_client import Client

        outcomes: list[str] = []
        page_latencies: list[float] = []
        refresh_latencies: list[float] = []  # the page-load event, through the queue in a slot of its own
        done = threading.Event()

        def client(i: int) -> None:
            try:
                Client(url + "/", verbose=False).predict("a street at night", "nolan-style", i, args.steps,
                                                         env.resolution, 3.5, api_name="/compare")
                outcomes.append("served")
            except Exception as err:  # the queue answers "full"/"busy"; anything else is counted as an error
                text = str(err).lower()
                outcomes.append("busy" if "full" in text or "busy" in text or "429" in text else f"error: {err}")

        def poll_page() -> None:
            refresher = Client(url + "/", verbose=False)
            while not done.is_set():
                try:
                    page_latencies.append(_get(url + "/"))
                except OSError:
                    page_latencies.append(float("inf"))
                start = time.perf_counter()
                try:
                    refresher.predict(api_name="/styles_refresh")
                    refresh_latencies.append(time.perf_counter() - start)
                except Exception:  # refused while the queue is full
                    refresh_latencies.append(float("inf"))
                time.sleep(0.2)

        poller = threading.Thread(target=poll_page, daemon=True)
        poller.start()
        start = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=max(1.0, args.timeout - (time.perf_counter() - start)))
        done.set()
        poller.join(timeout=30)
        result = {
            "clients": args.clients, "served": outcomes.count("served"), "refused_busy": outcomes.count("busy"),
            "errors": [o for o in outcomes if o.startswith("error")][:3],
            "unfinished": args.clients - len(outcomes), "wall_s": round(time.perf_counter() - start, 1),
            "page_get_median_ms": round(statistics.median(page_latencies) * 1e3, 1) if page_latencies else None,
            "page_get_worst_ms": round(max(page_latencies) * 1e3, 1) if page_latencies else None,
            "page_gets": len(page_latencies),
            "refresh_median_ms": round(statistics.median(refresh_latencies) * 1e3, 1) if refresh_latencies else None,
            "refresh_worst_ms": round(max(refresh_latencies) * 1e3, 1) if refresh_latencies else None,
            "refreshes_refused": sum(1 for t in refresh_latencies if t == float("inf")),
        }
        print(json.dumps(result))
        if result["errors"] or result["unfinished"]:
            raise SystemExit(f"the load run had errors or unfinished clients: {result['errors']}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()

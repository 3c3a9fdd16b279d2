"""The Gradio page over a StyleServer, and the guard in front of it: bound host names only, no foreign origins, no
uploads, every generation through the bounded queue, per-client rate limits, failed logins slowed down.

    serve(server, host="127.0.0.1", port=7860)   # what scripts/serve.py calls
"""

from __future__ import annotations

import collections
import ipaddress
import json
import threading
import time
from urllib.parse import urlsplit

from ddiff_core.serving.server import BASE, RequestError, StyleServer

LOCAL_NAMES = ("127.0.0.1", "localhost", "::1")
WILDCARDS = ("0.0.0.0", "::")
# The only POST routes the page and gradio_client need: joining the queue, cancelling, logging in.
_POST_ROUTES = ("/queue/join", "/cancel", "/login", "/reset")
_CLOSED_GET_ROUTES = ("/startup-events",)  # re-runs the app's start-up (a second queue loop) for anyone who asks
GENERATION_APIS = ("compare", "single", "blind")
MAX_BODY_BYTES = 1 << 20


def _hostname(value: str) -> str:
    """'example.com:7860' -> 'example.com', '[::1]:7860' -> '::1'."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def allowed_names(host: str, extra: tuple[str, ...] = ()) -> set[str]:
    """Host names a request may carry: the bound address (and the loopback names when it is local), plus the names
    the operator allows (required when binding every interface: a browser names the machine, not 0.0.0.0)."""
    names = {host.lower(), *(e.lower() for e in extra)} - set(WILDCARDS)
    try:
        local = ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = host.lower() == "localhost"
    if local:
        names |= set(LOCAL_NAMES)
    return names


class SlidingWindow:
    """At most ``limit`` events per ``seconds`` for each key (a client address)."""

    def __init__(self, limit: int, seconds: float):
        self.limit, self.seconds = limit, seconds
        self._events: dict[str, collections.deque] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        with self._lock:
            if len(self._events) > 10_000:  # many clients: forget the idle ones, so memory stays bounded
                self._events = {k: q for k, q in self._events.items() if q and q[-1] > now - self.seconds}
            events = self._events.setdefault(key, collections.deque())
            while events and events[0] <= now - self.seconds:
                events.popleft()
            if len(events) >= self.limit:
                return False
            events.append(now)
            return True


def _client_key(address: str) -> str:
    """An address to count by: IPv6 clients by their /64 (one host holds a whole /64)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    return str(ipaddress.ip_network(f"{ip}/64", strict=False)) if ip.version == 6 else address


class Guard:
    """ASGI middleware in front of the page: refuses what the page never needs before Gradio sees it.

    Host names and origins (scheme, name and port) must be the bound ones; no uploads; only the POST routes the page
    uses; generation requests limited per client address (the queue-join body is read to tell them from votes);
    failed logins slowed; open connections per address bounded; no CORS headers ever leave.
    """

    def __init__(self, app, *, hosts: set[str], port: int, generation_fns: set[int], generations_per_minute: int,
                 logins_per_10_minutes: int = 10, requests_per_minute: int = 600, connections_per_client: int = 32):
        self.app, self.hosts, self.port = app, hosts, port
        self.origins = {f"{scheme}://{h if ':' not in h else f'[{h}]'}:{port}" for h in hosts for scheme in ("http", "https")}
        self.generation_fns = generation_fns
        self.generations = SlidingWindow(generations_per_minute, 60)
        self.requests = SlidingWindow(requests_per_minute, 60)
        self.logins = SlidingWindow(logins_per_10_minutes, 600)
        self.connections_per_client = connections_per_client
        self._open: collections.Counter = collections.Counter()

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        client = _client_key((scope.get("client") or ("unknown", 0))[0])
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refusal = self._refusal(scope, headers, client)
        body = None
        if refusal is None and scope.get("method") == "POST" and scope["path"].rstrip("/").endswith("/queue/join"):
            body, refusal = await self._read_body(receive)
            if refusal is None and self._generation(body) and not self.generations.allow(client):
                refusal = 429, "busy: too many generations from your address; try again in a minute"
        if refusal is None and self._open[client] >= self.connections_per_client:
            refusal = 429, "too many open connections from your address"
        if refusal is not None:
            return await self._refuse(scope, send, *refusal)
        if body is not None:
            receive = _replay(body)
        self._open[client] += 1
        try:
            await self.app(scope, receive, _without_cors(send))
        finally:
            self._open[client] -= 1
            if not self._open[client]:
                del self._open[client]

    def _refusal(self, scope, headers, client) -> tuple[int, str] | None:
        if _hostname(headers.get("host", "")) not in self.hosts:
            return 421, "this server does not answer to that host name"
        origin = headers.get("origin")
        if origin is not None and _origin(origin, self.port) not in self.origins:
            return 403, "requests from other sites are not accepted"
        if not self.requests.allow(client):
            return 429, "too many requests from your address"
        path = scope["path"].rstrip("/")
        if scope["type"] != "http":
            return None
        if scope.get("method") != "POST":
            return (403, "this route is closed") if path.endswith(_CLOSED_GET_ROUTES) else None
        if path.endswith("/upload"):
            return 403, "this page takes no uploads"
        if not path.endswith(_POST_ROUTES):
            return 403, "this route is closed"  # /run (skips the queue), /call, /stream, /upload_progress, ...
        if path.endswith("/login") and not self.logins.allow(client):
            return 429, "too many login attempts; wait a few minutes"
        return None

    async def _read_body(self, receive) -> tuple[bytes, tuple[int, str] | None]:
        chunks, size = [], 0
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_BODY_BYTES:
                return b"", (413, "request too large")
            if not message.get("more_body"):
                return b"".join(chunks), None

    def _generation(self, body: bytes) -> bool:
        try:
            fn_index = json.loads(body).get("fn_index")
        except (ValueError, AttributeError):
            return True  # unreadable: counted as the costly kind
        return not isinstance(fn_index, int) or fn_index in self.generation_fns

    @staticmethod
    async def _refuse(scope, send, status: int, message: str) -> None:
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        body = message.encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _origin(origin: str, default_port: int) -> str:
    parts = urlsplit(origin.strip().lower())
    host = parts.hostname or ""
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme, default_port)
    return f"{parts.scheme}://{host if ':' not in host else f'[{host}]'}:{port}"


def _replay(body: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}
    return receive


def _without_cors(send):
    """Drops Access-Control-Allow-* headers: the page is same-origin, and credentialed cross-origin reads are not
    something it offers to anyone."""
    async def wrapped(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [(k, v) for k, v in message.get("headers", [])
                                              if not k.lower().startswith(b"access-control-allow")]}
        await send(message)
    return wrapped


def build_app(server: StyleServer, *, default_size: int = 512, default_steps: int = 28):
    """The Gradio page: compare, single image, blind vote, results. Every handler goes through the server's checks;
    the blind tab has no seed input (the server draws it)."""
    import gradio as gr

    def client(request: gr.Request | None) -> str:
        return getattr(getattr(request, "client", None), "host", "") or ""

    def checked(call):
        try:
            return call()
        except RequestError as err:
            raise gr.Error(str(err)) from err

    sizes = list(server.limits.sizes)
    default_size = default_size if default_size in sizes else sizes[0]

    def controls(with_seed: bool = True):
        with gr.Row():
            seed = gr.Number(value=0, precision=0, label="seed", minimum=0, maximum=server.limits.max_seed,
                             visible=with_seed)
            steps = gr.Slider(server.limits.min_steps, server.limits.max_steps, value=default_steps, step=1,
                              label="steps")
            size = gr.Dropdown(sizes, value=default_size, label="size (px, about size² pixels)")
            aspect = gr.Dropdown(list(server.limits.aspects), value=server.limits.aspects[0], label="frame (W:H)")
            guidance = gr.Slider(0.0, server.limits.max_guidance, value=3.5, step=0.5, label="guidance")
        return seed, steps, size, guidance, aspect

    def status() -> str:
        missing = server.unavailable()
        if not missing:
            return ""
        return "**Unavailable LoRAs**\n\n" + "\n".join(f"- `{name}`: {reason}" for name, reason in sorted(missing.items()))

    styles = server.styles()
    with gr.Blocks(title="ddiff: base vs LoRA", delete_cache=(600, 1800)) as app:
        gr.Markdown("# Base vs LoRA\nOne set of base weights; each director's LoRA is a named adapter.")
        unavailable = gr.Markdown(status())
        with gr.Tab("Compare"):
            prompt = gr.Textbox(label="prompt", max_lines=3, elem_id="compare-prompt")
            # allow_custom_value: a LoRA added after start-up is accepted; the server checks every name itself.
            style = gr.Dropdown(styles, value=styles[0] if styles else None, label="LoRA", elem_id="compare-style",
                                allow_custom_value=True)
            seed, steps, size, guidance, aspect = controls()
            go = gr.Button("Compare", variant="primary", elem_id="compare-button")
            with gr.Row():
                base_image = gr.Image(label="base", type="pil", elem_id="base-image")
                lora_image = gr.Image(label="LoRA", type="pil", elem_id="lora-image")

            def compare(p, s, sd, st, sz, g, a):
                return checked(lambda: server.compare(p, s, sd, st, sz, g, a))

            go.click(compare, [prompt, style, seed, steps, size, guidance, aspect], [base_image, lora_image],
                     api_name="compare",
                     concurrency_id="generate")
        with gr.Tab("Single"):
            prompt1 = gr.Textbox(label="prompt", max_lines=3)
            style1 = gr.Dropdown([BASE, *styles], value=styles[0] if styles else BASE, label="model",
                                 allow_custom_value=True)
            seed1, steps1, size1, guidance1, aspect1 = controls()
            go1 = gr.Button("Generate", variant="primary")
            image1 = gr.Image(label="image", type="pil")

            def single(p, s, sd, st, sz, g, a):
                return checked(lambda: server.single(p, s, sd, st, sz, g, a))

            go1.click(single, [prompt1, style1, seed1, steps1, size1, guidance1, aspect1], image1, api_name="single",
                      concurrency_id="generate")
        with gr.Tab("Blind vote"):
            prompt2 = gr.Textbox(label="prompt", max_lines=3)
            style2 = gr.Dropdown(styles, value=styles[0] if styles else None, label="LoRA", allow_custom_value=True)
            _, steps2, size2, guidance2, aspect2 = controls(with_seed=False)
            token = gr.Textbox(visible=False)  # the pair's id; its seed and order stay on the server
            go2 = gr.Button("Show a pair", variant="primary")
            with gr.Row():
                left = gr.Image(label="A", type="filepath")
                right = gr.Image(label="B", type="filepath")
            with gr.Row():
                pick_left, pick_right = gr.Button("A is better"), gr.Button("B is better")
            result = gr.Markdown()

            def blind(p, s, st, sz, g, a, request: gr.Request):
                left_file, right_file, pair = checked(lambda: server.blind(p, s, st, sz, g, a, client(request)))
                return str(left_file), str(right_file), pair

            go2.click(blind, [prompt2, style2, steps2, size2, guidance2, aspect2], [left, right, token], api_name="blind",
                      concurrency_id="generate")
        with gr.Tab("Results"):
            table = gr.Dataframe(headers=["LoRA", "votes", "LoRA wins", "win rate", "95% interval"],
                                 value=server.results_table(), interactive=False)

        def cast(token_value, side, request: gr.Request):
            winner = checked(lambda: server.vote(token_value, side, client(request)))
            return f"You picked the {'LoRA' if winner == 'lora' else 'base'} image.", server.results_table(), ""

        def cast_left(token_value, request: gr.Request):
            return cast(token_value, "left", request)

        def cast_right(token_value, request: gr.Request):
            return cast(token_value, "right", request)

        pick_left.click(cast_left, token, [result, table, token], api_name="vote_left")
        pick_right.click(cast_right, token, [result, table, token], api_name="vote_right")

        def vote_api(token_value, side, request: gr.Request):
            winner = checked(lambda: server.vote(token_value, side, client(request)))
            return winner, server.results_table()

        hidden = [gr.Textbox(visible=False) for _ in range(3)]
        hidden_table = gr.Dataframe(visible=False)
        api_vote = gr.Button(visible=False)
        api_vote.click(vote_api, hidden[:2], [hidden[2], hidden_table], api_name="vote")

        def refresh():
            names = server.styles()
            first = names[0] if names else None
            return (gr.update(choices=names, value=first), gr.update(choices=[BASE, *names]),
                    gr.update(choices=names, value=first), status(), server.results_table())

        app.load(refresh, None, [style, style1, style2, unavailable, table], api_name="styles_refresh")
    return app


def serve(server: StyleServer, *, host: str = "127.0.0.1", port: int = 7860, auth: tuple[str, str] | None = None,
          allowed_hosts: tuple[str, ...] = (), default_size: int = 512, default_steps: int = 28,
          generations_per_minute: int = 10, queue_size: int = 24) -> None:
    """Runs the page until interrupted: one generation at a time (all generation events share one slot), a bounded
    queue, no direct API runs (they would skip the queue), the guard in front."""
    import gradio as gr
    import uvicorn
    from fastapi import FastAPI

    blocks = build_app(server, default_size=default_size, default_steps=default_steps)
    # Adapter selection is pipeline-wide: one generation at a time. api_open=False closes /run, which skips the queue.
    # Votes and page loads wait in the same queue but in slots of their own, so they never wait for an image.
    blocks.queue(default_concurrency_limit=1, max_size=queue_size, api_open=False)
    generation_fns = {i for i, fn in blocks.fns.items() if fn.api_name in GENERATION_APIS}
    outer = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app = gr.mount_gradio_app(outer, blocks, path="/", server_name=host, server_port=port, auth=auth, show_error=False,
                              ssr_mode=False, enable_monitoring=False, mcp_server=False, run_history=False)
    guarded = Guard(app, hosts=allowed_names(host, allowed_hosts), port=port, generation_fns=generation_fns,
                    generations_per_minute=generations_per_minute)
    # proxy_headers=False: X-Forwarded-For must not let a client choose the address its limits are counted by.
    uvicorn.run(guarded, host=host, port=port, log_level="warning", timeout_keep_alive=5, limit_concurrency=256,
                proxy_headers=False)

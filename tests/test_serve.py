"""scripts/serve.py for real: a running Gradio server driven through gradio_client, and a page in Chromium."""

import os
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

from .conftest import REPO, _free_port


def make_loras(model: Path, root: Path, names, family: str = "flux") -> Path:
    from ddiff_core.families import get_family
    from ddiff_core.tiny import save_tiny_lora

    fam = get_family(family)
    denoiser = fam.load_components(str(model))[fam.denoiser_name]
    for i, name in enumerate(names):
        save_tiny_lora(family, denoiser, root / name, seed=i, trigger=f"<{name}>", base_model=str(model))
    return root


class Server:
    def __init__(self, model, loras, votes, *extra, env=None, client=True):
        self.gradio_client = pytest.importorskip("gradio_client")  # here: tests without a server do not need it
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        cmd = [sys.executable, str(REPO / "scripts/serve.py"), "--pretrained_model_name_or_path", str(model),
               "--lora_dir", str(loras), "--votes_db", str(votes), "--port", str(self.port),
               "--max_sequence_length", "32", *extra]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})})
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited:\n{self.proc.stdout.read()[-3000:]}")
            try:
                urllib.request.urlopen(self.url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError("server did not start")
        self.client = self.gradio_client.Client(self.url, verbose=False) if client else None

    def call(self, api, *args):
        return self.client.predict(*args, api_name=api)

    def http(self, path, *, method="GET", body=b"", headers=None):
        """(status, headers, body) of a plain HTTP request to the server (loopback only)."""
        request = urllib.request.Request(self.url.rstrip("/") + path, data=body if method == "POST" else None,
                                         method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def served(tiny_flux, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    loras = make_loras(tiny_flux, root / "loras", ["nolan-style", "villeneuve-style", "nolan.v2"])
    (loras / "broken").mkdir()  # a corrupt LoRA: a safetensors header claiming 2^60 bytes
    (loras / "broken" / "pytorch_lora_weights.safetensors").write_bytes((2**60).to_bytes(8, "little") + b"{}")
    server = Server(tiny_flux, loras, root / "votes.sqlite", "--generations_per_minute", "1000")
    yield server, loras, root
    server.stop()


def _pixels(image):
    """An image file (what the web API returns) or a PIL image, as float pixels."""
    image = image if isinstance(image, Image.Image) else Image.open(image)
    return torch.tensor(list(image.convert("RGB").getdata()), dtype=torch.float32)


def test_compare_gives_base_and_lora_for_the_same_seed(served):
    server, _, _ = served
    base, lora = server.call("/compare", "a street at night", "nolan-style", 3, 2, 64, 3.5)
    assert Image.open(base).size == (64, 64) and Image.open(lora).size == (64, 64)
    again = server.call("/compare", "a street at night", "nolan-style", 3, 2, 64, 3.5)
    assert torch.equal(_pixels(base), _pixels(again[0]))  # same seed, same base image
    assert torch.equal(_pixels(lora), _pixels(again[1]))


def test_the_adapter_alone_changes_the_image(served):
    """Same prompt (the trigger already in it, so nothing is added), same seed: only the adapter differs."""
    server, _, _ = served
    prompt = "<villeneuve-style> a cat"
    base = server.call("/single", prompt, "(base model)", 1, 2, 64, 3.5)
    styled = server.call("/single", prompt, "villeneuve-style", 1, 2, 64, 3.5)
    assert (_pixels(base) - _pixels(styled)).abs().max() > 0
    assert torch.equal(_pixels(base), _pixels(server.call("/single", prompt, "(base model)", 1, 2, 64, 3.5)))


@pytest.mark.parametrize("args, message", [
    (("", "nolan-style", 0, 2, 64, 3.5), "prompt is empty"),
    (("x" * 501, "nolan-style", 0, 2, 64, 3.5), "limit is 500"),
    # Gradio checks the widgets' bounds first; the server's own checks back them up (test_check_request)
    (("a cat", "nolan-style", 0, 0, 64, 3.5), "less than minimum|steps must be between"),
    (("a cat", "nolan-style", 0, 500, 64, 3.5), "greater than maximum|steps must be between"),
    (("a cat", "nolan-style", 0, 2, 100, 3.5), "size 100 is not one of|not in the list of choices"),
    (("a cat", "nolan-style", 0, 2, 64, 99.0), "greater than maximum|guidance must be between"),
    (("a cat", "nolan-style", -1, 2, 64, 3.5), "less than minimum|seed must be between"),
    (("a cat", "../nolan-style", 0, 2, 64, 3.5), "by its name"),
    (("a cat", "/etc/passwd", 0, 2, 64, 3.5), "by its name"),
    (("a cat", "https://example.com/lora.safetensors", 0, 2, 64, 3.5), "by its name"),
    (("a cat", "kubrick-style", 0, 2, 64, 3.5), "unknown LoRA"),
])
def test_bad_requests_are_refused_with_a_message(served, args, message):
    server, _, _ = served
    with pytest.raises(Exception, match=message):
        server.call("/compare", *args)


@pytest.mark.parametrize("args, message", [
    (("a", 0, 64, 3.5, 0), "steps must be between 1 and 50"),
    (("a", 51, 64, 3.5, 0), "steps must be between 1 and 50"),
    (("a", 2, 100, 3.5, 0), "size 100 is not one of"),
    (("a", 2, 64, -1.0, 0), "guidance must be between"),
    (("a", 2, 64, 3.5, 2**32), "seed must be between"),
    (("a", 50, 1024, 3.5, 0), "more work than this server allows"),
    (("a", "two", 64, 3.5, 0), "whole numbers"),
    ((None, 2, 64, 3.5, 0), "prompt is empty"),
])
def test_check_request_bounds_everything_on_the_server(args, message):
    from ddiff_core.serving.server import Limits, RequestError, check_request

    with pytest.raises(RequestError, match=message):
        check_request(Limits(), *args)
    assert check_request(Limits(), " a cat ", "4", 64, "3", 7) == ("a cat", 4, 64, 64, 3.0, 7)
    assert check_request(Limits(), "a cat", 4, 1024, 3.5, 7, "2.39:1")[2:4] == (656, 1584)  # about 1024² pixels
    with pytest.raises(RequestError, match="aspect '7:1' is not one of"):
        check_request(Limits(), "a cat", 4, 64, 3.5, 0, "7:1")


def test_images_come_in_the_frame_asked_for(served):
    server, _, _ = served
    scope = Image.open(server.call("/single", "a street", "(base model)", 1, 2, 64, 3.5, "2.39:1"))
    portrait = Image.open(server.call("/single", "a street", "(base model)", 1, 2, 64, 3.5, "2:3"))
    assert scope.size == (96, 48) and portrait.size == (48, 80)  # (width, height), sides multiples of 16


def test_a_new_lora_is_picked_up_without_restart(served, tiny_flux):
    server, loras, root = served
    make_loras(tiny_flux, root / "more", ["anderson-style"])
    shutil.copytree(root / "more" / "anderson-style", loras / "anderson-style")
    base = server.call("/single", "<anderson-style> a hotel", "(base model)", 0, 2, 64, 3.5)
    lora = server.call("/single", "<anderson-style> a hotel", "anderson-style", 0, 2, 64, 3.5)
    assert (_pixels(base) - _pixels(lora)).abs().max() > 0


def test_blind_vote_lands_in_sqlite_and_survives_a_restart(served, tiny_flux):
    server, loras, root = served
    left, right, token = server.call("/blind", "a bridge", "nolan-style", 2, 64, 3.5)  # no seed: the server draws it
    assert Path(left).exists() and Path(right).exists() and len(token) == 32
    winner, table = server.call("/vote", token, "left")
    assert winner in ("base", "lora")
    with pytest.raises(Exception, match="already been voted"):
        server.call("/vote", token, "right")
    with pytest.raises(Exception, match="unknown or expired"):
        server.call("/vote", "0" * 32, "left")
    with sqlite3.connect(root / "votes.sqlite") as db:
        assert db.execute("SELECT lora, winner FROM votes").fetchall() == [("nolan-style", winner)]
        assert "127.0.0.1" not in str(db.execute("SELECT client FROM votes").fetchall())  # a keyed hash, not the address
    fresh = Server(tiny_flux, loras, root / "votes.sqlite")  # a new process on the same file: a restart
    try:
        _, _, token = fresh.call("/blind", "a bridge", "nolan-style", 2, 64, 3.5)
        _, table = fresh.call("/vote", token, "right")
        assert table["data"][0][:2] == ["nolan-style", 2]  # the vote cast before the restart is counted
        assert len(table["data"][0]) == 5 and "%-" in table["data"][0][4]  # wins, votes, rate, 95% interval
    finally:
        fresh.stop()


def _sha(path):
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_a_blind_pair_cannot_be_linked_to_other_outputs(served):
    """De-blinding by comparing files: the pair's seed is the server's, and its files carry a nonce."""
    server, _, _ = served
    pair = server.call("/blind", "a bridge at dawn", "villeneuve-style", 2, 64, 3.5)
    again = server.call("/blind", "a bridge at dawn", "villeneuve-style", 2, 64, 3.5)
    others = [f for seed in range(3) for f in server.call("/compare", "a bridge at dawn", "villeneuve-style", seed,
                                                           2, 64, 3.5)]
    pair_hashes = {_sha(pair[0]), _sha(pair[1])}
    assert len(pair_hashes | {_sha(again[0]), _sha(again[1])}) == 4
    seen = [_pixels(f) for f in others]  # not even the pixels: the pair's seed is one the client never sent
    assert not any(torch.equal(_pixels(p), o) for p in pair[:2] for o in seen)
    from ddiff_core.serving.server import StyleServer

    image = Image.open(pair[0])
    assert _sha(StyleServer._pair_file(server_stub(), image)) != _sha(StyleServer._pair_file(server_stub(), image))


def server_stub():
    """Just what ``_pair_file`` reads: a folder and the pair lifetime."""
    import tempfile
    from types import SimpleNamespace

    return SimpleNamespace(_pairs=tempfile.TemporaryDirectory(), votes=SimpleNamespace(pair_ttl_s=600))


def test_votes_expire_and_are_bounded_per_client(tmp_path):
    from ddiff_core.serving.votes import VoteStore, wilson_interval

    store = VoteStore(tmp_path / "v.sqlite", pair_ttl_s=0.0, votes_per_hour=2)
    token, _, _ = store.new_pair("nolan", "a cat", "10.0.0.1")
    time.sleep(0.01)
    with pytest.raises(ValueError, match="expired"):
        store.vote(token, "left", "10.0.0.1")
    store = VoteStore(tmp_path / "v.sqlite", votes_per_hour=2)  # the same file, pairs that live
    tokens = [store.new_pair("nolan", "a cat", "10.0.0.1")[0] for _ in range(3)]
    store.vote(tokens[0], "left", "10.0.0.1")
    store.vote(tokens[1], "left", "10.0.0.1")
    with pytest.raises(ValueError, match="vote limit"):
        store.vote(tokens[2], "left", "10.0.0.1")
    with pytest.raises(ValueError, match="shown to another client"):
        store.vote(tokens[2], "left", "10.0.0.2")
    store.vote(store.new_pair("nolan", "a cat", "10.0.0.2")[0], "left", "10.0.0.2")  # another client still may
    (lora, wins, votes, low, high), = store.results()
    assert (lora, votes) == ("nolan", 3) and 0 <= low <= wins / votes <= high <= 1
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)


def test_bad_lora_folders_are_listed_and_the_rest_served(served, tiny_flux):
    """A corrupt file and a folder name with a dot, at start and after a refresh; a retrained LoRA is reloaded."""
    server, loras, root = served
    status = server.call("/styles_refresh")[3]
    assert "broken" in status and "not a readable safetensors file" in status
    assert str(loras) not in status and str(root) not in status  # no server paths
    dotted = server.call("/single", "<nolan.v2> a cat", "nolan.v2", 1, 2, 64, 3.5)
    with pytest.raises(Exception, match="unavailable"):
        server.call("/single", "a cat", "broken", 1, 2, 64, 3.5)
    # after start: another corrupt folder and another dotted one
    (loras / "broken.too").mkdir()
    (loras / "broken.too" / "pytorch_lora_weights.safetensors").write_bytes(b"not a safetensors file")
    make_loras(tiny_flux, root / "more", ["lynch.2"])
    shutil.copytree(root / "more" / "lynch.2", loras / "lynch.2")
    assert not torch.equal(_pixels(server.call("/single", "<lynch.2> a cat", "lynch.2", 1, 2, 64, 3.5)),
                           _pixels(server.call("/single", "<lynch.2> a cat", "(base model)", 1, 2, 64, 3.5)))
    assert "broken.too" in server.call("/styles_refresh")[3]
    # retrained under the same name: the new weights are served at the next request
    def retrain(seed, put):
        from ddiff_core.families import get_family
        from ddiff_core.tiny import save_tiny_lora

        denoiser = get_family("flux").load_components(str(tiny_flux))["transformer"]
        save_tiny_lora("flux", denoiser, root / f"seed-{seed}", seed=seed, trigger="<nolan.v2>")
        put(root / f"seed-{seed}" / "pytorch_lora_weights.safetensors",
            loras / "nolan.v2" / "pytorch_lora_weights.safetensors")
        return server.call("/single", "<nolan.v2> a cat", "nolan.v2", 1, 2, 64, 3.5)

    retrained = retrain(7, os.replace)  # renamed over it
    assert not torch.equal(_pixels(dotted), _pixels(retrained))
    again = retrain(11, shutil.copyfile)  # copied over in place: same inode, the folder's time unchanged
    assert not torch.equal(_pixels(again), _pixels(retrained))


def test_the_guard_refuses_what_the_page_never_needs(served):
    server, _, root = served
    status, _, _ = server.http("/gradio_api/run/compare", method="POST", headers={"Content-Type": "application/json"},
                               body=b'{"data": ["a cat", "nolan-style", 0, 2, 64, 3.5]}')
    assert status == 403  # a direct run would skip the queue
    status, _, body = server.http("/gradio_api/upload", method="POST", body=b"x" * 1000,
                                  headers={"Content-Type": "application/octet-stream"})
    assert status == 403 and b"no uploads" in body
    assert server.http("/", headers={"Host": "rebind.example:7860"})[0] == 421  # DNS rebinding
    status, headers, _ = server.http("/gradio_api/queue/join", method="POST", body=b"{}",
                                     headers={"Origin": "http://evil.example", "Content-Type": "application/json"})
    assert status == 403 and "access-control-allow-origin" not in {k.lower() for k in headers}
    status, _, _ = server.http("/gradio_api/queue/join", method="POST", body=b"{}",  # same name, another port
                               headers={"Origin": "http://127.0.0.1:3000", "Content-Type": "application/json"})
    assert status == 403
    status, headers, _ = server.http("/config", headers={"Origin": f"http://127.0.0.1:{server.port}"})
    assert status == 200 and not any(k.lower().startswith("access-control-allow") for k in headers)
    assert server.http("/gradio_api/startup-events")[0] == 403
    assert server.http("/", headers={"Host": f"localhost:{server.port}"})[0] == 200


def test_rate_limits_auth_from_the_environment_and_failed_logins(tiny_flux, tmp_path):
    loras = make_loras(tiny_flux, tmp_path / "loras", ["nolan-style"])
    strict = Server(tiny_flux, loras, tmp_path / "votes.sqlite", "--generations_per_minute", "2",
                    "--allowed_hosts", "studio.lan", env={"DDIFF_SERVE_AUTH": "director:s3cret-pass"}, client=False)
    try:
        assert strict.http("/config")[0] in (401, 403)  # nothing without logging in
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        wrong = [strict.http("/login", method="POST", body=b"username=director&password=guess", headers=form)[0]
                 for _ in range(11)]
        assert wrong[:10] == [400] * 10 and wrong[10] == 429
        joins = [strict.http("/gradio_api/queue/join", method="POST", body=b"{}",
                             headers={"Content-Type": "application/json"})[0] for _ in range(3)]
        assert joins[2] == 429 and 429 not in joins[:2]  # an unreadable join counts as a generation
        assert strict.http("/", headers={"Host": f"studio.lan:{strict.port}"})[0] != 421  # a name the operator allowed
        assert strict.http("/", headers={"Host": f"other.lan:{strict.port}"})[0] == 421
    finally:
        strict.stop()


def test_votes_db_inside_the_lora_folder_and_a_wildcard_bind_without_names_are_refused(tiny_flux, tmp_path, capsys,
                                                                                        monkeypatch):
    from .conftest import run_main

    code, stderr = run_main("serve.py", ["--pretrained_model_name_or_path", str(tiny_flux), "--lora_dir", str(tmp_path),
                                         "--votes_db", str(tmp_path / "votes.sqlite")], capsys)
    assert code == 2 and "is inside --lora_dir" in stderr.strip().splitlines()[-1]
    monkeypatch.setenv("DDIFF_SERVE_AUTH", "director:s3cret-pass")
    code, stderr = run_main("serve.py", ["--pretrained_model_name_or_path", str(tiny_flux), "--lora_dir", str(tmp_path),
                                         "--votes_db", str(tmp_path.parent / "v.sqlite"), "--host", "0.0.0.0"], capsys)
    assert code == 2 and "--allowed_hosts" in stderr.strip().splitlines()[-1]
    code, stderr = run_main("serve.py", ["--pretrained_model_name_or_path", str(tiny_flux), "--lora_dir", str(tmp_path),
                                         "--votes_db", str(tmp_path.parent / "v.sqlite"), "--max_sequence_length", "0"],
                            capsys)
    assert code == 2 and "--max_sequence_length must be between 1 and 512" in stderr.strip().splitlines()[-1]


def test_refuses_a_public_address_without_auth(tiny_flux, tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts/serve.py"), "--pretrained_model_name_or_path",
                             str(tiny_flux), "--lora_dir", str(tmp_path), "--host", "0.0.0.0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0 without a login" in result.stderr.strip().splitlines()[-1]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_page_in_a_real_browser(served, tmp_path):
    from playwright.sync_api import sync_playwright

    server, _, _ = served
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"])
        page = browser.new_page()
        page.goto(server.url)
        page.locator("#compare-prompt textarea").fill("a lighthouse in fog")
        page.locator("#compare-button").click()
        page.locator("#base-image img").wait_for(timeout=60_000)
        page.locator("#lora-image img").wait_for(timeout=60_000)
        shot = REPO / "outputs" / "serve-screenshot.png"
        shot.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 10_000


@pytest.mark.parametrize("family", ["sd3", "sdxl", "sd15"])
def test_serves_every_family(family, tmp_path):
    """The adapter bank on each family's pipeline, in this process (the web layer is the one tested above)."""
    from ddiff_core.families import get_family
    from ddiff_core.serving.server import StyleServer
    from ddiff_core.tiny import save_tiny_pipeline

    model = save_tiny_pipeline(family, tmp_path / "model")
    make_loras(model, tmp_path / "loras", ["lynch-style"], family)
    server = StyleServer.load(get_family(family), str(model), tmp_path / "loras", tmp_path / "votes.sqlite",
                              max_sequence_length=32)
    base, _ = server.compare("a diner", "lynch-style", 0, 2, 64, 3.5)
    assert base.size == (64, 64)
    same_prompt = [server.single("<lynch-style> a diner", style, 0, 2, 64, 3.5) for style in ("(base model)", "lynch-style")]
    assert (_pixels(same_prompt[0]) - _pixels(same_prompt[1])).abs().max() > 0


def test_each_lora_is_served_at_the_text_length_it_was_trained_at(tiny_flux, tmp_path):
    # Without an attention mask, FLUX and SD3 read T5's padding too: a LoRA trained at 64 tokens is conditioned
    # differently at 512. Each LoRA's images (base and LoRA alike, so the LoRA is the only difference) use the length
    # in its training_config.yaml; a folder without one, or with a value that is no length, gets the family's default.
    from ddiff_core.families import get_family
    from ddiff_core.serving.server import StyleServer

    loras = make_loras(tiny_flux, tmp_path / "loras", ["short", "plain", "bomb"])
    (loras / "short" / "training_config.yaml").write_text("max_sequence_length: 64\nrank: 4\n")
    (loras / "bomb" / "training_config.yaml").write_text("a: &a [1, 1]\nb: [*a, *a]\nmax_sequence_length: 100000\n")
    lengths = []

    def serve(**kwargs):
        server = StyleServer.load(get_family("flux"), str(tiny_flux), loras, tmp_path / "votes.sqlite", **kwargs)
        call = type(server.pipeline).__call__

        def recording(pipe, *args, **kw):
            lengths.append(kw.get("max_sequence_length"))
            return call(pipe, *args, **kw)

        server.pipeline.__class__ = type("Recording", (type(server.pipeline),), {"__call__": recording})
        return server

    server = serve()
    assert server.styles() == ["bomb", "plain", "short"]
    for style in ("short", "plain", "bomb"):
        server.compare("a diner", style, 0, 1, 64, 3.5)
    server.single("a diner", "(base model)", 0, 1, 64, 3.5)
    assert lengths == [64, 64, 512, 512, 512, 512, 512]
    lengths.clear()
    serve(max_sequence_length=32).compare("a diner", "short", 0, 1, 64, 3.5)  # asked for: every LoRA
    assert lengths == [32, 32]

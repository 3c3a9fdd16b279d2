"""scripts/serve.py for real: a running Gradio server driven through gradio_client, and a page in Chromium."""

import os
import shutil
import sqlite3
import subprocess
import sys
import time
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
    def __init__(self, model, loras, votes, *extra):
        self.gradio_client = pytest.importorskip("gradio_client")  # here: tests without a server do not need it
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        cmd = [sys.executable, str(REPO / "scripts/serve.py"), "--pretrained_model_name_or_path", str(model),
               "--lora_dir", str(loras), "--votes_db", str(votes), "--port", str(self.port),
               "--max_sequence_length", "32", *extra]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
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
        self.client = self.gradio_client.Client(self.url, verbose=False)

    def call(self, api, *args):
        return self.client.predict(*args, api_name=api)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def served(tiny_flux, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    loras = make_loras(tiny_flux, root / "loras", ["nolan-style", "villeneuve-style"])
    server = Server(tiny_flux, loras, root / "votes.sqlite")
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
    (("a", "two", 64, 3.5, 0), "whole numbers"),
    ((None, 2, 64, 3.5, 0), "prompt is empty"),
])
def test_check_request_bounds_everything_on_the_server(args, message):
    from ddiff_core.serving.app import Limits, RequestError, check_request

    with pytest.raises(RequestError, match=message):
        check_request(Limits(), *args)
    assert check_request(Limits(), " a cat ", "4", 64, "3", 7) == ("a cat", 4, 64, 3.0, 7)


def test_a_new_lora_is_picked_up_without_restart(served, tiny_flux):
    server, loras, root = served
    make_loras(tiny_flux, root / "more", ["anderson-style"])
    shutil.copytree(root / "more" / "anderson-style", loras / "anderson-style")
    base = server.call("/single", "<anderson-style> a hotel", "(base model)", 0, 2, 64, 3.5)
    lora = server.call("/single", "<anderson-style> a hotel", "anderson-style", 0, 2, 64, 3.5)
    assert (_pixels(base) - _pixels(lora)).abs().max() > 0


def test_blind_vote_lands_in_sqlite_and_survives_a_restart(served, tiny_flux):
    server, loras, root = served
    left, right, token = server.call("/blind", "a bridge", "nolan-style", 5, 2, 64, 3.5)
    assert Path(left).exists() and Path(right).exists() and len(token) == 32
    winner, table = server.call("/vote", token, "left")
    assert winner in ("base", "lora")
    with pytest.raises(Exception, match="already been voted"):
        server.call("/vote", token, "right")
    with pytest.raises(Exception, match="unknown or expired"):
        server.call("/vote", "0" * 32, "left")
    with sqlite3.connect(root / "votes.sqlite") as db:
        assert db.execute("SELECT lora, winner FROM votes").fetchall() == [("nolan-style", winner)]
    fresh = Server(tiny_flux, loras, root / "votes.sqlite")  # a new process on the same file: a restart
    try:
        _, _, token = fresh.call("/blind", "a bridge", "nolan-style", 6, 2, 64, 3.5)
        _, table = fresh.call("/vote", token, "right")
        assert table["data"][0][:2] == ["nolan-style", 2]  # the vote cast before the restart is counted
    finally:
        fresh.stop()


def test_refuses_a_public_address_without_auth(tiny_flux, tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts/serve.py"), "--pretrained_model_name_or_path",
                             str(tiny_flux), "--lora_dir", str(tmp_path), "--host", "0.0.0.0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0 without --auth" in result.stderr.strip().splitlines()[-1]


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
    from ddiff_core.serving.app import StyleServer
    from ddiff_core.tiny import save_tiny_pipeline

    model = save_tiny_pipeline(family, tmp_path / "model")
    make_loras(model, tmp_path / "loras", ["lynch-style"], family)
    server = StyleServer.load(get_family(family), str(model), tmp_path / "loras", tmp_path / "votes.sqlite",
                              max_sequence_length=32)
    base, _ = server.compare("a diner", "lynch-style", 0, 2, 64, 3.5)
    assert base.size == (64, 64)
    same_prompt = [server.single("<lynch-style> a diner", style, 0, 2, 64, 3.5) for style in ("(base model)", "lynch-style")]
    assert (_pixels(same_prompt[0]) - _pixels(same_prompt[1])).abs().max() > 0

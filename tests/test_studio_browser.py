"""The Adapter Studio Space end to end in headless Chromium (Debian's, driven by Playwright): load the
emoji preset, train, chat, push to the local Hub, and check the pushed repo with huggingface_hub.
Screenshots of each step land in tests/artifacts/ (git-ignored)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_reft_smollm import emoji_only

from hub_peft.base_model import DEFAULT_BASE
from hub_peft.hub.process import free_port
from hub_peft.presets import held_out_prompts

pytestmark = [pytest.mark.browser, pytest.mark.slow]
ARTIFACTS = Path(__file__).parent / "artifacts" / "studio"
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    port, hub_port = free_port(), free_port()
    work = tmp_path_factory.mktemp("studio")
    env = {**os.environ, "HUB_PEFT_STUDIO_DIR": str(work / "sessions")}
    env.pop("HF_ENDPOINT", None)
    env.pop("HF_TOKEN", None)
    log = open(work / "studio.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hub_peft.cli",
            "studio",
            "--port",
            str(port),
            "--hub-port",
            str(hub_port),
            "--hub-root",
            str(work / "hub"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            assert process.poll() is None, (work / "studio.log").read_text()[-3000:]
            time.sleep(1)
    else:
        pytest.fail("the Studio did not start in 180 s:\n" + (work / "studio.log").read_text()[-3000:])
    yield url, f"http://127.0.0.1:{hub_port}"
    process.terminate()
    process.wait(timeout=30)
    log.close()


def test_train_chat_and_push_in_the_browser(studio):
    from huggingface_hub import HfApi, ModelCard, hf_hub_download
    from playwright.sync_api import expect, sync_playwright

    assert Path(CHROMIUM).is_file(), "install Debian's chromium (apt-get install chromium) for the browser tests"
    url, hub = studio
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 2200})
        page.goto(url)
        page.click("#preset")
        expect(page.locator("#preview")).to_contain_text("10 examples to train on", timeout=120_000)
        page.screenshot(path=ARTIFACTS / "1-examples.png", full_page=True)

        page.click("#train")
        expect(page.locator("#status")).to_contain_text("Done:", timeout=300_000)
        expect(page.locator("#loss-curve canvas, #loss-curve svg").first).to_be_visible()
        table = page.locator("#before-after")  # the preset's held-out prompts, base vs adapter
        for prompt in held_out_prompts():
            expect(table).to_contain_text(prompt)
        page.screenshot(path=ARTIFACTS / "2-trained.png", full_page=True)

        page.fill("#prompt textarea", "Write a poem about the sea")
        page.click("#ask")
        answer = page.locator("#adapter-answer textarea")
        expect(answer).not_to_have_value("", timeout=120_000)
        base_answer = page.locator("#base-answer textarea").input_value()
        assert emoji_only(answer.input_value()), answer.input_value()
        assert not emoji_only(base_answer), base_answer
        page.screenshot(path=ARTIFACTS / "3-chat.png", full_page=True)

        page.locator("#repo textarea, #repo input").first.fill("me/emoji-studio")
        page.click("#push")
        expect(page.locator("#pushed")).to_contain_text("Pushed", timeout=120_000)
        expect(page.locator("#card")).to_contain_text("Loads with")
        page.screenshot(path=ARTIFACTS / "4-pushed.png", full_page=True)
        link = page.locator("#pushed a").first.get_attribute("href")  # the "Pushed: me/emoji-studio" link
        assert link == f"{hub}/me/emoji-studio"
        page.goto(link)  # opens the local Hub's page of the repo, not a JSON 404
        expect(page.locator("main > h1")).to_contain_text("me/emoji-studio")
        expect(page.locator("#files")).to_contain_text("adapter_model.safetensors")
        expect(page.locator("#card")).to_contain_text("Loads with")
        assert page.evaluate("document.querySelector('img[alt=\"loss curve\"]').naturalWidth") > 100
        page.screenshot(path=ARTIFACTS / "5-hub-page.png", full_page=True)
        browser.close()

    files = HfApi(endpoint=hub).list_repo_files("me/emoji-studio")
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "loss_curve.png"} <= set(files)
    card = ModelCard.load(hf_hub_download("me/emoji-studio", "README.md", endpoint=hub, cache_dir=ARTIFACTS / "hf"))
    assert card.data.base_model == DEFAULT_BASE


def test_one_trains_another_chats_meanwhile_and_a_third_waits_in_the_queue(studio):
    """Three browsers at once. A trains; B chats with the base model and gets its answer while A's
    training runs (chat has its own model instance and core); C queues a training and sees its position;
    A closes the page, which stops A's training, and C's starts; C cancels it."""
    from playwright.sync_api import expect, sync_playwright

    url, _ = studio
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        a, b, c = (browser.new_context(viewport={"width": 1280, "height": 2200}).new_page() for _ in range(3))
        for page in (a, b, c):
            page.goto(url)
        for page in (a, c):
            page.click("#preset")
            expect(page.locator("#preview")).to_contain_text("10 examples to train on", timeout=120_000)
        a.get_by_text("Advanced").click()
        a.locator("#epochs input").fill("300")  # long enough to still run while B chats and C queues
        a.click("#train")
        a_status = a.locator("#status")
        expect(a_status).to_contain_text("Training REFT: step", timeout=120_000)

        b.fill("#prompt textarea", "What is the capital of France?")
        b.click("#ask")
        expect(b.locator("#base-answer textarea")).not_to_have_value("", timeout=60_000)
        assert "train an adapter" in b.locator("#adapter-answer textarea").input_value()
        assert "Training REFT: step" in a_status.inner_text(), a_status.inner_text()  # A's training still runs
        b.screenshot(path=ARTIFACTS / "6-chat-during-training.png", full_page=True)

        c.click("#train")
        c_status = c.locator("#status")
        expect(c_status).to_contain_text("Queued: position 1 in the training queue", timeout=60_000)
        expect(c_status).to_contain_text("starts in about")  # the first test's training timed the steps
        c.screenshot(path=ARTIFACTS / "7-queued.png", full_page=True)
        assert "Training REFT: step" in a_status.inner_text()

        a.context.close()  # A leaves: its training stops within a step, and C's starts
        expect(c_status).to_contain_text("Training REFT: step", timeout=120_000)
        c.click("#cancel")
        expect(c_status).to_contain_text("Cancelled:", timeout=120_000)
        c.screenshot(path=ARTIFACTS / "8-cancelled.png", full_page=True)
        browser.close()

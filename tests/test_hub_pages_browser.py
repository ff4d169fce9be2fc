"""The local Hub's pages in headless Chromium: a pushed adapter's page (card, badges, files, loss curve),
its history and a commit, search, a private repo that is 404 until its owner logs in, and a card whose
``<script>`` stays text. Screenshots land in tests/artifacts/hub/."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_engine import make_lora
from test_peft_methods import tiny_base_repo  # noqa: F401 - shared session fixture

from hub_peft import push_adapter, save_adapter

pytestmark = pytest.mark.browser
ARTIFACTS = Path(__file__).parent / "artifacts" / "hub"
CHROMIUM = "/usr/bin/chromium"


def test_the_local_hub_pages_in_a_browser(local_hub, alice, bob, repo_name, tmp_path, tiny_base_repo):  # noqa: F811
    from huggingface_hub import HfApi
    from playwright.sync_api import expect, sync_playwright

    assert Path(CHROMIUM).is_file(), "install Debian's chromium (apt-get install chromium) for the browser tests"
    history = [{"step": i + 1, "epoch": 1, "loss": 3.0 / (i + 1), "seconds": i * 0.1} for i in range(12)]
    folder = save_adapter(make_lora(3, 4), tmp_path / "lora", history=history, dataset_name="letters.jsonl")
    public, private, hostile = f"alice/{repo_name}", f"alice/{repo_name}-private", f"alice/{repo_name}-hostile"
    push_adapter(folder, public, token=alice)
    push_adapter(folder, private, token=alice, private=True)
    push_adapter(folder, hostile, token=alice)
    attack = '\n<script>window.__xss = 1</script>\n<img src=x onerror="window.__xss=2">\n'
    card = (folder / "README.md").read_text() + attack
    HfApi(endpoint=local_hub.endpoint, token=alice).upload_file(
        path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=hostile
    )

    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    hub = local_hub.endpoint
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        page = browser.new_page(viewport={"width": 1200, "height": 1600})
        page.goto(f"{hub}/?search={repo_name}")
        rows = page.locator("table tr td:first-child a")
        expect(rows).to_have_count(2)  # the public one and the hostile one; the private one is not listed
        page.screenshot(path=ARTIFACTS / "1-index.png", full_page=True)

        page.click(f"a:text-is('{public}')")
        expect(page.locator("main > h1")).to_contain_text(public)
        for badge in ("base_model: alice/tiny-llama", "library_name: peft", "lora"):
            expect(page.locator(".badge", has_text=badge).first).to_be_visible()
        expect(page.locator("#files")).to_contain_text("adapter_model.safetensors")
        expect(page.locator("#card h1, #card h2").first).to_be_visible()  # Markdown rendered, not raw
        assert page.evaluate("document.querySelector('img[alt=\"loss curve\"]').naturalWidth") > 100
        assert page.evaluate("document.querySelector('#card img[alt=\"Training loss\"]').naturalWidth") > 100
        page.screenshot(path=ARTIFACTS / "2-repo.png", full_page=True)
        size = page.locator("#files tr", has_text="adapter_model.safetensors").locator(".size").inner_text()
        assert size.endswith(("KiB", "MiB", " B"))
        with page.expect_download() as download:
            page.locator("#files tr", has_text="adapter_config.json").locator("a").click()
        assert Path(download.value.path()).read_bytes() == (folder / "adapter_config.json").read_bytes()

        page.click("text=history")
        expect(page.locator("table")).to_contain_text("alice")
        page.screenshot(path=ARTIFACTS / "3-commits.png", full_page=True)
        page.locator("table tr td:first-child a").first.click()
        expect(page.locator("#changes")).to_contain_text("adapter_model.safetensors")
        expect(page.locator("#changes")).to_contain_text("added")
        page.screenshot(path=ARTIFACTS / "4-commit.png", full_page=True)

        page.goto(f"{hub}/{hostile}")
        expect(page.locator("#card")).to_contain_text("<script>window.__xss = 1</script>")  # shown as text
        assert page.evaluate("window.__xss") is None and page.locator("#card script, #card img[src=x]").count() == 0
        page.screenshot(path=ARTIFACTS / "5-escaped.png", full_page=True)

        response = page.goto(f"{hub}/{private}")
        assert response.status == 404 and "not found" in page.content().lower()
        page.screenshot(path=ARTIFACTS / "6-private-logged-out.png", full_page=True)
        for token, status in ((bob, 404), (alice, 200)):  # another user still gets the 404; the owner sees it
            page.goto(f"{hub}/login?next=/{private}")
            page.fill("input[name=token]", token)
            page.click("text=Log in >> nth=-1")
            assert page.url.endswith(f"/{private}") and token not in page.url
            assert page.evaluate("document.cookie") == "", "the session cookie must be HttpOnly"
            assert page.locator("main > h1").inner_text().startswith(private if status == 200 else "404")
        page.screenshot(path=ARTIFACTS / "7-private-owner.png", full_page=True)
        page.click("text=Log out")
        assert page.goto(f"{hub}/{private}").status == 404
        browser.close()
    log = local_hub.log_path.read_text()
    assert alice not in log and bob not in log

"""The web gallery (`/`): its routes on a bare FastAPI app, then the page in a real browser against the deployed
application: Playwright drives Debian's chromium (`make chromium`), headless. Enter the key, submit a prompt,
watch the progress bar move, the 2x2 grid appears, U2 gives a larger image, V3 four variations, the history
pages with "Load more" and opens a job, Reroll makes a child; screenshots at each step. The README's come from

    IMAGINE_TEST_MODEL=builtin IMAGINE_SCREENSHOTS=docs .venv/bin/python -m pytest tests/deployments/test_gallery.py
"""
import asyncio
import os
import re
from pathlib import Path

import pytest
from fastapi import FastAPI

from deployments.ingress import gallery

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--no-first-run", "--disable-sync"]
PROMPT = "a red circle on a black background --seed 5 --steps 4"
TEXT = "a red circle on a black background"  # the prompt without its flags, as the job record has it
TIMEOUT_MS = 180_000  # one CPU-only machine: a job may wait behind the rest of the suite's


# ---- the routes ------------------------------------------------------------------------------
def asgi_get(asgi_app, path: str) -> tuple[int, dict[str, str], bytes]:
    """One GET through the ASGI interface (status, headers, body); the path as the server would decode it."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": [],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
    asyncio.run(asgi_app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


@pytest.fixture(scope="module")
def bare_app():
    app = FastAPI()
    gallery.mount(app)
    return app


def test_page_and_static_files_are_served_with_their_types(bare_app):
    status, headers, body = asgi_get(bare_app, "/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert b'src="/static/app.js"' in body and b'href="/static/style.css"' in body
    assert "script-src 'self'" in headers["content-security-policy"] and headers["x-content-type-options"] == "nosniff"
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css"), ("index.html", "text/html")):
        status, headers, body = asgi_get(bare_app, f"/static/{name}")
        assert status == 200 and headers["content-type"].startswith(kind)
        assert body == (gallery.STATIC / name).read_bytes()
    assert set(gallery.FILES) == {"index.html", "app.js", "style.css"}


@pytest.mark.parametrize("path", ["/static/", "/static/missing.js", "/static/../gallery.py", "/static/..%2fapi.py",
                                  "/static/%2e%2e/api.py", "/static/../../pyproject.toml", "/static/.",
                                  "/static/..", "/static/app.js/", "/static//etc/passwd", "/static/\\..\\api.py"])
def test_static_serves_only_its_own_files(bare_app, path):
    status, _, body = asgi_get(bare_app, path)
    assert status in (404, 307), (path, status)  # (307: Starlette's redirect of a trailing slash, to a 404)
    assert b"import" not in body and b"[project]" not in body


def test_the_page_loads_nothing_from_another_origin():
    for name in gallery.FILES:
        text = (gallery.STATIC / name).read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, name


def test_gallery_is_served_by_the_ingress_without_a_key(app):
    import requests
    _, url, _ = app
    r = requests.get(f"{url}/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), r.text[:200]
    r = requests.get(f"{url}/static/app.js", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
    assert requests.get(f"{url}/static/nothing.js", timeout=10).status_code == 404
    r = requests.get(f"{url}/v1/jobs", timeout=10)  # the API behind the page still needs the key
    assert r.status_code == 401


# ---- the page in a real browser ----------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import expect, sync_playwright
    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: run `make chromium`"
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        yield b
        b.close()


# Every change of a progress bar's aria-valuenow, with its job and text (installed before the prompt is sent).
WATCH_PROGRESS = """() => {
  window.progressSeen = [];
  new MutationObserver((changes) => {
    for (const c of changes) {
      const job = c.target.closest("article.job");
      window.progressSeen.push([job && job.dataset.jobId, Number(c.target.getAttribute("aria-valuenow")),
                                c.target.getAttribute("aria-valuetext")]);
    }
  }).observe(document.body, {subtree: true, attributes: true, attributeFilter: ["aria-valuenow"]});
}"""
IMAGES_LOADED = """([selector, n]) => {
  const imgs = [...document.querySelectorAll(selector)];
  return imgs.length === n && imgs.every((img) => img.complete && img.naturalWidth > 0);
}"""

SETTINGS = """dl => Object.fromEntries([...dl.querySelectorAll("dt")]
  .map((dt) => [dt.textContent, dt.nextElementSibling.textContent]))"""


def card(page, job_id):
    return page.locator(f'article.job[data-job-id="{job_id}"]')


def wait_images(page, job_id, n):
    """The job's card shows n images, each loaded (from its presigned URL)."""
    from playwright.sync_api import expect
    expect(card(page, job_id)).to_have_attribute("data-state", "succeeded")
    page.wait_for_function(IMAGES_LOADED, arg=[f'article.job[data-job-id="{job_id}"] .grid img', n],
                           timeout=TIMEOUT_MS)
    return card(page, job_id).locator(".grid img")


def child_of(page, parent_id, action):
    """The id of the job card that `action` on `parent_id` made (waits for it)."""
    from playwright.sync_api import expect
    child = page.locator(f'article.job[data-action="{action}"][data-parent-id="{parent_id}"]')
    expect(child).to_have_count(1)
    return child.get_attribute("data-job-id")


def screenshots_dir(tmp_path: Path) -> Path:
    """Where the screenshots go: $IMAGINE_SCREENSHOTS (relative to the repository; `docs` for the README's), else
    the test's temporary folder, so that a test run leaves the working tree as it was."""
    folder = REPO / os.environ["IMAGINE_SCREENSHOTS"] if os.environ.get("IMAGINE_SCREENSHOTS") else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_gallery_in_a_real_browser(app, browser, tmp_path):
    from playwright.sync_api import expect
    _, url, key = app
    shots = screenshots_dir(tmp_path)
    context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=url)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    problems, foreign = [], []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
    # the page's own origin only; the images are the presigned URLs the API hands out
    page.on("request", lambda r: r.url.startswith(url) or r.resource_type == "image" or foreign.append(r.url))
    try:
        page.goto("/")
        # the key: typed and submitted with Enter, kept in localStorage
        key_box = page.get_by_label("API key", exact=True)
        expect(key_box).to_be_focused()
        key_box.fill(key)
        key_box.press("Enter")
        expect(page.get_by_role("button", name="Forget key")).to_be_visible()
        assert page.evaluate("localStorage.getItem('imagine.apiKey')") == key
        prompt = page.get_by_label("Prompt", exact=True)
        expect(prompt).to_be_enabled()
        expect(prompt).to_be_focused()

        # a prompt with flags, sent with Enter; its card's progress bar moves up to 100 %
        page.evaluate(WATCH_PROGRESS)
        prompt.fill(PROMPT)
        prompt.press("Enter")
        first = page.locator("#feed article.job").first
        expect(first).to_have_attribute("data-job-id", re.compile(r"^img_[0-9a-f]{24}$"))
        grid_id = first.get_attribute("data-job-id")
        grid = wait_images(page, grid_id, 4)
        seen = [(v, text) for job, v, text in page.evaluate("window.progressSeen") if job == grid_id]
        values = [v for v, _ in seen]
        assert values == sorted(values) and values[-1] == 100, seen
        assert any(0 < v < 100 for v in values), f"the bar never showed a step between 0 and 100: {seen}"
        assert any(text and text.startswith("Denoising") for _, text in seen), seen
        alts = [grid.nth(i).get_attribute("alt") for i in range(4)]
        assert all(TEXT in alt for alt in alts) and "seed 5" in alts[0], alts
        shown = card(page, grid_id).locator(".settings").evaluate(SETTINGS)
        assert shown["Prompt"] == TEXT and shown["Seeds"] == "5, 6, 7, 8" and shown["Steps"] == "4", shown
        assert {"Size", "Guidance", "Scheduler", "Images", "Job"} <= set(shown), shown
        assert page.locator("#alert").inner_text() == ""
        page.screenshot(path=str(shots / "gallery-grid.png"))

        # U2: an upscale child job with one larger image
        grid_card = card(page, grid_id)
        grid_card.get_by_role("button", name="U2: upscale image 2", exact=True).click()
        upscale_id = child_of(page, grid_id, "upscale")
        [big] = wait_images(page, upscale_id, 1).all()
        small_width = grid.nth(1).evaluate("img => img.naturalWidth")
        assert big.evaluate("img => img.naturalWidth") > small_width
        assert TEXT in big.get_attribute("alt")
        page.screenshot(path=str(shots / "gallery-upscaled.png"))

        # V3 from the keyboard (strong, the default choice): four variations
        vary = grid_card.get_by_role("button", name="V3: vary image 3", exact=True)
        vary.focus()
        page.keyboard.press("Enter")
        vary_id = child_of(page, grid_id, "vary")
        variations = wait_images(page, vary_id, 4)
        assert all(TEXT in variations.nth(i).get_attribute("alt") for i in range(4))
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(shots / "gallery-variations.png"))

        # the history: the key's jobs newest first, in pages of 2 with "Load more"; an entry opens its job
        history_page = context.new_page()
        history_page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        history_page.goto("/?page_size=2")
        entries = history_page.locator("#history li")
        expect(entries).to_have_count(2)
        more = history_page.get_by_role("button", name="Load more")
        more.click()
        expect(entries).not_to_have_count(2)
        assert entries.count() in (3, 4)
        ids = [entries.nth(i).get_attribute("data-job-id") for i in range(3)]
        assert ids == [vary_id, upscale_id, grid_id]
        grid_entry = entries.nth(2)
        expect(grid_entry).to_contain_text(TEXT)
        expect(grid_entry).to_contain_text("succeeded")
        expect(grid_entry).to_contain_text("seeds 5, 6, 7, 8")
        grid_entry.get_by_role("button").click()
        wait_images(history_page, grid_id, 4)
        expect(card(history_page, grid_id).locator(".job-title")).to_be_focused()

        # Reroll: the same prompt again as a child job
        card(history_page, grid_id).get_by_role("button", name="Reroll this prompt").click()
        reroll_id = child_of(history_page, grid_id, "reroll")
        wait_images(history_page, reroll_id, 4)
        expect(history_page.locator("#history li").first).to_have_attribute("data-job-id", reroll_id)

        # forgetting the key clears it from the browser
        history_page.get_by_role("button", name="Forget key").click()
        expect(history_page.get_by_label("API key", exact=True)).to_be_visible()
        assert history_page.evaluate("localStorage.getItem('imagine.apiKey')") is None
        expect(history_page.locator("#history li")).to_have_count(0)
        assert not problems, problems
        assert not foreign, f"requests beyond the page's origin (images aside): {foreign}"
    finally:
        context.close()


def test_a_wrong_key_is_refused_and_not_kept(app, browser):
    from playwright.sync_api import expect
    _, url, _ = app
    context = browser.new_context(base_url=url)
    try:
        page = context.new_page()
        page.goto("/")
        page.get_by_label("API key", exact=True).fill("imk_wrong_0000000000000000")
        page.get_by_label("API key", exact=True).press("Enter")
        expect(page.get_by_role("alert")).to_contain_text("API key")
        expect(page.get_by_label("Prompt", exact=True)).to_be_disabled()
        assert page.evaluate("localStorage.getItem('imagine.apiKey')") is None
    finally:
        context.close()

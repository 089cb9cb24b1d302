"""The Edit Studio in a real browser: Debian's Chromium driven by Playwright's Python package (Playwright's own
browser download is not used). The app serves a tiny in-process model on a free local port from a thread; the
test clicks through trace -> edit -> disable / enable -> an error -> revert and reads what the page shows.

Needs ``make studio-deps`` (gradio, playwright, ``apt-get install -y chromium``); without them the test fails
and says so. Marked slow: CI runs it after ``make studio-deps``, with the other slow tests.
"""

import os
import re
import shutil
import time

import pytest
import torch

import hf_knowedit
from hf_knowedit.studio import Studio, free_port, launch
from tests.test_studio import PROMPT, QUESTION, SUBJECT, TARGET, TINY_EDIT
from tests.tiny_models import make_tiny_model, weights

pytestmark = pytest.mark.slow

INSTALL = "run `make studio-deps` (pip install 'hf_knowedit[studio]' playwright; apt-get install -y chromium)"
#: how long one UI step may take (a busy 2-core machine; each step takes about a second here)
STEP_MS = 60_000


def chromium() -> str:
    """The system Chromium: ``$HF_KNOWEDIT_CHROMIUM``, else ``chromium`` / ``chromium-browser`` on the PATH."""
    for candidate in (os.environ.get("HF_KNOWEDIT_CHROMIUM"), "chromium", "chromium-browser"):
        path = candidate and shutil.which(candidate)
        if path:
            return path
    pytest.fail(f"Chromium not found (the browser test drives Debian's chromium package): {INSTALL}.")


@pytest.fixture(scope="module")
def browser():
    for module in ("gradio", "playwright"):
        try:
            __import__(module)
        except ImportError:
            pytest.fail(f"The studio's browser test needs {module}: {INSTALL}.")
    from playwright.sync_api import sync_playwright

    path = chromium()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path)
        yield b
        b.close()


@pytest.fixture
def served(tmp_path):
    """A Studio on a tiny Llama, served from a thread on a free port: ``(studio, url)``."""
    torch.set_num_threads(1)
    model, tok = make_tiny_model("llama")
    app = Studio(model, tok, model_name="tiny-llama", workdir=tmp_path / "work", edit_config=TINY_EDIT)
    blocks, url = launch(app, host="127.0.0.1", port=free_port(), block=False, quiet=True)
    yield app, url
    blocks.close()


def text(page, selector):
    return page.locator(selector).inner_text()


def fill(page, elem_id, value):
    page.locator(f"#{elem_id}").locator("textarea, input").first.fill(str(value))


def wait_text(page, selector, pattern, timeout=STEP_MS):
    """Wait until ``selector``'s text matches ``pattern`` (a regex); return the text."""
    deadline = time.monotonic() + timeout / 1000
    while True:
        value = text(page, selector)
        if re.search(pattern, value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{selector}: {pattern!r} not shown within {timeout / 1000:.0f} s; it shows {value!r}")
        page.wait_for_timeout(100)


def test_trace_edit_disable_revert_in_the_browser(browser, served):
    app, url = served
    base = weights(app.model)
    start = time.monotonic()
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.wait_for_selector("#prompt textarea", timeout=STEP_MS)
    assert "tiny-llama" in text(page, "body")

    # 1. trace: top predictions, the heatmaps, the suggested layer (Layer(s) stays blank: the method's default)
    fill(page, "prompt", PROMPT)
    fill(page, "subject", SUBJECT)
    page.click("#trace-btn")
    info = wait_text(page, "#trace-info", r"Suggested layer: \d+")
    layer = re.search(r"Suggested layer: (\d+)", info).group(1)
    assert f"type {layer} there" in info and page.locator("#layers textarea").input_value() == ""
    page.locator("#heatmap img").first.wait_for(state="visible", timeout=STEP_MS)  # the image follows the text
    top = app.predict(PROMPT)[0][0].strip()
    assert text(page, "#top [data-testid='label-output-value']") == top != TARGET

    # 2. edit (at layer 1, where a tiny model's edit wins the top-1): before / after side by side
    fill(page, "target", TARGET)
    fill(page, "layers", 1)
    fill(page, "question", QUESTION)
    answer_before = app.ask(QUESTION)
    page.click("#edit-btn")
    wait_text(page, "#edit-info", rf"Applied rome-1 .* now {TARGET}\.")
    assert text(page, "#before [data-testid='label-output-value']") == top
    assert text(page, "#after [data-testid='label-output-value']") == TARGET
    compare = text(page, "#compare")
    assert "edit prompt" in compare and "paraphrase" in compare and "neighbour" in compare
    assert page.locator("#gen-after textarea").input_value().startswith(PROMPT)
    assert page.locator("#answer-before textarea").input_value() == answer_before  # asked in chat form
    (tab,) = [s for s in app.sessions if s != "local"]  # the browser tab's session holds the edit
    assert page.locator("#answer-after textarea").input_value() == app.ask(QUESTION, session=tab) != answer_before
    edits = wait_text(page, "#edits", r"rome-1")
    assert f"{SUBJECT} → {TARGET}" in edits and "active (merged)" in edits
    assert page.locator("#edit-name input").input_value() == "rome-1"
    assert [e.name for e in hf_knowedit.list_edits(app.model)] == ["rome-1"]

    # 3. disable: the model is the base model again; enable: the edit is back
    page.click("#toggle-btn")
    wait_text(page, "#edits", r"disabled")
    assert "Disabled rome-1" in text(page, "#manage-info")
    assert all(torch.equal(base[k], v) for k, v in weights(app.model).items())
    page.click("#predict-btn")
    wait_text(page, "#top [data-testid='label-output-value']", rf"^{re.escape(top)}$")
    page.click("#toggle-btn")
    wait_text(page, "#edits", r"active \(merged\)")
    page.click("#predict-btn")
    wait_text(page, "#top [data-testid='label-output-value']", rf"^{TARGET}$")

    # 4. an error shows the library's message, not a traceback, and changes nothing
    fill(page, "subject", "Angola")
    page.click("#trace-btn")
    page.wait_for_selector("text=does not occur in prompt", timeout=STEP_MS)
    body = text(page, "body")
    assert "Subject 'Angola' does not occur in prompt" in body and "Traceback" not in body

    # 5. revert: the list is empty and the weights are the base weights, bit for bit
    page.click("#revert-btn")
    wait_text(page, "#manage-info", r"Reverted rome-1\.")
    assert "rome-1" not in wait_text(page, "#edits", r"^(?![\s\S]*rome-1)")
    assert hf_knowedit.list_edits(app.model) == [] and not any(s.sets for s in app.sessions.values())
    assert all(torch.equal(base[k], v) for k, v in weights(app.model).items())
    page.close()
    print(f"browser walk-through: {time.monotonic() - start:.1f} s")

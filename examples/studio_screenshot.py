"""The screenshot in the README (docs/img/studio.png): the Edit Studio on the bundled SmolLM2-135M after an edit.

Serves the studio from a thread, drives Debian's Chromium with Playwright (``make studio-deps``), traces
"The Eiffel Tower is located in the city of", rewrites it to Rome with the studio's defaults (ROME at its
default layer, *Layer(s)* left blank; statistics ``identity``; no context templates: seconds on a CPU), and
saves a full-page screenshot. The neighbour "The Louvre museum is located in the city of" keeps Paris.

    python examples/studio_screenshot.py [--out docs/img/studio.png] [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from hf_knowedit._bundled import load_smollm2
from hf_knowedit.studio import EXAMPLES, Studio, free_port, launch

STEP_MS = 600_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/img/studio.png"))
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--samples", type=int, default=3, help="corrupted samples of the trace (default 3)")
    parser.add_argument("--width", type=int, default=1400)
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    model, tok = load_smollm2()
    app = Studio(model, tok, model_name="SmolLM2-135M-Instruct (bundled)")
    blocks, url = launch(app, port=free_port(), block=False, quiet=True)
    prompt, subject, target, paraphrase, neighbour, question = EXAMPLES[0]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium)
            page = browser.new_page(viewport={"width": args.width, "height": 1000}, device_scale_factor=1)
            page.goto(url)
            page.wait_for_selector("#prompt textarea")
            fields = {"prompt": prompt, "subject": subject, "target": target, "paraphrase": paraphrase,
                      "neighbour": neighbour, "question": question}  # fmt: skip
            for elem_id, value in fields.items():
                page.locator(f"#{elem_id} textarea").fill(value)
            page.locator("#samples input[type=number]").fill(str(args.samples))
            page.locator("#samples input[type=number]").press("Enter")
            t = time.perf_counter()
            page.click("#trace-btn")
            page.wait_for_selector("#trace-info :text('Suggested layer')", timeout=STEP_MS)
            print(f"trace: {time.perf_counter() - t:.1f} s;", page.locator("#trace-info").inner_text())
            t = time.perf_counter()
            page.click("#edit-btn")
            page.wait_for_selector("#edit-info :text('Applied')", timeout=STEP_MS)
            print(f"edit: {time.perf_counter() - t:.1f} s;", page.locator("#edit-info").inner_text())
            page.wait_for_timeout(500)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
            print("screenshot written to", args.out)
            browser.close()
    finally:
        blocks.close()


if __name__ == "__main__":
    main()

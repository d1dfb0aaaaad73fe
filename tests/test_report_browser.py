"""The report page in a real headless Chromium: the plots render, the knob dropdown recolours,
nothing is fetched from the network and the console stays free of errors.

Needs Debian's `chromium` (scripts/test.sh installs it) and the `playwright` Python package
(dev extra), which drives that browser; Playwright's own browser downloads are never used.
"""

import os
import shutil

import pytest

from atp_ray.search.report import write_report

from test_report import OBJECTIVES, synthetic_curves, synthetic_table

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def _missing(what: str) -> None:
    # scripts/test.sh installs the browser and sets ATP_RAY_REQUIRE_BROWSER: there, fail loudly.
    message = f"{what} (scripts/test.sh installs chromium; playwright is in the dev extra)"
    if os.environ.get("ATP_RAY_REQUIRE_BROWSER"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if CHROMIUM is None:
        _missing("chromium is not installed")
    try:
        from playwright import sync_api
    except ImportError:
        _missing("the playwright package is not installed")
    with sync_api.sync_playwright() as p:
        # A persistent context owns its fresh --user-data-dir, as the flags above require.
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1280, "height": 900},
        )
        yield context
        context.close()


def test_report_renders_in_chromium(browser, tmp_path):
    table = synthetic_table()
    write_report(table, OBJECTIVES, synthetic_curves(table), tmp_path, running=True)
    page = browser.new_page()
    problems, external = [], []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))

    def only_local(route):
        if not route.request.url.startswith(("file:", "data:", "blob:", "about:")):
            external.append(route.request.url)
            return route.abort()
        return route.continue_()

    page.route("**/*", only_local)
    page.goto((tmp_path / "report.html").as_uri(), wait_until="load")
    page.wait_for_selector("#front .main-svg", timeout=30_000)

    completed, pairs = int((table.status == "COMPLETED").sum()), 3
    assert page.locator("#front .scatterlayer .point").count() == completed * pairs
    assert page.locator("#curves .scatterlayer .trace").count() == 2 * len(table)  # loss and sparsity per trial
    assert page.locator("#hypervolume .scatterlayer .point").count() == completed
    assert page.locator(".banner").inner_text().startswith("The search is still running")
    assert page.locator("table.front tbody tr").count() == 3

    # The dropdown recolours the front by another knob (here a categorical one).
    fills = "es => es.map(e => e.style.fill)"
    before = page.locator("#front .scatterlayer .point").evaluate_all(fills)
    page.locator("#front .updatemenu-header-group").click()
    page.locator("#front .updatemenu-dropdown-button", has_text="train.optimizer").click()
    page.wait_for_function("document.querySelector('#front .cbtitle').textContent.includes('train.optimizer')")
    after = page.locator("#front .scatterlayer .point").evaluate_all(fills)
    assert len(set(after)) == 2 and after != before  # two optimizers, two colours

    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert problems == [] and external == []
    page.close()

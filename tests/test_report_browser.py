"""The report page in a real headless Chromium: the plots render, front members are drawn as
such, the knob dropdown recolours, nothing is fetched from the network and the console stays
free of errors. Here on a synthetic table; test_search.py opens a real search's report with the
same fixture and helpers.

Needs Debian's `chromium` (scripts/test.sh installs it) and the `playwright` Python package
(dev extra), which drives that browser; Playwright's own browser downloads are never used.
"""

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from atp_ray.search.report import write_report

from test_report import OBJECTIVES, elastic_curves, elastic_table, synthetic_curves, synthetic_table

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


# Plotly draws a diamond marker as four straight edges and a circle with arcs.
DIAMOND = re.compile(r"M[\d.]+,0L0,[\d.]+L-[\d.]+,0L0,-[\d.]+Z")


@dataclass
class OpenReport:
    """A report page loaded in Chromium, with what went wrong while it loaded."""

    page: Any
    problems: list[str] = field(default_factory=list)  # console errors and page errors
    external: list[str] = field(default_factory=list)  # requests that left the machine (aborted)


def open_report(browser: Any, report_html: Path) -> OpenReport:
    """Load ``report_html`` with the network cut off and wait until the front is drawn."""
    report = OpenReport(browser.new_page())
    page = report.page
    page.on("console", lambda m: report.problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: report.problems.append(f"page error: {e}"))

    def only_local(route):
        if not route.request.url.startswith(("file:", "data:", "blob:", "about:")):
            report.external.append(route.request.url)
            return route.abort()
        return route.continue_()

    page.route("**/*", only_local)
    page.goto(report_html.as_uri(), wait_until="load")
    page.wait_for_selector("#front .main-svg", timeout=30_000)
    return report


def _drawn_points(page: Any) -> list[tuple[str, str, str]]:
    """Every point drawn on the front panels: (its name from the hover text, SVG path, fill)."""
    drawn = page.evaluate(
        """() => {
            const gd = document.getElementById('front');
            return Array.from(gd.querySelectorAll('.scatterlayer .trace')).flatMap((trace, k) =>
                Array.from(trace.querySelectorAll('.point')).map(p =>
                    [gd.data[k].hovertext[p.__data__.i], p.getAttribute('d'), p.style.fill]));
        }"""
    )
    return [(re.match(r"<b>(.*?)</b>", hover).group(1), path, fill) for hover, path, fill in drawn]


def front_markers(page: Any) -> dict[str, bool]:
    """Point (trial id, or trial@budget) -> whether the front plot draws it as a front member (a
    diamond), read from the SVG. The dense model's star is left out (see ``dense_stars``).

    Every panel must draw a point the same way; each point's name comes from its hover text.
    """
    markers: dict[str, set[bool]] = {}
    for name, path, _ in _drawn_points(page):
        if name != "dense":
            markers.setdefault(name, set()).add(bool(DIAMOND.fullmatch(path)))
    assert all(len(kinds) == 1 for kinds in markers.values()), markers
    return {trial_id: kinds.pop() for trial_id, kinds in markers.items()}


def dense_stars(page: Any) -> list[tuple[str, str]]:
    """The dense model's markers on the front panels: (SVG path, fill) of each."""
    return [(path, fill) for name, path, fill in _drawn_points(page) if name == "dense"]


def front_table_ids(page: Any) -> list[str]:
    """The trial ids in the page's front-models table, top to bottom."""
    return page.locator("table.front tbody tr td:first-child").all_inner_texts()


def test_report_renders_in_chromium(browser, tmp_path):
    table = synthetic_table()
    write_report(table, OBJECTIVES, synthetic_curves(table), tmp_path, running=True)
    report = open_report(browser, tmp_path / "report.html")
    page, problems, external = report.page, report.problems, report.external

    completed, pairs = int((table.status == "COMPLETED").sum()), 3
    assert page.locator("#front .scatterlayer .point").count() == completed * pairs
    assert page.locator("#curves .scatterlayer .trace").count() == 2 * len(table)  # loss and sparsity per trial
    assert page.locator("#hypervolume .scatterlayer .point").count() == completed
    assert page.locator(".banner").inner_text().startswith("The search is still running")
    assert page.locator("table.front tbody tr").count() == 3
    front = pd.read_csv(tmp_path / "front.csv").trial_id.tolist()
    assert front_markers(page) == {t: t in front for t in table.trial_id[table.status == "COMPLETED"]}
    assert front_table_ids(page) == front

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


def test_an_elastic_report_draws_each_budget_as_a_point_and_the_dense_model_on_every_panel(browser, tmp_path):
    table = elastic_table()
    write_report(table, OBJECTIVES, elastic_curves(), tmp_path)
    report = open_report(browser, tmp_path / "report.html")
    page = report.page
    front = pd.read_csv(tmp_path / "front.csv")
    points = [f"{t}@{b:g}" if b == b else t for t, b in zip(front.trial_id, front.budget)]
    completed = table[table.status == "COMPLETED"]
    names = [f"{t}@{b:g}" if b == b else t for t, b in zip(completed.trial_id, completed.budget)]
    assert front_markers(page) == {n: n in points for n in names}  # every budget its own point
    pairs = 3
    stars = dense_stars(page)
    assert len(stars) == pairs and {fill for _, fill in stars} == {"rgb(214, 39, 40)"}  # a red star on every panel
    assert not any(DIAMOND.fullmatch(path) for path, _ in stars)
    assert "dense model" in page.locator("table.summary").inner_text()
    assert front_table_ids(page) == front.trial_id.tolist()

    # Colour by budget: the trials' points take three colours (0.2, 0.4, 0.6; s1 has none); the star keeps its own.
    page.locator("#front .updatemenu-header-group").click()
    page.locator("#front .updatemenu-dropdown-button", has_text="budget").click()
    page.wait_for_function("document.querySelector('#front .cbtitle').textContent.includes('budget')")
    fills = {name: fill for name, _, fill in _drawn_points(page)}
    assert len({fills[n] for n in names if "@" in n}) == 3
    assert {fill for _, fill in dense_stars(page)} == {fill for _, fill in stars}
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert report.problems == [] and report.external == []
    page.close()

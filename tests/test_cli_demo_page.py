"""The demo's page, ``index.html``: the paper's three results at a glance, rendered by Chromium."""

import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from captum_pattern import Patterns
from captum_pattern.demo import DEGRADATION_METHODS, run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return run_demo(out, epochs=1, n_images=2, size=8, progress=False)


def _table(page, first_header):
    """The rows of the table whose header row starts with ``first_header``, as lists of cells."""
    table = re.search(rf"<table><tr><th>{first_header}</th>(.*?)</table>", page, re.S).group(1)
    rows = re.findall(r"<tr>(.*?)</tr>", table, re.S)
    return [re.findall(r"<td>(.*?)</td>", row) for row in rows if "<td>" in row]


def test_the_page_shows_the_figure_the_rho_table_and_the_curves(demo):
    page = demo.page.read_text()
    for source in re.findall(r'<img src="([^"]+)"', page):
        assert (demo.out_dir / source).is_file(), source
    assert re.findall(r'<img src="([^"]+)"', page) == ["comparison.png", "degradation.png"]
    rho = {row[0]: [float(v) for v in row[1:]] for row in _table(page, "layer")}
    assert list(rho) == list(Patterns.load(demo.patterns))  # a row per fitted layer
    for name, (random, filter_, linear, two_component) in rho.items():
        # the paper's Fig. 3: the learned estimators beat the filter and random ones
        assert min(linear, two_component) > max(filter_, random) + 0.3, (name, rho[name])
    areas = {row[0]: float(row[1]) for row in _table(page, "method")}
    assert list(areas) == [*DEGRADATION_METHODS, "random order"]
    assert areas["PatternAttribution"] < areas["random order"]  # the paper's Fig. 4
    assert {"rho", "degradation"} <= set(demo.stages)


@pytest.mark.slow  # starts a browser
def test_the_page_renders_in_headless_chromium(demo, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium (apt-get install -y chromium)")
    shot = tmp_path / "page.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
           "--window-size=1280,2000", demo.page.resolve().as_uri()]  # fmt: skip
    subprocess.run(cmd, capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (2000, 1280)
    # not blank, nor cut short: text, tables and figures put dark pixels in every third of the
    # page's first 1500 px (the figures' files are checked in the test above)
    for third in np.array_split(pixels[:1500], 3):
        assert (third < 128).mean() > 0.005

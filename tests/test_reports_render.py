"""The HTML reports render in headless Chromium: each page is screenshotted and the picture
checked for content (text and the orange shading/bars), not just written. Skipped where no
Chromium is installed."""
from __future__ import annotations

import shutil
import struct
import subprocess
import zlib

import numpy as np
import pytest

pytest.importorskip("pyarrow")
pytest.importorskip("transformers")

import saehook  # noqa: E402
from saehook.cli import main  # noqa: E402

import gguf_models as gm  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium installed")


def read_png(path) -> np.ndarray:
    """RGB(A) 8-bit PNG -> (h, w, channels) uint8, with the five scanline filters undone."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, w = 8, b"", 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, ctype = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and ctype in (2, 6)
            ch = 4 if ctype == 6 else 3
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = zlib.decompress(idat)
    stride = w * ch
    img = np.zeros((h, stride), np.uint8)
    prev = np.zeros(stride, np.int32)
    for y in range(h):
        f, line = raw[y * (stride + 1)], np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(np.int32)
        out = np.zeros(stride, np.int32)
        for x in range(stride):
            a = out[x - ch] if x >= ch else 0
            b = prev[x]
            c = prev[x - ch] if x >= ch else 0
            if f == 0:
                pred = 0
            elif f == 1:
                pred = a
            elif f == 2:
                pred = b
            elif f == 3:
                pred = (a + b) // 2
            else:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            out[x] = (line[x] + pred) & 0xFF
        img[y] = out
        prev = out
    return img.reshape(h, w, ch)[:, :, :3]


def screenshot(html_path, png_path):
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={png_path}.profile", "--window-size=800,500",
                    f"--screenshot={png_path}", f"file://{html_path}"],
                   check=True, capture_output=True, timeout=120)
    return read_png(png_path)


def assert_has_content(img):
    dark = (img.max(axis=2) < 100).mean()              # text
    orange = ((img[:, :, 0] > 200) & (img[:, :, 1] > 80) & (img[:, :, 1] < 200) & (img[:, :, 2] < 120)).mean()
    assert dark > 0.002 and orange > 0.0005, (dark, orange)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    d = tmp_path_factory.mktemp("render")
    gm.build_hf_model(seed=2).save_pretrained(d / "hf")
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((256, 256)) / 16).astype(np.float32)
    saehook.SAE(W, W, k=6, activation="topk_relu", metadata={"layer": 1}).save(d / "sae.safetensors")
    for name, extra in (("a", "xxxxx"), ("b", "")):
        docs = ["".join(rng.choice(list("abcdefgh " + extra), 30)) for _ in range(6)]
        (d / f"{name}.txt").write_text("\n".join(docs))
        assert main(["capture", str(d / "hf"), "--sae", str(d / "sae.safetensors"), "--data", str(d / f"{name}.txt"),
                     "--out", str(d / name)]) == 0
    assert main(["features", str(d / "hf"), "--sae", str(d / "sae.safetensors"), "abc xx cab", "--html", str(d / "f.html")]) == 0
    assert main(["stats", str(d / "a")]) == 0
    assert main(["compare", str(d / "a"), str(d / "b"), "--html", str(d / "c.html")]) == 0
    return {"features": d / "f.html", "stats": d / "a" / "stats-layer1.html", "compare": d / "c.html"}


@pytest.mark.parametrize("page", ["features", "stats", "compare"])
def test_report_renders_with_content(reports, page, tmp_path):
    img = screenshot(reports[page], tmp_path / f"{page}.png")
    assert img.shape[0] >= 400 and img.shape[1] >= 700
    assert_has_content(img)


def test_blank_page_fails_the_check(tmp_path):
    (tmp_path / "blank.html").write_text("<html><body style='background:#fff'></body></html>")
    with pytest.raises(AssertionError):
        assert_has_content(screenshot(tmp_path / "blank.html", tmp_path / "blank.png"))

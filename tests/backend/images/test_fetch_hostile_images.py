"""Unusual image encodings from the user's side (embedded mode, tiny model): EXIF-rotated, 16-bit, alpha and
CMYK images are labelled exactly as the plain RGB image the annotator saw, so masks stay aligned."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from backend_support import data_uri, predict, rect

pytestmark = pytest.mark.hardening

W, H = 80, 60  # as displayed
REGIONS = [rect("left", x=5, y=10, w=30, h=70), rect("corner", x=60, y=5, w=35, h=30, rotation=15)]


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def reference(mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(42)
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (H, W), dtype=np.uint8), "L")
    # smooth-ish content so that different regions really see different pixels
    yy, xx = np.mgrid[0:H, 0:W]
    rgb = np.stack([xx * 3 % 256, yy * 4 % 256, rng.integers(0, 256, (H, W))], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def exif_rotated() -> bytes:
    """Pixels stored turned by 90 degrees with EXIF orientation 6: displayed as :func:`reference`."""
    stored = reference().transpose(Image.Transpose.ROTATE_90)
    exif = stored.getexif()
    exif[0x0112] = 6
    data = encode(stored, exif=exif)
    assert np.array_equal(np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data)))), np.asarray(reference()))
    return data


def sixteen_bit() -> bytes:
    grey = np.asarray(reference("L")).astype(np.uint16) * 257
    img = Image.fromarray(grey)
    assert img.mode.startswith("I;16")
    data = encode(img)
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    return data


def opaque_rgba() -> bytes:
    return encode(reference().convert("RGBA"))


def labels_of(client, image: bytes) -> dict[str, tuple]:
    resp = predict(client, "rectangle", [{"id": 1, "data": {"image": data_uri(image)}}], context={"result": REGIONS})
    assert resp.status_code == 200, resp.get_json()
    (pred,) = resp.get_json()["results"]
    assert pred["maskinv"]["errors"] == []
    return {r["id"]: (r["value"]["rectanglelabels"], r["meta"]["text"], r["score"])
            for r in pred["result"] if r["type"] == "rectanglelabels"}


@pytest.mark.parametrize("variant, plain", [
    (exif_rotated, lambda: encode(reference())),
    (sixteen_bit, lambda: encode(reference("L"))),
    (opaque_rgba, lambda: encode(reference())),
])
def test_encodings_are_labelled_like_the_displayed_image(client, variant, plain):
    assert labels_of(client, variant()) == labels_of(client, plain())


def test_exif_rotation_matters_for_the_regions(client):
    """Control: the same stored pixels without the EXIF tag give other answers, so the test above is not vacuous."""
    untagged = encode(reference().transpose(Image.Transpose.ROTATE_90).resize((W, H)))
    assert labels_of(client, untagged) != labels_of(client, exif_rotated())


def test_cmyk_and_palette_images_are_labelled(client):
    cmyk = encode(reference().convert("CMYK"), "JPEG", quality=95)
    as_rgb = encode(Image.open(io.BytesIO(cmyk)).convert("RGB"))
    assert labels_of(client, cmyk) == labels_of(client, as_rgb)
    palette = reference().convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    assert labels_of(client, encode(palette)) == labels_of(client, encode(palette.convert("RGB")))

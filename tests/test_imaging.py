import numpy as np
import pytest
from conftest import radiograph, save_dicom, save_png

from cxrsynth.imaging import ImageError, Preprocess, decode_png, encode_png, pad_to_square, preprocess, read_image


def test_pad_to_square_keeps_aspect_and_centres():
    image = np.full((10, 4), 200, np.uint8)
    out = pad_to_square(image)
    assert out.shape == (10, 10)
    assert (out[:, 3:7] == 200).all() and (out[:, :3] == 0).all() and (out[:, 7:] == 0).all()


def test_preprocess_size_and_equalization():
    image = radiograph(0, 80, 96)
    out = preprocess(image, Preprocess(size=32))
    assert out.shape == (32, 32) and out.dtype == np.uint8
    assert out.max() == 255  # equalization stretches the histogram
    flat = preprocess(image, Preprocess(size=32, equalize=False))
    assert not np.array_equal(out, flat)
    hist = np.bincount(out.ravel(), minlength=256)
    assert (hist > 0).sum() > 20


def test_png_roundtrip_is_lossless_and_deterministic():
    image = radiograph(1)
    assert np.array_equal(decode_png(encode_png(image)), image)
    assert encode_png(image) == encode_png(image.copy())


def test_read_png_and_errors(tmp_path):
    save_png(tmp_path / "a.png", radiograph(2))
    assert read_image(tmp_path / "a.png").shape == (96, 80)
    with pytest.raises(ImageError, match="missing"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(ImageError, match="corrupt"):
        read_image(tmp_path / "bad.jpg")


def test_dicom_monochrome1_is_inverted(tmp_path):
    image = radiograph(3)
    save_dicom(tmp_path / "m2.dcm", image)
    save_dicom(tmp_path / "m1.dcm", image, monochrome1=True)
    m2, m1 = read_image(tmp_path / "m2.dcm"), read_image(tmp_path / "m1.dcm")
    lungs = image < 100
    # Both read with dark lungs and bright body: MONOCHROME1 was inverted on read.
    for out in (m1, m2):
        assert out[lungs].mean() < out[~lungs].mean() - 50
    assert np.abs(m1.astype(int) - m2.astype(int)).max() <= 1


def test_dicom_voi_window_is_applied(tmp_path):
    image = radiograph(4)
    save_dicom(tmp_path / "w.dcm", image, window=(160 * 16, 40 * 16))  # narrow window on the body
    save_dicom(tmp_path / "plain.dcm", image)
    windowed, plain = read_image(tmp_path / "w.dcm"), read_image(tmp_path / "plain.dcm")
    lungs = image < 100
    assert (windowed[lungs] == 0).mean() > 0.9  # lungs fall below the window: clipped black
    assert (plain[lungs] == 0).mean() < 0.5  # without a window they keep their grey levels


def test_png_header_reads_the_size_without_decoding():
    from cxrsynth import imaging

    png = imaging.encode_png(np.zeros((20, 30), dtype=np.uint8))
    assert imaging.png_header(png) == imaging.PngHeader(width=30, height=20, depth=8, colour=0)
    with pytest.raises(imaging.ImageError, match="not a PNG"):
        imaging.png_header(b"GIF89a" + png[6:])

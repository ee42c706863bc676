import cv2
import numpy as np

from drseg.preprocess import clahe, fov_mask, resize_mask, working_size


def _disc_photograph(size: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A dim, low-contrast orange disc on black with faint dark blobs: CLAHE should lift them."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.4 * size) ** 2
    shading = 0.8 + 0.2 * xx / size + rng.normal(0, 0.01, (size, size))
    image = shading[..., None] * np.array([150.0, 75.0, 25.0])
    blobs = np.zeros((size, size), np.float32)
    for _ in range(40):
        cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
        cv2.circle(blobs, (int(cx), int(cy)), 3, 1.0, -1)
    image *= 1 - 0.08 * blobs[..., None]
    image[~disc] = 0
    return np.clip(image, 0, 255).astype(np.uint8), disc


def _blob_contrast(rgb: np.ndarray, disc: np.ndarray) -> float:
    """Lightness of the surroundings minus lightness of the blobs."""
    reference, _ = _disc_photograph()
    blobs = disc & (reference[..., 0] < cv2.GaussianBlur(reference[..., 0], (0, 0), 6) - 4)
    ring = cv2.dilate(blobs.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool) & ~blobs
    lightness = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)[..., 0].astype(float)
    return float(lightness[ring & disc].mean() - lightness[blobs].mean())


def test_working_size_keeps_aspect_ratio() -> None:
    assert working_size(4288, 2848, 1024) == (1024, 680)
    assert working_size(4288, 2848, 2048) == (2048, 1360)


def test_fov_is_the_bright_disc() -> None:
    image, disc = _disc_photograph()
    fov = fov_mask(image)
    assert (fov == disc).mean() > 0.995


def test_fov_fills_dark_lesions_inside() -> None:
    image, _ = _disc_photograph()
    image[100:110, 100:110] = 0  # a black blot inside the field of view is not background
    assert fov_mask(image)[100:110, 100:110].all()


def test_resize_mask_keeps_area_unbiased() -> None:
    rng = np.random.default_rng(1)
    mask = np.zeros((800, 800), bool)
    for _ in range(300):
        y, x = rng.integers(0, 790, 2)
        mask[y : y + 8, x : x + 8] = True
    small = resize_mask(mask, (200, 200))
    assert small.dtype == np.bool_
    assert abs(small.sum() * 16 / mask.sum() - 1) < 0.1


def test_clahe_keeps_border_black_and_raises_local_contrast() -> None:
    image, disc = _disc_photograph()
    out = clahe(image, disc, clip_limit=2.0, tile_grid=8)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert not out[~disc].any()

    assert _blob_contrast(out, disc) > 1.5 * _blob_contrast(image, disc) > 0


def test_clahe_rim_is_not_overbrightened() -> None:
    """Rim tiles see the inside mean, not black, so the rim stays close to the centre."""
    image, disc = _disc_photograph()
    out = clahe(image, disc, clip_limit=2.0, tile_grid=8)
    lightness = cv2.cvtColor(out, cv2.COLOR_RGB2LAB)[..., 0].astype(float)
    ring = disc & ~cv2.erode(disc.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    centre = np.zeros_like(disc)
    centre[118:138, 118:138] = True
    assert abs(lightness[ring].mean() - lightness[centre].mean()) < 20

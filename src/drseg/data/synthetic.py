"""Synthetic fundus photographs with pixel-exact lesion masks.

Why: the test suite and the demo need labelled photographs that behave like IDRiD (see
DOMAIN.md) without the real data set. What a model must learn from them is what it must
learn from real photographs: lesions are small, rare and defined by LOCAL colour contrast
against a background whose colour varies between and within photographs. So every lesion is
painted as a multiplicative change of the local background, never as an absolute colour, and
its mask is exactly the set of pixels where the paint weight is at least 0.5.

Lengths follow DOMAIN.md at 1024 px wide and scale with width / 1024.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image
from tqdm import tqdm

from drseg.atomic import write_bytes
from drseg.data.layouts import IDRID_FOLDERS, IDRID_IMAGES, IDRID_MASKS

SYNTH_CLASSES: tuple[str, ...] = ("MA", "HE", "EX", "SE", "OD")

F32 = npt.NDArray[np.float32]
Mask = npt.NDArray[np.bool_]

_ASPECT = 2848 / 4288  # IDRiD height / width
_MIN_WIDTH = 64
_BG_MEAN = np.array([167.0, 81.0, 23.0], np.float32)
_BG_STD = np.array([23.0, 14.0, 20.0], np.float32)
_BG_LOW = np.array([105.0, 42.0, 4.0], np.float32)
_BG_HIGH = np.array([230.0, 125.0, 75.0], np.float32)
_DISC_DIAMETER = 125.0  # px at width 1024
# Core colour ratios (lesion / local background), before per-lesion strength.
_MA_RATIO = np.array([0.90, 0.76, 0.84], np.float32)
_HE_RATIO = np.array([0.87, 0.72, 0.84], np.float32)
_EX_RATIO = np.array([1.05, 1.26, 1.08], np.float32)
_SE_RATIO = np.array([1.03, 1.30, 1.50], np.float32)
_VESSEL_DARKENING = np.array([0.30, 0.50, 0.42], np.float32)  # per channel, darkest vessel
_NOISE_STD = 1.6  # fine sensor noise, grey levels
_TRIES = 8  # places tried per lesion before it is dropped
_MIN_AREA = 0.5  # px; smaller lesions vanish at this width, as they do in a downscaled photograph
# Hard exudate plaques: IDRiD's exudate pixels are 0.8-1.1% of a photograph although half of
# its exudates are under 13 px (DOMAIN.md); the rest of that share is in a few large plaques
# beyond the 99th percentile of component areas. Without them the exudates covered 0.54% of
# the photograph (54 photographs measured, bench/RESULTS.md), half of IDRiD's share.
_EX_PLAQUE_CHANCE = 0.004  # per exudate: about 0.6 plaques per photograph, under 1% of exudates
_EX_PLAQUE_AREA = 3500.0  # px at width 1024, median of the plaques

_IDRID_IMAGES = Path("A. Segmentation", IDRID_IMAGES, "a. Training Set")
_IDRID_MASKS = Path("A. Segmentation", IDRID_MASKS, "a. Training Set")


@dataclass(frozen=True)
class SyntheticPhotograph:
    """One photograph: RGB uint8 image, a bool mask per class in SYNTH_CLASSES, and the FOV."""

    image: npt.NDArray[np.uint8]
    masks: dict[str, Mask]
    fov: Mask


@dataclass(frozen=True)
class _Eye:
    """Where things are in one photograph (pixels); `temporal` is +1 when the macula is right."""

    w: int
    h: int
    s: float
    cx: float
    cy: float
    r: float
    disc_x: float
    disc_y: float
    disc_rx: float
    disc_ry: float
    mac_x: float
    mac_y: float
    temporal: int

    @property
    def disc_d(self) -> float:
        return self.disc_rx + self.disc_ry


def _draw_eye(rng: np.random.Generator, w: int, h: int) -> _Eye:
    s = w / 1024
    cx = w / 2 + rng.normal(0, 0.008 * w)
    cy = h / 2 + rng.normal(0, 0.008 * h)
    r = 0.40 * w * (1 + rng.normal(0, 0.012))
    disc_side = 1 if rng.random() < 0.5 else -1
    disc_r = _DISC_DIAMETER * s / 2 * math.exp(rng.normal(0, 0.07))
    elong = rng.uniform(1.0, 1.1)  # discs are slightly taller than wide
    disc_x = cx + disc_side * rng.uniform(0.23, 0.28) * w
    disc_y = cy + rng.normal(0, 0.03) * h
    temporal = -disc_side
    mac_x = disc_x + temporal * 2.5 * 2 * disc_r * rng.uniform(0.92, 1.08)
    mac_y = disc_y + 2 * disc_r * rng.uniform(0.0, 0.3)
    return _Eye(
        w, h, s, cx, cy, r, disc_x, disc_y, disc_r / math.sqrt(elong), disc_r * math.sqrt(elong),
        mac_x, mac_y, temporal,
    )  # fmt: skip


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> F32:
    """Zero-mean, roughly unit-variance noise with about `cells` blobs across the width."""
    gw = max(2, cells)
    gh = max(2, round(cells * h / w))
    small = rng.standard_normal((gh, gw), dtype=np.float32)
    return np.asarray(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC), np.float32)


def _background(rng: np.random.Generator, eye: _Eye, base: F32, segs: F32, darkness: F32) -> F32:
    """Orange-red retina: uneven light, vignetting towards the rim, a darker macula, and a
    whitish nerve-fibre sheen along the arcades (a bright structure that is not a lesion).

    Everything here is smooth, so it is computed on a quarter-resolution grid and upsampled.
    It is scaled so that the FOV, vessels included, has the mean colour `base`.
    """
    sw, sh = max(16, eye.w // 4), max(16, eye.h // 4)
    xs = ((np.arange(sw, dtype=np.float32) + 0.5) * np.float32(eye.w / sw) - 0.5)[None, :]
    ys = ((np.arange(sh, dtype=np.float32) + 0.5) * np.float32(eye.h / sh) - 0.5)[:, None]
    # Uneven illumination: a tilt across the FOV plus smooth blotches of several sizes.
    tilt = rng.uniform(0.08, 0.25)
    tilt_dir = rng.uniform(0, math.tau)
    tilt_x, tilt_y = tilt * math.cos(tilt_dir) / eye.r, tilt * math.sin(tilt_dir) / eye.r
    texture = (
        1
        + np.float32(tilt_x) * (xs - np.float32(eye.cx))
        + np.float32(tilt_y) * (ys - np.float32(eye.cy))
        + 0.10 * _smooth_noise(rng, sh, sw, 3)
        + 0.03 * _smooth_noise(rng, sh, sw, 10)
        + 0.012 * _smooth_noise(rng, sh, sw, 48)
    )
    rho2 = ((xs - eye.cx) ** 2 + (ys - eye.cy) ** 2) / np.float32(eye.r**2)
    vignette = 1 - np.float32(rng.uniform(0.35, 0.55)) * rho2 * rho2
    dm2 = (xs - eye.mac_x) ** 2 + (ys - eye.mac_y) ** 2
    dd = eye.disc_d
    fovea = np.exp(dm2 * np.float32(-1 / (2 * (0.45 * dd) ** 2)))
    macula = np.exp(dm2 * np.float32(-1 / (2 * (1.3 * dd) ** 2)))
    lum = texture * vignette
    depth = rng.uniform(0.14, 0.28)
    fov = rho2 < 1
    dark = np.asarray(cv2.resize(darkness, (sw, sh), interpolation=cv2.INTER_AREA), np.float32)
    sheen = np.zeros((sh, sw), np.float32)
    to_small = np.array([sw / eye.w, sh / eye.h, sw / eye.w, sh / eye.h], np.float32)
    for x0, y0, x1, y1 in (segs[segs[:, 4] >= 4.5 * eye.s, :4] * to_small).tolist():
        cv2.line(sheen, (round(x0), round(y0)), (round(x1), round(y1)), (1.0,), max(1, sw // 40))
    sheen = np.asarray(cv2.GaussianBlur(sheen, (0, 0), sw / 80), np.float32)
    sheen *= np.float32(rng.uniform(0.03, 0.2))
    chans = []
    for c, (k, tint) in enumerate(((0.8, 0.0), (1.1, 0.03), (1.1, 0.05))):
        chan = lum * (1 - np.float32(depth * k) * fovea - np.float32(0.08 * k) * macula)
        chan *= 1 + np.float32((0.4, 1.0, 1.3)[c]) * sheen
        if tint:
            chan *= 1 + np.float32(tint) * _smooth_noise(rng, sh, sw, 4)
        seen = (chan * (1 - _VESSEL_DARKENING[c] * dark))[fov].mean()
        chans.append(chan * (base[c] / seen))
    small = cv2.merge(chans)
    return np.asarray(cv2.resize(small, (eye.w, eye.h), interpolation=cv2.INTER_LINEAR), np.float32)


def _vessel_tree(rng: np.random.Generator, eye: _Eye) -> F32:
    """Segments (x0, y0, x1, y1, width, darkness) of a vessel tree grown from the disc.

    Grown in a frame where the macula lies to the right of the disc, then mirrored: four
    arcades (each a vein and an artery) leave the disc, the temporal ones bend around the
    macula, every vessel branches and thins, and none enters the foveal avascular zone.
    """
    s, dd = eye.s, eye.disc_d
    m = eye.temporal
    cx = eye.disc_x + m * (eye.cx - eye.disc_x)
    mx = eye.disc_x + m * (eye.mac_x - eye.disc_x)
    my, cy, r = eye.mac_y, eye.cy, eye.r
    step = 8.0 * s
    avoid_r, faz_r = 1.1 * dd, 0.35 * dd
    stack: list[tuple[float, float, float, float, float, float, float, int]] = []
    for sup in (-1.0, 1.0):
        arc_len = rng.uniform(0.6, 0.75) * eye.w
        turn = math.radians(rng.uniform(95, 120))
        a0 = math.radians(rng.uniform(68, 80))
        for width, dark, da in ((8.5, 1.0, 0.0), (6.0, 0.75, rng.uniform(0.08, 0.2))):
            ang = sup * (a0 + da)
            stack.append((ang, -sup * turn / arc_len, width * s, arc_len, dark, 0.0, 0.0, 0))
            nasal_len = rng.uniform(0.28, 0.42) * eye.w
            n_ang = sup * (math.pi - a0 + rng.uniform(0.0, 0.35) + da)
            n_curv = sup * math.radians(rng.uniform(0, 35)) / nasal_len
            stack.append((n_ang, n_curv, width * 0.8 * s, nasal_len, dark, 0.0, 0.0, 1))
        small_len = rng.uniform(1.3, 2.0) * dd
        stack.append((sup * rng.uniform(0.1, 0.4), 0.0, 2.5 * s, small_len, 0.7, 0.0, 0.0, 2))
        stack.append((math.pi + sup * rng.uniform(0.2, 0.6), 0.0, 3.5 * s, 1.5 * dd, 0.8, 0, 0, 2))
    segs: list[tuple[float, float, float, float, float, float]] = []
    while stack and len(segs) < 8000:
        ang, curv, width, length, dark, ox, oy, depth = stack.pop()
        x, y = eye.disc_x + ox, eye.disc_y + oy
        n = max(1, int(length / step))
        for i in range(n):
            ang += curv * step + rng.normal(0, 0.035)
            dxm, dym = x - mx, y - my
            dm = math.hypot(dxm, dym)
            if dm < faz_r:
                break
            if dm < avoid_r:
                away = math.atan2(dym, dxm)
                diff = math.remainder(ang - away, math.tau)
                if abs(diff) > math.pi / 2:  # heading inwards: turn along the tangent
                    tangent = away + math.copysign(math.pi / 2, diff)
                    ang += 0.35 * math.remainder(tangent - ang, math.tau)
            nx, ny = x + step * math.cos(ang), y + step * math.sin(ang)
            w_now = width * (1 - 0.45 * i / n)
            segs.append((x, y, nx, ny, w_now, dark))
            if (nx - cx) ** 2 + (ny - cy) ** 2 > (r + 2 * step) ** 2 or w_now < 0.6 * s:
                break
            spacing = (0.09 if depth == 0 else 0.12) * eye.w
            if depth < 3 and w_now > 1.4 * s and rng.random() < step / spacing:
                child_w = w_now * rng.uniform(0.4, 0.7)
                child_len = rng.uniform(0.6, 1.6) * dd * math.sqrt(child_w / (2 * s))
                child_ang = ang + rng.choice((-1.0, 1.0)) * math.radians(rng.uniform(25, 65))
                child_curv = rng.normal(0, 0.8) / child_len
                stack.append(
                    (
                        child_ang, child_curv, child_w, child_len, dark * rng.uniform(0.85, 1.0),
                        nx - eye.disc_x, ny - eye.disc_y, depth + 1,
                    )
                )  # fmt: skip
                width *= 0.94
            x, y = nx, ny
    arr = np.asarray(segs, np.float32).reshape(-1, 6)
    arr[:, [0, 2]] = eye.disc_x + m * (arr[:, [0, 2]] - eye.disc_x)
    return arr


def _vessel_darkness(segs: F32, eye: _Eye) -> F32:
    """0..1 darkening map; thin vessels are fainter. Thin first so parents cover junctions."""
    canvas = np.zeros((eye.h, eye.w), np.uint8)
    shift = 4
    scale = 1 << shift
    for x0, y0, x1, y1, width, dark in segs[np.argsort(segs[:, 4], kind="stable")].tolist():
        contrast = dark * min(1.0, 0.2 + 0.8 * width / (6.0 * eye.s)) * min(1.0, width)
        p0 = (round(x0 * scale), round(y0 * scale))
        p1 = (round(x1 * scale), round(y1 * scale))
        thickness = max(1, round(width))
        cv2.line(canvas, p0, p1, (round(255 * contrast),), thickness, cv2.LINE_AA, shift)
    blurred = cv2.GaussianBlur(canvas.astype(np.float32), (0, 0), 0.4 + 0.3 * eye.s)
    return np.asarray(blurred, np.float32) * np.float32(1 / 255)


def _ellipse_distance(
    xs: F32, ys: F32, ex: float, ey: float, a: float, b: float, theta: float
) -> F32:
    """Approximate signed distance (px, positive inside) to an ellipse boundary."""
    c, s = math.cos(theta), math.sin(theta)
    u = (xs - ex) * c + (ys - ey) * s
    v = (ys - ey) * c - (xs - ex) * s
    ua, vb = u / np.float32(a * a), v / np.float32(b * b)
    f = 1 - (u * ua + v * vb)
    g = 2 * np.sqrt(ua * ua + vb * vb) + np.float32(1e-6)
    return np.asarray(f / g, np.float32)


class _Painter:
    """Paints lesions as local colour changes and keeps masks disjoint between classes."""

    def __init__(self, rng: np.random.Generator, eye: _Eye, rgb: F32, od: Mask) -> None:
        self.rng, self.eye, self.rgb = rng, eye, rgb
        self.masks: dict[str, Mask] = {c: np.zeros((eye.h, eye.w), bool) for c in SYNTH_CLASSES}
        self.masks["OD"] = od
        self.owner = np.zeros((eye.h, eye.w), np.uint8)  # 1 + class index of painted pixels

    def paint(
        self,
        cls: str,
        ellipses: list[tuple[float, float, float, float, float]],
        ratio: F32,
        soft: float,
        rough: float = 0.0,
    ) -> bool:
        """Paint the union of `ellipses` (x, y, a, b, angle); False if it was not placeable."""
        eye = self.eye
        ex, ey = ellipses[0][0], ellipses[0][1]
        reach = max(math.hypot(x - ex, y - ey) + max(a, b) for x, y, a, b, _ in ellipses)
        reach += soft + rough + 2
        margin = 4 * eye.s
        if math.hypot(ex - eye.cx, ey - eye.cy) + reach > 0.96 * eye.r:
            return False
        if math.hypot(ex - eye.disc_x, ey - eye.disc_y) < eye.disc_ry + reach + margin:
            return False
        x0, x1 = math.floor(ex - reach), math.ceil(ex + reach) + 1
        y0, y1 = math.floor(ey - reach), math.ceil(ey + reach) + 1
        if x0 < 0 or y0 < 0 or x1 > eye.w or y1 > eye.h:
            return False
        xs = np.arange(x0, x1, dtype=np.float32)[None, :]
        ys = np.arange(y0, y1, dtype=np.float32)[:, None]
        dist = np.max([_ellipse_distance(xs, ys, *e) for e in ellipses], axis=0)
        if rough:
            cells = self.rng.standard_normal((4, 4), dtype=np.float32)
            dist += rough * cv2.resize(cells, dist.shape[::-1], interpolation=cv2.INTER_CUBIC)
        weight = np.clip(0.5 + dist / np.float32(soft), 0, 1)
        core = weight >= 0.5
        if not core.any():
            return False
        touched = weight > 0
        owner = self.owner[y0:y1, x0:x1]
        code = SYNTH_CLASSES.index(cls) + 1
        if ((owner != 0) & (owner != code) & touched).any():
            return False
        owner[touched & (owner == 0)] = code
        self.rgb[y0:y1, x0:x1] *= 1 + weight[..., None] * (ratio - 1)
        self.masks[cls][y0:y1, x0:x1] |= core
        return True


def _split_lognormal(rng: np.random.Generator, median: float, lo: float, hi: float) -> float:
    """Right-skewed size: log-normal with a wider upper than lower half, as the areas are."""
    z = rng.standard_normal()
    return median * math.exp(z * (lo if z < 0 else hi))


def _lesion_count(rng: np.random.Generator, median: float, sigma: float, cap: int) -> int:
    return int(min(cap, max(1, round(median * math.exp(sigma * rng.standard_normal())))))


def _posterior_point(rng: np.random.Generator, eye: _Eye) -> tuple[float, float]:
    """Lesions gather at the posterior pole around the macula, with some anywhere."""
    if rng.random() < 0.6:
        return (
            eye.mac_x + rng.normal(0, 0.45 * eye.r),
            eye.mac_y + rng.normal(0, 0.35 * eye.r),
        )
    rad = eye.r * math.sqrt(rng.random())
    ang = rng.uniform(0, math.tau)
    return eye.cx + rad * math.cos(ang), eye.cy + rad * math.sin(ang)


def _near_vessel(
    rng: np.random.Generator, segs: F32, min_w: float, max_w: float, gap: float
) -> tuple[float, float, float]:
    """A point `gap` px beside a vessel of width in [min_w, max_w], and the vessel's angle."""
    pick = segs[(segs[:, 4] >= min_w) & (segs[:, 4] <= max_w)]
    if len(pick) == 0:
        pick = segs
    x0, y0, x1, y1, width, _ = pick[rng.integers(len(pick))]
    t = rng.random()
    ang = math.atan2(float(y1 - y0), float(x1 - x0))
    off = (width / 2 + gap) * rng.choice((-1.0, 1.0))
    x = float(x0 + t * (x1 - x0)) - off * math.sin(ang)
    y = float(y0 + t * (y1 - y0)) + off * math.cos(ang)
    return x, y, ang


def _strength(ratio: F32, k: float) -> F32:
    return np.asarray(1 + k * (ratio - 1), np.float32)


def _blob(
    rng: np.random.Generator, x: float, y: float, area: float, aspect: float, ang: float, parts: int
) -> list[tuple[float, float, float, float, float]]:
    """An irregular blob of about `area` px: a main ellipse plus `parts - 1` smaller lobes."""
    if parts > 1:
        area *= 0.85  # the lobes add about a sixth
    a = math.sqrt(area * aspect / math.pi)
    b = math.sqrt(area / (aspect * math.pi))
    out = [(x, y, a, b, ang)]
    for _ in range(parts - 1):
        phi = rng.uniform(0, math.tau)
        reach = rng.uniform(0.4, 0.85)
        u, v = reach * a * math.cos(phi), reach * b * math.sin(phi)
        lx = x + u * math.cos(ang) - v * math.sin(ang)
        ly = y + u * math.sin(ang) + v * math.cos(ang)
        k = rng.uniform(0.35, 0.65)
        out.append((lx, ly, k * a, k * b * rng.uniform(0.8, 1.3), ang + rng.normal(0, 0.5)))
    return out


def _add_microaneurysms(rng: np.random.Generator, p: _Painter, segs: F32) -> None:
    """Tiny round sharp dark-red dots, half of them just beside a small vessel."""
    s = p.eye.s
    for _ in range(_lesion_count(rng, 38, 0.8, 140)):
        area = min(90.0, _split_lognormal(rng, 14, 0.66, 0.62)) * s * s
        aspect, ang = rng.uniform(1.0, 1.25), rng.uniform(0, math.pi)
        ratio = _strength(_MA_RATIO, rng.uniform(0.75, 1.2))
        for _try in range(_TRIES if area >= _MIN_AREA else 0):
            if rng.random() < 0.5:
                x, y, _ = _near_vessel(rng, segs, 0, 5 * s, rng.uniform(1.5, 6) * s)
            else:
                x, y = _posterior_point(rng, p.eye)
            if p.paint("MA", _blob(rng, x, y, area, aspect, ang, 1), ratio, 0.6 + 0.4 * s):
                break


def _add_haemorrhages(rng: np.random.Generator, p: _Painter, segs: F32) -> None:
    """Dark-red blots anywhere, and flame shapes lying along a vessel."""
    s = p.eye.s
    for _ in range(_lesion_count(rng, 21, 0.85, 110)):
        area = min(4000.0, _split_lognormal(rng, 86, 0.97, 1.36)) * s * s
        flame = area > 40 * s * s and rng.random() < 0.4
        aspect = rng.uniform(2.0, 4.0) if flame else rng.uniform(1.0, 1.7)
        parts = 1 if flame or area < 100 * s * s else int(rng.integers(2, 5))
        ratio = _strength(_HE_RATIO, rng.uniform(0.75, 1.2))
        rough = 0.1 * math.sqrt(area / math.pi)
        for _try in range(_TRIES if area >= _MIN_AREA else 0):
            if flame:
                x, y, ang = _near_vessel(rng, segs, 1.5 * s, 9 * s, rng.uniform(1, 10) * s)
            else:
                x, y = _posterior_point(rng, p.eye)
                ang = rng.uniform(0, math.pi)
            ells = _blob(rng, x, y, area, aspect, ang, parts)
            if p.paint("HE", ells, ratio, soft=0.6 + 0.6 * s, rough=rough):
                break


def _add_exudates(rng: np.random.Generator, p: _Painter) -> None:
    """Hard exudates: small sharp yellow dots, mostly in clusters and partial rings."""
    eye, s = p.eye, p.eye.s
    n_dots = _lesion_count(rng, 100, 0.9, 460)
    n_clusters = min(12, 1 + int(rng.poisson(n_dots / 25)))
    sizes = rng.multinomial(int(n_dots * 0.85), np.full(n_clusters, 1 / n_clusters))
    for c, n in enumerate([*sizes.tolist(), n_dots - int(sizes.sum())]):
        # Cluster centres lie around the macula; the last group is scattered dots.
        dist = rng.uniform(0.4, 2.6) * eye.disc_d
        phi = rng.uniform(0, math.tau)
        cx, cy = eye.mac_x + dist * math.cos(phi), eye.mac_y + 0.8 * dist * math.sin(phi)
        ring = rng.random() < 0.4  # circinate: a partial ring of dots
        spread = rng.uniform(12, 45) * s if ring else rng.uniform(6, 28) * s
        arc0, arc_span = rng.uniform(0, math.tau), rng.uniform(1.5, 4.5)
        for _ in range(n):
            if rng.random() < _EX_PLAQUE_CHANCE:
                area = min(12000.0, _split_lognormal(rng, _EX_PLAQUE_AREA, 0.4, 0.5)) * s * s
            else:
                area = min(1500.0, _split_lognormal(rng, 11, 0.92, 1.4)) * s * s
            parts = 1 if area < 40 * s * s else int(rng.integers(2, 4))
            aspect, ang = rng.uniform(1.0, 1.5), rng.uniform(0, math.pi)
            k = rng.uniform(0.7, 1.05) * min(1.3, 1 + 0.08 * math.log(area / (13 * s * s)))
            ratio = _strength(_EX_RATIO, k)
            rough = 0.08 * math.sqrt(area / math.pi)
            for _try in range(_TRIES if area >= _MIN_AREA else 0):
                if c == n_clusters:
                    x, y = _posterior_point(rng, eye)
                elif ring:
                    phi = arc0 + arc_span * rng.random()
                    rad = spread * (1 + rng.normal(0, 0.12))
                    x, y = cx + rad * math.cos(phi), cy + rad * math.sin(phi)
                else:
                    x, y = cx + rng.normal(0, spread), cy + rng.normal(0, spread)
                ells = _blob(rng, x, y, area, aspect, ang, parts)
                if p.paint("EX", ells, ratio, 0.5 + 0.4 * s, rough):
                    break


def _add_cotton_wool(rng: np.random.Generator, p: _Painter, segs: F32) -> None:
    """Soft exudates in about half of the photographs: fluffy, soft-edged, near the arcades."""
    if rng.random() >= 0.5:
        return
    s = p.eye.s
    for _ in range(min(6, 1 + int(rng.poisson(1.3)))):
        area = min(3500.0, max(80.0, _split_lognormal(rng, 486, 0.79, 0.88))) * s * s
        aspect, parts = rng.uniform(1.2, 2.2), int(rng.integers(2, 5))
        ratio = _strength(_SE_RATIO, rng.uniform(0.8, 1.15))
        rad = math.sqrt(area / math.pi)
        for _try in range(2 * _TRIES):
            if rng.random() < 0.7:
                x, y, ang = _near_vessel(rng, segs, 3 * s, 10 * s, rng.uniform(2, 12) * s)
            else:
                x, y = _posterior_point(rng, p.eye)
                ang = rng.uniform(0, math.pi)
            ells = _blob(rng, x, y, area, aspect, ang, parts)
            if p.paint("SE", ells, ratio, soft=0.35 * rad + 1, rough=0.2 * rad):
                break


def _disc(rng: np.random.Generator, eye: _Eye, rgb: F32, base: F32) -> Mask:
    """Blend in the bright yellow-orange optic disc with its paler cup; returns its mask."""
    reach = int(eye.disc_d * 1.3)
    x0, x1 = max(0, int(eye.disc_x) - reach), min(eye.w, int(eye.disc_x) + reach)
    y0, y1 = max(0, int(eye.disc_y) - reach), min(eye.h, int(eye.disc_y) + reach)
    xs = np.arange(x0, x1, dtype=np.float32)[None, :]
    ys = np.arange(y0, y1, dtype=np.float32)[:, None]
    dist = _ellipse_distance(xs, ys, eye.disc_x, eye.disc_y, eye.disc_rx, eye.disc_ry, 0.0)
    alpha = np.clip(0.5 + dist / np.float32(7 * eye.s), 0, 1)
    cup_x = eye.disc_x + eye.temporal * 0.12 * eye.disc_rx
    cup_r = rng.uniform(0.3, 0.45) * eye.disc_rx
    cup = np.exp(((xs - cup_x) ** 2 + (ys - eye.disc_y) ** 2) * np.float32(-0.5 / cup_r**2))
    # A faint bright halo around the disc, fading to exactly 0 at the patch edge.
    halo_d2 = ((xs - eye.disc_x) ** 2 + (ys - eye.disc_y) ** 2) / np.float32(reach**2)
    halo = 0.12 * np.maximum(0, 1 - halo_d2) ** 2
    rim = base * np.array([1.55, 1.85, 2.2], np.float32) * np.float32(rng.uniform(0.94, 1.06))
    cup_col = rim * np.array([1.1, 1.4, 1.8], np.float32)
    col = rim + cup[..., None] * (cup_col - rim)
    col *= 1 + 0.04 * _smooth_noise(rng, y1 - y0, x1 - x0, 5)[..., None]
    patch = rgb[y0:y1, x0:x1]
    patch *= 1 + halo[..., None]
    patch += alpha[..., None] * (np.minimum(col, 255) - patch)
    mask = np.zeros((eye.h, eye.w), bool)
    mask[y0:y1, x0:x1] = alpha >= 0.5
    return mask


def synth_photograph(rng: np.random.Generator, width: int = 1024) -> SyntheticPhotograph:
    """One IDRiD-like photograph (height = width * 2848 / 4288) drawn from `rng`."""
    if width < _MIN_WIDTH:
        raise ValueError(f"synth_photograph: width={width} is too small, use >= {_MIN_WIDTH}")
    h = round(width * _ASPECT)
    eye = _draw_eye(rng, width, h)
    shared = rng.standard_normal()
    base = (
        _BG_MEAN
        + _BG_STD * np.float32(0.75 * shared)
        + _BG_STD * np.float32(0.66) * (rng.standard_normal(3).astype(np.float32))
    )
    base = np.clip(base, _BG_LOW, _BG_HIGH)
    segs = _vessel_tree(rng, eye)
    dark = _vessel_darkness(segs, eye)
    rgb = _background(rng, eye, base, segs, dark)
    od = _disc(rng, eye, rgb, base)
    rgb *= cv2.merge([1 - k * dark for k in _VESSEL_DARKENING.tolist()])

    xs = np.arange(width, dtype=np.float32)[None, :]
    ys = np.arange(h, dtype=np.float32)[:, None]
    dist = np.sqrt((xs - eye.cx) ** 2 + (ys - eye.cy) ** 2)
    fov = dist < eye.r
    painter = _Painter(rng, eye, rgb, od & fov)
    _add_cotton_wool(rng, painter, segs)
    _add_haemorrhages(rng, painter, segs)
    _add_exudates(rng, painter)
    _add_microaneurysms(rng, painter, segs)

    noise = rng.random(rgb.shape, dtype=np.float32) - np.float32(0.5)
    rgb += noise * np.float32(_NOISE_STD * math.sqrt(12))
    alpha = np.clip(np.float32(eye.r) - dist, 0, 1)
    rgb *= cv2.merge([alpha, alpha, alpha])
    np.clip(rgb, 0, 255, out=rgb)
    image = (rgb + np.float32(0.5)).astype(np.uint8)
    masks = {c: painter.masks[c] & fov for c in SYNTH_CLASSES}
    return SyntheticPhotograph(image=image, masks=masks, fov=fov)


def _encode(ext: str, array: cv2.typing.MatLike, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, array, params or [])
    if not ok:
        raise RuntimeError(f"cv2.imencode could not encode a {array.shape} array as {ext}")
    return bytes(buf.tobytes())


def _palette_tiff(mask: Mask) -> bytes:
    """IDRiD ground truth format: palette TIFF, values 0/1, index 1 red."""
    im = Image.fromarray(mask.astype(np.uint8))
    im.putpalette([0, 0, 0, 255, 0, 0])
    buf = io.BytesIO()
    im.save(buf, format="TIFF", compression="tiff_adobe_deflate")
    return buf.getvalue()


def write_synthetic_dataset(
    out: Path,
    n: int,
    seed: int,
    width: int = 1024,
    layout: Literal["idrid", "generic"] = "generic",
    progress: bool = True,
) -> list[str]:
    """Writes n photographs, returns their ids; `progress`: a progress bar on a terminal
    (off where the caller shows its own, as `drseg run`'s live table does).

    Photograph i depends only on (seed, i, width), so a larger n extends a smaller one. A mask
    file is written only for the classes present in a photograph, as in IDRiD.
    """
    if n < 0:
        raise ValueError(f"write_synthetic_dataset: n={n} must be >= 0")
    if layout not in ("idrid", "generic"):
        raise ValueError(f"write_synthetic_dataset: layout={layout!r}, use 'idrid' or 'generic'")
    out = Path(out)
    ids: list[str] = []
    digits = max(2, len(str(n))) if layout == "idrid" else max(4, len(str(n - 1)))
    disable = None if progress else True  # tqdm's None: shown on a terminal only
    for i in tqdm(range(n), desc=f"synthetic {layout}", unit="photo", disable=disable):
        photo = synth_photograph(np.random.default_rng([seed, i]), width)
        bgr = cv2.cvtColor(photo.image, cv2.COLOR_RGB2BGR)
        present = [c for c in SYNTH_CLASSES if photo.masks[c].any()]
        if layout == "idrid":
            name = f"IDRiD_{i + 1:0{digits}d}"
            jpg = _encode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
            write_bytes(out / _IDRID_IMAGES / f"{name}.jpg", jpg)
            for c in present:
                tif = _palette_tiff(photo.masks[c])
                write_bytes(out / _IDRID_MASKS / IDRID_FOLDERS[c] / f"{name}_{c}.tif", tif)
        else:
            name = f"synth_{i:0{digits}d}"
            write_bytes(out / "images" / f"{name}.png", _encode(".png", bgr))
            for c in present:
                png = _encode(".png", photo.masks[c].astype(np.uint8) * 255)
                write_bytes(out / "masks" / c / f"{name}.png", png)
        ids.append(name)
    return ids

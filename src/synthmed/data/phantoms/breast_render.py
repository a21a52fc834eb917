"""Pixels of phantom-breast: greyscale mammograms and breast ultrasound from a drawn patient.

Geometry lives in continuous image units (0..1 across the image), so image i at 128 px shows
the same anatomy as at 64 px; only the textures (noise fields, speckle) are drawn per pixel,
from their own stream (ultrasound at >= 192 px, then block-averaged). The findings (`Lesion`)
and patients are defined in breast_findings.py and drawn in breast.py.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from synthmed.data.phantoms.histology import _smooth_noise as smooth_noise
from synthmed.data.phantoms.breast_findings import Lesion, Patient


def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) in image units, each (H, W)."""
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    return yy, xx


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * z))


def lesion_field(yy, xx, cy, cx, les: Lesion, scale: float, turn: float) -> tuple[np.ndarray, np.ndarray]:
    """(soft opacity in [0, 1], hard footprint) of a lesion body centred at (cy, cx).

    The outline is a perturbed ellipse: r(phi) = 1 + harmonics + triangular spikes (angular
    margins); the edge softness `les.blur` is in lesion radii, so margins blur the same at any size.
    """
    r = les.radius * scale
    a, b = r / np.sqrt(les.aspect), r * np.sqrt(les.aspect)  # (width, height) semi-axes
    th = les.angle + turn
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(th) + dy * np.sin(th)
    v = -dx * np.sin(th) + dy * np.cos(th)
    phi = np.arctan2(v / b, u / a)
    outline = np.ones_like(phi)
    for k, (amp, phase) in enumerate(les.harmonics, start=2):
        outline += amp * np.cos(k * phi + phase)
    for at, height, width in les.spikes:
        gap = np.abs(np.angle(np.exp(1j * (phi - at))))
        outline += height * np.clip(1 - gap / width, 0, None)
    rho = np.hypot(u / a, v / b) / outline  # 1 on the margin
    return _sigmoid((1 - rho) / max(les.blur, 1e-3) * 4), rho <= 1


def spicule_field(yy, xx, cy, cx, les: Lesion, scale: float, turn: float) -> tuple[np.ndarray, np.ndarray]:
    """(opacity of the radial spicules, their proximal part that belongs to the lesion outline)."""
    r = les.radius * scale
    opacity = np.zeros_like(yy)
    root = np.zeros(yy.shape, bool)
    px = 1.0 / yy.shape[0]
    for at, length, width, bend in les.spicules:
        d = np.array([np.sin(at + turn), np.cos(at + turn)])  # (y, x) direction
        t = (yy - cy) * d[0] + (xx - cx) * d[1]
        q = -(yy - cy) * d[1] + (xx - cx) * d[0] - bend * r * (t / (r * (1 + length))) ** 2
        reach = r * (1 + length)
        taper = np.clip(1 - t / reach, 0, 1)  # thick at the body, a thread at the tip
        w = np.maximum(width * r * taper, 0.35 * px)  # never thinner than a third of a pixel
        line = np.exp(-0.5 * (q / w) ** 2) * (t > 0) * taper**0.5
        opacity = np.maximum(opacity, line)
        # Radiologists' outlines follow the spicule roots, not the threads: the inner half joins the mask.
        root |= (line > 0.5) & (t < r * (1 + 0.5 * length))
    return opacity, root


def _skin_distance(body: np.ndarray) -> np.ndarray:
    """Distance to the skin outline in image units; image borders continue the body (no skin there)."""
    pad = 4
    d = ndimage.distance_transform_edt(np.pad(body, pad, mode="edge"))[pad:-pad, pad:-pad]
    return d / body.shape[0]


def _calcifications(yy, xx, rng, kind: str, centre, body_box, spread: float) -> np.ndarray:
    """Tiny bright specks: pleomorphic = clustered, varied size/shape/brightness; else scattered, round."""
    field = np.zeros_like(yy)
    px = 1.0 / yy.shape[0]
    n = {"pleomorphic": rng.integers(6, 16), "coarse": rng.integers(2, 5), "punctate": rng.integers(3, 8)}[kind]
    for _ in range(int(n)):
        if kind == "pleomorphic":
            cy, cx = np.asarray(centre) + rng.normal(0, spread, 2)
            sy, sx = rng.uniform(0.0015, 0.005, 2)  # elongated, irregular
            amp = rng.uniform(0.35, 0.8)
        else:
            (y0, x0), (y1, x1) = body_box
            cy, cx = rng.uniform(y0, y1), rng.uniform(x0, x1)
            sy = sx = rng.uniform(0.005, 0.009) if kind == "coarse" else rng.uniform(0.002, 0.004)
            amp = rng.uniform(0.45, 0.7) if kind == "coarse" else rng.uniform(0.25, 0.45)
        sy, sx = max(sy, 0.45 * px), max(sx, 0.45 * px)
        field += amp * np.exp(-0.5 * (((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2))
    return field


def render_mammogram(p: Patient, k: int, rng, tex, size: int) -> tuple[np.ndarray, np.ndarray, str]:
    """One projection of the patient's breast: (image (H, W) uint8, class mask (H, W), view)."""
    view = ("CC", "MLO")[(k + p.view_offset) % 2]
    yy, xx = grid(size)
    if p.laterality == "R":
        xx = 1 - xx  # right breast: chest wall on the right, as mammograms are hung back to back
    # Compression differs per acquisition: the outline changes a little from image to image.
    depth = p.breast_depth * rng.uniform(0.94, 1.06)
    half = p.breast_half_height * rng.uniform(0.95, 1.05) * (1.15 if view == "MLO" else 1.0)
    yc = 0.5 if view == "CC" else 0.55
    u, v = xx / depth, (yy - yc) / half
    phi = np.arctan2(v, u)
    outline = 1 + sum(a * np.cos(j * phi + ph) for j, (a, ph) in enumerate(p.outline, start=2))
    body = np.hypot(u, v) <= outline
    pect = np.zeros_like(body)
    if view == "MLO":
        p0, p1 = p.pectoral[0] * rng.uniform(0.9, 1.1), p.pectoral[1] * rng.uniform(0.9, 1.1)
        edge = p0 * (1 - yy / p1) + 0.04 * np.sin(np.pi * np.clip(yy / p1, 0, 1))  # slightly convex muscle edge
        pect = xx < edge
        body |= pect
    dist = _skin_distance(body)

    # Fibroglandular tissue: a soft multi-scale cloud concentrated behind the nipple, laced with
    # trabecular strands that converge on the nipple; its threshold keeps the patient's density.
    strands = _radial_strands(tex, size, yy, xx, (yc, depth))
    cloud = sum(w * smooth_noise(tex, (size, size), s * size) for w, s in ((0.5, 0.12), (0.35, 0.05), (0.2, 0.02)))
    prior = -(((u - 0.45) / 0.45) ** 2) - (v / 0.7) ** 2
    score = cloud + 0.25 * strands + 0.5 * prior
    tissue = body & ~pect
    thr = np.quantile(score[tissue], 1 - p.density_fraction) if tissue.any() else 0.0
    gland = _sigmoid((score - thr) / 0.18)
    lobules = _sigmoid((smooth_noise(tex, (size, size), 0.02 * size) - 1.0) / 0.3)  # fat lobules within the gland
    gland = gland * (1 - 0.5 * lobules)
    img = p.fat_level + p.gland_level * gland + 0.03 * strands * (1.3 - gland)  # strands show best in fat
    img = img * (0.5 + 0.5 * np.clip(dist / 0.09, 0, 1) ** 0.6)  # thinner, darker periphery
    skin_w = max(0.005, 0.7 / size)
    img += 0.1 * np.exp(-0.5 * (dist / skin_w) ** 2)  # skin line
    if view == "MLO":
        grain = _radial_strands(tex, size, yy, xx, (1.0, -0.3))  # muscle fibres run towards the humerus
        muscle = p.pectoral_level * (1 + 0.12 * np.clip(1 - xx / max(p.pectoral[0], 1e-3), 0, 1)) + 0.025 * grain
        img = np.where(pect, muscle, img)

    mask = np.zeros((size, size), np.uint8)
    les = p.lesion
    centre = (yc, 0.4 * depth)
    if les is not None:
        centre = _mammo_centre(p, rng, view, depth, half, yc)
        scale, turn = rng.uniform(0.92, 1.08), rng.normal(0, 0.25)
        soft, hard = lesion_field(yy, xx, *centre, les, scale, turn)
        img += les.density * soft
        if les.spicules:
            spic, root = spicule_field(yy, xx, *centre, les, scale, turn)
            img += 0.8 * les.density * spic
            hard = hard | root
        if les.halo:  # the thin fat halo around some circumscribed masses
            _, wider = lesion_field(yy, xx, *centre, les, scale * 1.18, turn)
            img -= 0.07 * (wider & ~hard)
        mask[hard & body] = les.code
    if p.calcifications != "none":
        box = ((yc - 0.6 * half, 0.1 * depth), (yc + 0.6 * half, 0.7 * depth))
        spread = 0.35 * (les.radius if les is not None else 0.05)
        img += _calcifications(yy, xx, rng, p.calcifications, centre, box, spread) * (body & ~pect)

    # Detector: blur (MTF), quantum noise growing with the signal; air stays black.
    img = ndimage.gaussian_filter(img * body, p.blur * size / 64)
    img = img + tex.normal(0, 1, img.shape) * (p.noise * np.sqrt(np.clip(img, 0, None)) + 0.003)
    img = np.clip(img, 0, 1) ** p.gamma
    return np.round(255 * img).astype(np.uint8), mask, view


def _radial_strands(tex, size: int, yy, xx, focus) -> np.ndarray:
    """Zero-mean strands converging on `focus` (y, x): noise smooth along the radius, fine across it."""
    ang = np.arctan2(yy - focus[0], focus[1] - xx)  # (H, W), about 0 pointing back to the chest wall
    rad = np.hypot(yy - focus[0], xx - focus[1])
    n = 2 * size
    polar = smooth_noise(tex, (n, n), (0.6, 0.06 * n))  # (angle, radius)
    coords = np.stack([(ang + np.pi) / (2 * np.pi) * (n - 1), np.clip(rad / 1.5, 0, 1) * (n - 1)])
    return ndimage.map_coordinates(polar, coords, order=1, mode="wrap")


def _mammo_centre(p: Patient, rng, view: str, depth: float, half: float, yc: float) -> tuple[float, float]:
    """Where the mass projects in this view: the patient's spot, moved a little by positioning."""
    les = p.lesion
    fu, fv = les.place
    fv = np.clip(fv + rng.normal(0, 0.06), -0.55, 0.55)
    y = yc + fv * half * 0.85
    x = np.clip(fu + rng.normal(0, 0.04), 0.2, 0.7) * depth * np.sqrt(1 - fv**2)
    if view == "MLO":  # keep the mass out of the pectoral muscle
        x = max(x, p.pectoral[0] * 1.1 * (1 - y / (p.pectoral[1] * 1.1)) + les.radius * 1.2)
    x = min(x, depth * np.sqrt(max(1 - ((y - yc) / half) ** 2, 0.05)) - les.radius * 1.3)
    return float(y), float(max(x, les.radius))


def _wave(rng, x: np.ndarray, amp: float) -> np.ndarray:
    """A smooth undulation along the lateral axis: a few sines with random phases."""
    out = np.zeros_like(x)
    for f in (1.0, 2.0, 3.5):
        out += amp / f * np.sin(2 * np.pi * f * x + rng.uniform(0, 2 * np.pi))
    return out


def _ligaments(yy, xx, rng, top, bottom, n: int) -> np.ndarray:
    """Cooper's ligaments: thin echogenic arcs crossing the subcutaneous fat obliquely."""
    out = np.zeros_like(yy)
    px = 1.0 / yy.shape[0]
    for _ in range(n):
        x0, slope, curve = rng.uniform(0, 1), rng.uniform(-1.5, 1.5), rng.uniform(-2, 2)
        path = x0 + slope * (yy - top) + curve * (yy - top) ** 2
        band = (yy > top) & (yy < bottom)
        out = np.maximum(out, np.exp(-0.5 * ((xx - path) / max(0.004, 0.6 * px)) ** 2) * band)
    return out


def render_ultrasound(p: Patient, k: int, rng, tex, out_size: int) -> tuple[np.ndarray, np.ndarray, str]:
    """One B-mode frame from a linear probe: (image (H, W) uint8, class mask (H, W), ""); every sweep k is alike."""
    # Speckle grains are smaller than a pixel of a small image: render at >= 192 px and average
    # blocks, as resizing a real scan would (else speckle contrast is far too high at 64 px).
    f = max(1, -(-192 // out_size))
    size = out_size * f
    yy, xx = grid(size)
    x = xx[0]
    skin = p.skin_depth
    fat_b = p.fat_depth + _wave(rng, x, 0.025)  # (W,) depth of each interface per column
    gland_b = fat_b + p.gland_thickness + _wave(rng, x, 0.03)
    muscle_b = gland_b + p.retro_thickness + _wave(rng, x, 0.015)
    layer = (yy >= skin).astype(int) + (yy >= fat_b) + (yy >= gland_b) + (yy >= muscle_b)  # 0 skin .. 4 muscle
    levels = np.array([0.9, p.fat_echo, p.gland_echo, 0.8 * p.fat_echo, 0.25])
    echo = levels[layer]
    lobules = smooth_noise(tex, (size, size), 0.03 * size)
    fibres = smooth_noise(tex, (size, size), (max(0.006 * size, 0.5), 0.03 * size))
    striae = smooth_noise(tex, (size, size), (max(0.003 * size, 0.4), 0.08 * size))
    echo = echo * np.select([layer == 1, layer == 2, layer == 4], [1 + 0.3 * lobules, 1 + 0.3 * fibres, 1 + 0.4 * striae], 1.0)
    echo += 0.5 * _ligaments(yy, xx, rng, skin, fat_b.min(), int(rng.integers(2, 6)))
    fascia = max(0.006, 0.6 / size)
    for depth_of in (fat_b, muscle_b):  # specular interfaces: bright, thin, continuous
        echo += 0.4 * np.exp(-0.5 * ((yy - depth_of) / fascia) ** 2)
    atten = p.attenuation * np.where(layer == 2, 1.2, 0.9)  # glandular tissue attenuates more than fat

    mask = np.zeros((size, size), np.uint8)
    les = p.lesion
    if les is not None:
        cy = np.clip(les.place[1] + rng.normal(0, 0.03), 0.28, 0.55)
        cx = np.clip(les.place[0] + rng.normal(0, 0.08), 0.3, 0.7)
        scale, turn = rng.uniform(0.9, 1.1), rng.normal(0, 0.12)
        soft, hard = lesion_field(yy, xx, cy, cx, les, scale, turn)
        inside = les.echo_level * (1 + les.heterogeneity * smooth_noise(tex, (size, size), 0.015 * size))
        echo = echo * (1 - soft) + np.clip(inside, 0.005, None) * soft
        if les.halo:  # echogenic rim of an infiltrating margin
            _, wider = lesion_field(yy, xx, cy, cx, les, scale * 1.25, turn)
            echo = echo + 0.35 * ndimage.gaussian_filter((wider & ~hard).astype(float), 0.4)
        # Sound crossing the lesion: a cyst attenuates less than tissue (posterior enhancement),
        # an infiltrating cancer far more (posterior shadowing); both follow from the same integral.
        atten = atten * (1 - soft) + p.attenuation * les.attenuation * soft
        mask[hard] = les.code

    # Round-trip attenuation along each beam, softened laterally by the beam width; the
    # scanner's time-gain compensation undoes the average tissue loss, not the lesion's.
    transmit = np.exp(-np.cumsum(atten, axis=0) / size)
    transmit = ndimage.gaussian_filter1d(transmit, 0.012 * size, axis=1)
    gain = np.exp(p.tgc * p.attenuation * yy) * (1 + 0.08 * np.sin(2 * np.pi * (yy * 2.5 + p.tgc)))
    # Fully developed speckle: a complex Gaussian scatterer field weighted by echogenicity,
    # blurred by the point-spread function (wider laterally than axially), so each frame's
    # envelope is Rayleigh; spatial compounding averages a few independent frames.
    psf = (max(0.005 * size, 0.5), max(0.011 * size, 0.7))
    weight = np.sqrt(np.clip(echo, 0, None)) / _psf_norm(psf)
    env = np.zeros_like(echo)
    for _ in range(p.compounding):
        z = tex.normal(size=(2, size, size)) * weight
        env += np.hypot(ndimage.gaussian_filter(z[0], psf), ndimage.gaussian_filter(z[1], psf)) / p.compounding
    amp = env * np.sqrt(transmit * gain)
    db = 20 * np.log10(amp + 1e-4)
    # Log compression: an echogenicity of about 0.008 (an anechoic cyst) maps to black.
    img = np.clip((db + 22) / p.dynamic_range, 0, 1) * p.brightness
    outside = np.abs(x - 0.5) > p.fov_half_width  # beyond the transducer's footprint: no signal
    img[:, outside] = 0
    mask[:, outside] = 0
    img = img.reshape(out_size, f, out_size, f).mean((1, 3))
    mask = np.where(mask.reshape(out_size, f, out_size, f).astype(bool).mean((1, 3)) > 0.5, mask.max(), 0).astype(np.uint8)
    return np.round(255 * np.clip(img, 0, 1)).astype(np.uint8), mask, ""


def _psf_norm(sigma) -> float:
    """Std of unit white noise after the Gaussian PSF, so speckle power does not depend on size."""
    n = int(8 * max(sigma)) | 1
    delta = np.zeros((n, n))
    delta[n // 2, n // 2] = 1
    return float(np.sqrt((ndimage.gaussian_filter(delta, sigma) ** 2).sum()))

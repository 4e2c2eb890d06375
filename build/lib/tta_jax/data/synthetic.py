"""``synthetic_fundus``: a procedural, seeded multi-domain optic disc/cup benchmark.

Every image is an 'ROI crop' centred near the optic disc, like the DoFE and
GraTa/VPTTA fundus sets: a reddish retina with low-frequency illumination,
dark vessels radiating from the disc, a bright yellowish disc and a paler cup
inside it.  The mask has two overlapping channels, as in the papers:
channel 0 = disc (cup included), channel 1 = cup.

Domains A–E differ the way cameras and centres differ (colour cast,
contrast, gamma, blur/resolution, noise, vignetting) and the way populations
differ (disc size, cup/disc ratio); F is a mild shift (A's acquisition, a
wider population), where the source model's statistics still fit and
normalising with one image's own statistics can hurt (see ``DOMAIN_STYLES``).
A is the default source.  Generation is
a pure function of (domain, split, index, seed), so every stream is
reproducible and nothing is stored on disk.
"""
from __future__ import annotations

import dataclasses
import zlib

import numpy as np


@dataclasses.dataclass(frozen=True)
class DomainStyle:
    """Acquisition and population parameters of one synthetic centre."""

    retina_rgb: tuple[float, float, float]   # base retina colour
    disc_rgb: tuple[float, float, float]     # disc rim colour
    cup_rgb: tuple[float, float, float]      # cup colour
    contrast: float                          # scales deviations from the mean
    gamma: float                             # intensity ** gamma
    blur_sigma: float                        # Gaussian blur, in pixels at 64²
    downsample: int                          # acquisition resolution divisor
    noise_std: float                         # additive Gaussian noise
    vignetting: float                        # radial darkening strength
    disc_radius: tuple[float, float]         # range, fraction of the half side
    cup_ratio: tuple[float, float]           # cup/disc ratio range


DOMAIN_STYLES: dict[str, DomainStyle] = {
    # Source-like centre: clean, well exposed.
    "A": DomainStyle((0.80, 0.35, 0.15), (0.95, 0.70, 0.35), (1.00, 0.92, 0.70),
                     1.0, 1.0, 0.0, 1, 0.02, 0.10, (0.45, 0.60), (0.35, 0.60)),
    # Green-tinted, dark, noisy camera.
    "B": DomainStyle((0.45, 0.50, 0.20), (0.70, 0.85, 0.45), (0.80, 0.95, 0.75),
                     0.8, 1.8, 0.5, 1, 0.06, 0.30, (0.40, 0.55), (0.40, 0.65)),
    # Low-resolution, blurred, over-exposed, strong vignetting, larger discs.
    "C": DomainStyle((0.90, 0.55, 0.35), (1.00, 0.85, 0.60), (1.00, 0.97, 0.85),
                     0.7, 0.6, 1.2, 2, 0.02, 0.55, (0.55, 0.70), (0.30, 0.50)),
    # Washed-out, low-contrast centre with glaucomatous (large) cups.
    "D": DomainStyle((0.75, 0.45, 0.35), (0.85, 0.65, 0.50), (0.92, 0.80, 0.70),
                     0.55, 1.0, 0.3, 1, 0.08, 0.15, (0.35, 0.50), (0.55, 0.75)),
    # Magenta cast, harsh contrast, small discs.
    "E": DomainStyle((0.60, 0.20, 0.45), (0.85, 0.55, 0.80), (0.95, 0.85, 0.95),
                     1.4, 0.8, 0.0, 1, 0.04, 0.35, (0.32, 0.45), (0.35, 0.60)),
    # Mild shift: A's camera with a slightly warmer cast and a little more noise, but a wider
    # population (discs from small to very large, any cup/disc ratio). Like a neighbouring
    # hospital on the same hardware: the source statistics still fit, while one image's own
    # statistics swing with how much of it the disc fills.
    "F": DomainStyle((0.82, 0.37, 0.16), (0.95, 0.72, 0.37), (1.00, 0.92, 0.72),
                     0.95, 1.05, 0.2, 1, 0.03, 0.12, (0.25, 0.80), (0.30, 0.70)),
}

SPLIT_OFFSETS = {"train": 0, "test": 1_000_000}


def _rng(domain: str, split: str, index: int, seed: int) -> np.random.Generator:
    key = f"{domain}/{split}/{index}/{seed}".encode()
    return np.random.default_rng(zlib.crc32(key))


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return img
    radius = max(1, int(3 * sigma))
    x = np.arange(-radius, radius + 1)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    pad = np.pad(img, ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
    out = np.apply_along_axis(lambda r: np.convolve(r, k, mode="valid"), 0, pad)
    return np.apply_along_axis(lambda r: np.convolve(r, k, mode="valid"), 1, out)


def render_fundus(style: DomainStyle, size: int, rng: np.random.Generator):
    """Render one image (``[size, size, 3]`` float32 in [0, 1]) and mask (``[size, size, 2]`` uint8)."""
    yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    cy, cx = rng.uniform(-0.15, 0.15, 2)
    r_disc = rng.uniform(*style.disc_radius)
    aspect = rng.uniform(0.85, 1.15)
    angle = rng.uniform(0, np.pi)
    cos, sin = np.cos(angle), np.sin(angle)
    u = (xx - cx) * cos + (yy - cy) * sin
    v = -(xx - cx) * sin + (yy - cy) * cos
    rho_disc = np.sqrt((u / aspect) ** 2 + (v * aspect) ** 2) / r_disc
    cup_ratio = rng.uniform(*style.cup_ratio)
    ox, oy = rng.uniform(-0.25, 0.25, 2) * r_disc * (1 - cup_ratio)
    rho_cup = np.sqrt(((u - ox) / aspect) ** 2 + ((v - oy) * aspect) ** 2) / (r_disc * cup_ratio)
    disc = rho_disc <= 1.0
    cup = (rho_cup <= 1.0) & disc

    # Retina with smooth illumination and texture.
    img = np.ones((size, size, 3)) * np.asarray(style.retina_rgb)
    phase = rng.uniform(0, 2 * np.pi, 3)
    illum = 1 + 0.12 * np.sin(2.1 * xx + phase[0]) * np.cos(1.7 * yy + phase[1])
    img *= illum[..., None]
    img *= 1 + 0.05 * rng.standard_normal((size, size, 1))

    # Vessels: dark curves radiating from the disc centre.
    n_vessels = rng.integers(5, 9)
    t = np.linspace(0, 1.6, 48)
    vessel = np.zeros((size, size))
    for _ in range(n_vessels):
        theta = rng.uniform(0, 2 * np.pi)
        bend = rng.uniform(-1.0, 1.0)
        width = rng.uniform(0.015, 0.035)
        px = cx + t * np.cos(theta + bend * t)
        py = cy + t * np.sin(theta + bend * t)
        d2 = (xx[..., None] - px) ** 2 + (yy[..., None] - py) ** 2
        vessel = np.maximum(vessel, np.exp(-d2.min(-1) / width**2))
    img *= (1 - 0.55 * vessel)[..., None]

    # Disc and cup with soft edges (a few pixels of falloff).
    soft = 0.08
    disc_w = np.clip((1 + soft - rho_disc) / (2 * soft), 0, 1)
    cup_w = np.clip((1 + soft - rho_cup) / (2 * soft), 0, 1) * disc_w
    img = img * (1 - disc_w[..., None]) + np.asarray(style.disc_rgb) * disc_w[..., None]
    img = img * (1 - cup_w[..., None]) + np.asarray(style.cup_rgb) * cup_w[..., None]
    img *= (1 - 0.35 * vessel * disc_w)[..., None]  # vessels cross the rim

    # Acquisition: vignetting, resolution, blur, contrast, gamma, noise.
    img *= (1 - style.vignetting * (xx**2 + yy**2) / 2)[..., None]
    if style.downsample > 1:
        d = style.downsample
        small = img.reshape(size // d, d, size // d, d, 3).mean((1, 3))
        img = np.repeat(np.repeat(small, d, 0), d, 1)
    img = _gaussian_blur(img, style.blur_sigma * size / 64)
    mean = img.mean((0, 1), keepdims=True)
    img = np.clip(mean + style.contrast * (img - mean), 0, 1)
    img = img ** style.gamma
    img = img + style.noise_std * rng.standard_normal(img.shape)
    img = np.clip(img, 0, 1).astype(np.float32)
    mask = np.stack([disc, cup], -1).astype(np.uint8)
    return img, mask


class SyntheticFundus:
    """The embedded default dataset: 6 synthetic fundus centres A–F.

    ``split`` is ``train`` (source training), ``test`` (held-out evaluation)
    or ``all``; sizes come from ``num_train``/``num_test``.
    """

    name = "synthetic_fundus"
    channel_names = ("disc", "cup")
    domains = tuple(DOMAIN_STYLES)

    def __init__(self, num_train: int = 200, num_test: int = 40, seed: int = 0):
        self.num_train, self.num_test, self.seed = num_train, num_test, seed

    def ids(self, domain: str, split: str) -> list[str]:
        self._check_domain(domain)
        splits = ("train", "test") if split == "all" else (split,)
        out = []
        for s in splits:
            if s not in SPLIT_OFFSETS:
                raise ValueError(f"unknown split {split!r}; use train, test or all")
            n = self.num_train if s == "train" else self.num_test
            out += [f"{domain}/{s}/{i:04d}" for i in range(n)]
        return out

    def load(self, domain: str, split: str, image_size: int):
        from tta_jax.data.base import DomainData
        images, masks, ids = [], [], self.ids(domain, split)
        for sample_id in ids:
            _, s, i = sample_id.split("/")
            img, mask = render_fundus(DOMAIN_STYLES[domain], image_size, _rng(domain, s, int(i), self.seed))
            images.append(img)
            masks.append(mask)
        return DomainData(domain, np.stack(images), np.stack(masks), tuple(ids))

    def _check_domain(self, domain: str):
        if domain not in DOMAIN_STYLES:
            raise ValueError(f"unknown domain {domain!r} for synthetic_fundus; domains are {list(DOMAIN_STYLES)}")

"""Procedural breast-ultrasound phantom: images, exact lesion masks, labels.

A small, deterministic stand-in for BUSI that needs no download, used by the
demo and by most tests. Each image is simulated in four steps:

1. A scene: a map of backscatter strength (echogenicity) with the breast
   layers seen by a linear probe (skin, subcutaneous fat with Cooper's
   ligaments and fat lobules, fibroglandular tissue with ducts, pectoral
   muscle), wavy layer boundaries, and at most one lesion. The lesion mask
   is the exact indicator used to draw the lesion.
2. Speckle: a field of sub-resolution scatterers (complex Gaussian, one per
   pixel, variance = echogenicity) convolved with an anisotropic Gaussian
   point-spread function. Its magnitude (envelope detection) has Rayleigh
   statistics in homogeneous tissue, as real B-mode speckle does.
3. Attenuation along depth, integrated column by column, with a per-pixel
   attenuation coefficient, followed by a time-gain compensation that only
   partly undoes it. Lesions change the local coefficient, which is what makes
   posterior acoustic enhancement (fluid-like benign lesions) and shadowing
   (malignant lesions) appear below them.
4. Log compression to a fixed dynamic range, stored as 8-bit grey in 3
   channels.

Lesions follow the BI-RADS descriptors that separate the classes:
- benign: oval, circumscribed, parallel (wider than tall), anechoic or
  homogeneously hypoechoic, posterior enhancement;
- malignant: irregular with spicules, not parallel (taller than wide),
  heterogeneous internal echoes (sometimes an echogenic halo or bright
  micro-calcifications), posterior shadowing;
- normal: no lesion (fat lobules and ducts, which are hypoechoic too, appear
  in every class, so "a dark blob exists" is not enough to detect a lesion).

Lesion centres are drawn uniformly over the fibroglandular layer, so a
position prior alone does not localise them.

`difficulty` in [0, 1] lowers lesion contrast, shrinks lesions, blurs their
boundary (in the image only; the mask stays exact), weakens the posterior
features and adds more fat lobules.
"""

from __future__ import annotations

import numpy as np
import scipy.fft
from scipy import ndimage

CLASS_NAMES = ("normal", "benign", "malignant")

# Dynamic range of the log compression, in dB: real breast presets use 50-70;
# a narrower range gives the contrast of the exported (post-processed) PNGs.
_DYNAMIC_RANGE_DB = 45.0
_GREY_MAP_GAMMA = 1.8
# Level shown as white, in dB above the mean envelope of unit-echogenicity
# tissue (bright speckle peaks of the skin and interfaces reach it).
_TOP_DB = 9.0
# Images simulated together in one batch of FFTs.
_CHUNK = 32
# Pixels of padding around the scene, so that the circular FFT convolution
# does not wrap the bright skin line around to the bottom rows.
_PAD = 6


def generate(
    n_per_class: int = 40,
    image_size: int = 96,
    seed: int = 0,
    difficulty: float = 0.5,
) -> dict[str, np.ndarray]:
  """Generates a balanced phantom data set.

  Image k of class c depends only on (seed, c, k, image_size, difficulty), so
  asking for more images per class keeps the first ones unchanged.

  Args:
    n_per_class: images per class (normal, benign, malignant), >= 1.
    image_size: side of the square images in pixels, >= 32.
    seed: integer seed.
    difficulty: 0 (large, high-contrast, sharp lesions) to 1 (small, faint,
      blurred lesions).

  Returns:
    A dict of numpy arrays, ordered class by class (all normal images, then
    benign, then malignant):
      "images": uint8 [N, S, S, 3] (grey, the three channels are equal);
      "masks": uint8 [N, S, S] in {0, 1} (all zero for normal images);
      "labels": int32 [N] in {0: normal, 1: benign, 2: malignant};
      "image_ids": str [N], e.g. "benign_0003";
      "patient_ids": str [N], all empty (the phantom has no patients).

  Raises:
    ValueError: for an out-of-range argument, naming it.
  """
  n_per_class, image_size, seed, difficulty = check_options(
      n_per_class, image_size, seed, difficulty
  )
  size = image_size
  full = size + 2 * _PAD
  keys = [(c, k) for c in range(3) for k in range(n_per_class)]
  images = np.empty((len(keys), size, size), np.uint8)
  masks = np.zeros((len(keys), size, size), np.uint8)
  # Chunks keep the FFT working set small (cache-friendly, bounded memory).
  for start in range(0, len(keys), _CHUNK):
    chunk = keys[start : start + _CHUNK]
    echo = np.empty((len(chunk), full, full), np.float32)
    atten = np.empty((len(chunk), full, full), np.float32)
    scatter = np.empty((len(chunk), full, full), np.complex64)
    gains = np.empty((len(chunk),), np.float32)
    for j, (label, k) in enumerate(chunk):
      rng = np.random.default_rng([seed, label, k, size])
      scene = _scene(rng, label, size, difficulty)
      echo[j] = np.pad(scene["echo"], _PAD, mode="reflect")
      atten[j] = np.pad(scene["atten"], _PAD, mode="edge")
      masks[start + j] = scene["mask"]
      gains[j] = scene["tgc"]
      scatter[j].real = rng.standard_normal((full, full), dtype=np.float32)
      scatter[j].imag = rng.standard_normal((full, full), dtype=np.float32)
    envelope = _speckle(scatter * np.sqrt(echo), size)
    envelope *= _depth_gain(atten, gains, size)
    images[start : start + len(chunk)] = _log_compress(
        envelope[:, _PAD:-_PAD, _PAD:-_PAD]
    )
  return {
      "images": np.repeat(images[..., None], 3, axis=-1),
      "masks": masks,
      "labels": np.array([c for c, _ in keys], np.int32),
      "image_ids": np.array([f"{CLASS_NAMES[c]}_{k:04d}" for c, k in keys]),
      "patient_ids": np.array([""] * len(keys)),
  }


def check_options(
    n_per_class, image_size, seed, difficulty
) -> tuple[int, int, int, float]:
  """Validates `generate`'s arguments.

  Returns:
    (n_per_class, image_size, seed, difficulty) as int, int, int, float.

  Raises:
    ValueError: naming the first out-of-range argument.
  """
  n_per_class = _check_int("n_per_class", n_per_class, 1)
  image_size = _check_int("image_size", image_size, 32)
  seed = _check_int("seed", seed, 0)
  try:
    ok = 0.0 <= float(difficulty) <= 1.0
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(
        f"difficulty={difficulty!r} is out of range: expected a float in "
        "[0, 1] (0 easy, 1 hard)."
    )
  return n_per_class, image_size, seed, float(difficulty)


def _check_int(name: str, value, minimum: int) -> int:
  try:
    ok = not isinstance(value, bool) and int(value) == value >= minimum
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f"{name}={value!r}: expected an integer >= {minimum}.")
  return int(value)


# ---------------------------------------------------------------------------
# Scene: echogenicity, attenuation and mask of one image.
# ---------------------------------------------------------------------------


def _smooth_noise(rng, shape, sigma):
  """Unit-variance Gaussian random field with correlation length ~sigma px."""
  # Filtering in the Fourier domain: a wide spatial Gaussian kernel would
  # cost O(sigma) per pixel.
  fy = np.fft.fftfreq(shape[0])[:, None]
  fx = np.fft.rfftfreq(shape[1])[None, :]
  transfer = np.exp(-2 * np.pi**2 * sigma**2 * (fy**2 + fx**2))
  spectrum = scipy.fft.rfft2(rng.standard_normal(shape)) * transfer
  field = scipy.fft.irfft2(spectrum, s=shape)
  return field / (field.std() + 1e-8)


def _wavy(rng, x, base, amplitude):
  """A wavy boundary depth(x): two random sinusoids plus a slow drift."""
  out = np.full_like(x, base)
  for _ in range(2):
    freq = rng.uniform(0.5, 2.5)
    out += (
        amplitude
        * rng.uniform(0.3, 1.0)
        * np.sin(2 * np.pi * freq * x + rng.uniform(0, 2 * np.pi))
    )
  return out + rng.uniform(-amplitude, amplitude) * (x - 0.5)


def _scene(rng, label: int, size: int, difficulty: float) -> dict:
  """Draws the tissue layout and (for labels 1, 2) a lesion.

  Returns:
    Dict with "echo" (backscatter variance, float [S, S]), "atten"
    (attenuation coefficient in nepers per image height, float [S, S]), "mask"
    (bool [S, S]) and "tgc" (the gain slope that partly compensates the
    tissue attenuation).
  """
  s = size
  px = 1.0 / s
  y, x = np.meshgrid(
      (np.arange(s) + 0.5) * px, (np.arange(s) + 0.5) * px, indexing="ij"
  )
  xs = x[0]

  # Layer boundaries (depths as fractions of the image height).
  skin = _wavy(rng, xs, rng.uniform(0.03, 0.05), 0.006)
  fat = _wavy(rng, xs, rng.uniform(0.16, 0.28), 0.035)
  muscle = _wavy(rng, xs, rng.uniform(0.74, 0.88), 0.03)
  in_skin = y < skin[None]
  in_fat = (~in_skin) & (y < fat[None])
  in_muscle = y >= muscle[None]
  in_gland = ~(in_skin | in_fat | in_muscle)

  corr = max(2.0, s / 14)
  texture = _smooth_noise(rng, (s, s), corr)
  log_echo = np.zeros((s, s), np.float64)
  log_echo[in_skin] = np.log(1.2)
  log_echo[in_fat] = np.log(0.05) + 0.3 * texture[in_fat]
  log_echo[in_gland] = np.log(0.6) + 0.7 * texture[in_gland]
  # Muscle fibres: oblique, almost horizontal stripes.
  tilt = rng.uniform(-0.15, 0.15)
  stripes = np.cos(
      2 * np.pi * rng.uniform(10, 16) * (y - tilt * x)
      + 1.5 * _smooth_noise(rng, (s, s), corr)
  )
  log_echo[in_muscle] = np.log(0.12) + 0.7 * stripes[in_muscle]

  # Bright interfaces between layers (specular reflections).
  for boundary, strength in ((fat, 0.9), (muscle, 1.2)):
    dist = np.abs(y - boundary[None]) / px
    log_echo += strength * np.exp(-0.5 * (dist / 0.8) ** 2)
  # Cooper's ligaments: thin bright arcs crossing the fat obliquely.
  for _ in range(rng.integers(2, 5)):
    centre = rng.uniform(0.0, 1.0)
    slope = rng.uniform(-1.2, 1.2)
    curve = rng.uniform(-1.5, 1.5)
    depth = fat[None] - 0.5 * (fat[None] - skin[None]) * (
        1 + np.tanh(slope * 6 * (x - centre) + curve * (x - centre) ** 2)
    )
    dist = np.abs(y - depth) / px
    log_echo += np.where(in_fat, 1.0 * np.exp(-0.5 * (dist / 0.7) ** 2), 0.0)

  # Fat lobules: hypoechoic ovals in the fat layer, in every class.
  for _ in range(rng.poisson(1.0 + 2.0 * difficulty)):
    cx = rng.uniform(0.05, 0.95)
    cy = np.interp(cx, xs, 0.5 * (skin + fat))
    rx = rng.uniform(0.04, 0.09)
    ry = rx * rng.uniform(0.35, 0.6)
    inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0
    log_echo[inside & in_fat] -= rng.uniform(0.6, 1.2)

  # Ducts: thin, elongated hypoechoic structures in the gland, in every class
  # (normal anatomy that a lesion detector must not flag).
  for _ in range(rng.poisson(1.0 + 1.5 * difficulty)):
    cx = rng.uniform(0.05, 0.95)
    top = np.interp(cx, xs, fat) + 0.05
    bottom = np.interp(cx, xs, muscle) - 0.05
    cy = rng.uniform(top, max(top, bottom))
    rx = rng.uniform(0.06, 0.14)
    ry = rx / rng.uniform(4.0, 8.0)
    tilt = rng.uniform(-0.3, 0.3)
    u = (x - cx) * np.cos(tilt) + (y - cy) * np.sin(tilt)
    v = -(x - cx) * np.sin(tilt) + (y - cy) * np.cos(tilt)
    inside = (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
    log_echo[inside & in_gland] -= rng.uniform(0.8, 1.5)

  atten_tissue = rng.uniform(1.6, 2.4)
  atten = np.full((s, s), atten_tissue, np.float64)
  tgc = 0.75 * atten_tissue
  mask = np.zeros((s, s), bool)

  if label != 0:
    mask, lesion_log_echo, delta_atten = _lesion(
        rng, label, x, y, xs, fat, muscle, difficulty
    )
    # Contrast: mix the lesion's level with the surrounding tissue level.
    mix = 0.55 * difficulty
    surround = np.median(log_echo[in_gland])
    lesion_log_echo = (1 - mix) * lesion_log_echo + mix * surround
    # Boundary blur in the image only: the mask stays the exact indicator.
    blur = (0.3 + 2.2 * difficulty) * s / 96
    soft = ndimage.gaussian_filter(mask.astype(np.float64), blur)
    soft = np.clip(soft * 1.02, 0.0, 1.0)
    log_echo = (1 - soft) * log_echo + soft * lesion_log_echo
    if label == 2 and rng.uniform() < 0.5:
      # Echogenic halo: a bright rim just outside the boundary.
      ring = ndimage.binary_dilation(mask, iterations=max(1, s // 64)) & ~mask
      log_echo[ring] += 0.8 * (1 - difficulty)
    atten += delta_atten * (1.0 - 0.5 * difficulty) * soft

  return {
      "echo": np.exp(log_echo).astype(np.float32),
      "atten": atten.astype(np.float32),
      "mask": mask,
      "tgc": tgc,
  }


def _lesion(rng, label, x, y, xs, fat, muscle, difficulty):
  """Draws one lesion inside the fibroglandular layer.

  Returns:
    (mask bool [S, S], log echogenicity inside the lesion [S, S], change of the
    attenuation coefficient inside the lesion, a scalar).
  """
  s = x.shape[0]
  scale = 1.0 - 0.45 * difficulty
  if label == 1:
    half_width = rng.uniform(0.10, 0.20) * scale
    half_height = half_width / rng.uniform(1.3, 2.0)
    angle = np.deg2rad(rng.uniform(-15, 15))
  else:
    half_width = rng.uniform(0.07, 0.13) * scale
    half_height = half_width * rng.uniform(1.25, 1.8)
    angle = np.deg2rad(rng.uniform(-20, 20))

  # Centre anywhere in the gland layer where the lesion fits.
  cx = rng.uniform(0.12 + half_width, 0.88 - half_width)
  top = np.interp(cx, xs, fat) + half_height + 0.02
  bottom = np.interp(cx, xs, muscle) - half_height - 0.02
  cy = rng.uniform(top, bottom) if bottom > top else 0.5 * (top + bottom)

  # Lesion-frame coordinates: rotate, then scale to the unit circle.
  dx, dy = x - cx, y - cy
  u = (np.cos(angle) * dx + np.sin(angle) * dy) / half_width
  v = (-np.sin(angle) * dx + np.cos(angle) * dy) / half_height
  rho = np.hypot(u, v)
  phi = np.arctan2(v, u)

  # The outline is a radius per angle, tabulated once and interpolated.
  angles = np.linspace(-np.pi, np.pi, 721)
  if label == 1:
    # Circumscribed oval: at most a faint smooth undulation.
    radius = 1.0 + 0.03 * np.cos(2 * angles + rng.uniform(0, 2 * np.pi))
  else:
    # Irregular outline: several harmonics, then narrow spicules.
    radius = np.ones_like(angles)
    for order in range(2, 8):
      radius += rng.uniform(0.0, 0.22 / np.sqrt(order)) * np.cos(
          order * angles + rng.uniform(0, 2 * np.pi)
      )
    for _ in range(rng.integers(4, 10)):
      centre = rng.uniform(-np.pi, np.pi)
      width = rng.uniform(0.05, 0.12)
      gap = np.mod(angles - centre + np.pi, 2 * np.pi) - np.pi
      radius += (
          rng.uniform(0.3, 0.8) * np.clip(1 - np.abs(gap) / width, 0, 1) ** 2
      )
  radius = np.interp(phi, angles, radius, period=2 * np.pi)
  mask = rho <= radius

  grain = _smooth_noise(rng, (s, s), max(1.5, s / 40))
  if label == 1:
    if rng.uniform() < 0.4:  # anechoic, cyst-like
      level = np.log(0.002)
      delta_atten = -rng.uniform(8.0, 12.0)
    else:  # homogeneously hypoechoic, fibroadenoma-like
      level = np.log(rng.uniform(0.03, 0.06)) + 0.15 * grain
      delta_atten = -rng.uniform(5.0, 8.0)
  else:
    level = np.log(rng.uniform(0.03, 0.07)) + 0.9 * grain
    if rng.uniform() < 0.5:  # micro-calcifications: isolated bright dots
      dots = rng.uniform(size=(s, s)) < 0.02 * (1 - difficulty)
      level = np.where(dots & mask, np.log(1.5), level)
    delta_atten = rng.uniform(5.0, 9.0)
  return mask, level, delta_atten


# ---------------------------------------------------------------------------
# Imaging: speckle, depth gain, log compression (vectorised over images).
# ---------------------------------------------------------------------------


def _speckle(field: np.ndarray, size: int) -> np.ndarray:
  """Envelope of the scatterer field convolved with the PSF, [N, H, W]."""
  full = field.shape[-1]
  # Speckle grain relative to the image: about 1/100 of the width laterally
  # and half that axially, as for a ~4 cm field of view at 7-12 MHz.
  sigma_lateral = max(0.7, 0.011 * size)
  sigma_axial = max(0.45, 0.0055 * size)
  freq = np.fft.fftfreq(full)
  transfer = np.exp(
      -2
      * np.pi**2
      * (
          (sigma_axial * freq[:, None]) ** 2
          + (sigma_lateral * freq[None, :]) ** 2
      )
  ).astype(np.float32)
  # Unit-echogenicity tissue gets unit RMS envelope: the complex scatterers
  # have variance 2 and the PSF passes sum(|h|^2) of it.
  transfer /= np.sqrt(2.0 * np.mean(transfer**2))
  out = scipy.fft.ifft2(
      scipy.fft.fft2(field, workers=-1) * transfer, workers=-1
  )
  # A little incoherent smoothing of the intensity, as display interpolation
  # and spatial compounding do, removes isolated black pixels.
  intensity = ndimage.gaussian_filter(
      np.abs(out) ** 2, (0, 0.5 * sigma_axial, 0.5 * sigma_lateral)
  )
  return np.sqrt(intensity).astype(np.float32)


def _depth_gain(atten, gains, size):
  """exp(-integral of attenuation) times the partial TGC, [N, H, W]."""
  path = np.cumsum(atten, axis=1) / size
  depth = (np.arange(atten.shape[1], dtype=np.float32) - _PAD + 0.5) / size
  gain = np.exp(-path + gains[:, None, None] * depth[None, :, None])
  # Shadows and enhancement have soft lateral edges (finite beam width).
  return ndimage.gaussian_filter1d(gain, max(0.7, size / 96), axis=2)


def _log_compress(envelope: np.ndarray) -> np.ndarray:
  """Envelope -> uint8 grey with a fixed map (no per-image auto gain).

  A fixed map matters: a per-image gain would make the whole image darker
  when a lesion adds bright posterior enhancement, a global brightness cue
  that real scanners do not give.
  """
  decibels = 20.0 * np.log10(envelope + 1e-6)
  grey = (decibels - (_TOP_DB - _DYNAMIC_RANGE_DB)) / _DYNAMIC_RANGE_DB
  # A gamma-like grey map, as scanners apply, keeps soft tissue mid-grey.
  grey = np.clip(grey, 0.0, 1.0) ** _GREY_MAP_GAMMA
  return np.round(grey * 255.0).astype(np.uint8)

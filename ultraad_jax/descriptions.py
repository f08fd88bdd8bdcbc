"""Per-sample text descriptions for the memory bank (the Pt keys).

UltraAD's classification memory bank holds, next to each few-shot image
embedding, the frozen text embedding of a per-sample description of
"anatomical and abnormality-specific features". The paper does not publish
its descriptions, so this module holds our own library, written in the BI-RADS
ultrasound lexicon (5th edition descriptors: shape, orientation, margin, echo
pattern, posterior features) for lesions, and in plain anatomical terms (skin,
subcutaneous fat, fibroglandular tissue, Cooper's ligaments, pectoralis
muscle) for normal breasts.

Lesion descriptions are composed from descriptor combinations that are typical
of each class:

* benign-typical: oval or round shape, parallel orientation, circumscribed
  margin, anechoic / hypoechoic / isoechoic echo pattern, posterior
  enhancement or no posterior features;
* malignant-typical: irregular shape, not-parallel orientation, a
  non-circumscribed margin (indistinct, angular, microlobulated, spiculated),
  hypoechoic / heterogeneous / complex cystic and solid echo pattern,
  posterior shadowing, combined pattern or no posterior features.

Assignment rule (`assign_descriptions`): for each class, the class library is
permuted by a generator seeded with (seed, class); the k-th support image of
that class (in support order, counting images, not views) gets entry
k mod len(library). So descriptions are distinct within a class while the
library lasts, identical for every view of one image when `group` is given,
deterministic for a seed, and differ between seeds.

Every description fits the 77-token CLIP context (checked by the tests).
"""

import itertools
from typing import Sequence

import numpy as np

CLASS_NAMES = ("normal", "benign", "malignant")
NUM_CLASSES = len(CLASS_NAMES)

_NORMAL = (
    "Normal breast ultrasound: a thin bright skin line over subcutaneous fat, "
    "echogenic fibroglandular tissue, and no focal mass.",
    "Breast ultrasound of normal anatomy with hypoechoic subcutaneous fat "
    "lobules crossed by thin echogenic Cooper's ligaments; no mass is seen.",
    "Homogeneous echogenic fibroglandular tissue between the subcutaneous fat "
    "and the retromammary fat, without any lesion.",
    "Normal layered breast: skin, subcutaneous fat, fibroglandular parenchyma "
    "and the pectoralis major muscle in the deep field.",
    "Normal breast tissue with a smooth skin line, fat of low echogenicity and "
    "bright glandular tissue; no shadowing and no mass.",
    "Ultrasound of a normal breast showing curved Cooper's ligaments and "
    "regular fibroglandular tissue with no architectural distortion.",
    "The pectoralis muscle appears as a striated hypoechoic band deep to the "
    "fibroglandular tissue; the breast contains no focal lesion.",
    "Fatty breast of normal appearance: predominantly hypoechoic fat with thin "
    "fibrous septa and no solid or cystic mass.",
    "Dense but normal fibroglandular tissue, uniformly echogenic, with intact "
    "Cooper's ligaments and no suspicious area.",
    "Normal breast parenchyma with a ductal pattern and fat lobules of "
    "uniform echogenicity; skin and chest wall are unremarkable.",
    "Heterogeneous background echotexture of a normal breast, alternating fat "
    "and glandular tissue, without a discrete mass.",
    "Normal breast ultrasound: subcutaneous fat, glandular layer, retromammary "
    "fat and pectoralis muscle, all of normal appearance.",
)

_BENIGN_SHAPES = ("oval", "round")
_BENIGN_ECHO = ("anechoic", "hypoechoic", "isoechoic")
_BENIGN_POSTERIOR = (
    "posterior acoustic enhancement",
    "no posterior acoustic features",
)
_BENIGN_EXTRA = (
    "A simple cyst: round, anechoic, circumscribed, with a thin wall and "
    "posterior acoustic enhancement.",
    "A fibroadenoma-like oval mass, parallel to the skin, circumscribed, "
    "homogeneously hypoechoic, with a thin echogenic capsule.",
    "A gently lobulated oval mass with two or three smooth undulations, "
    "parallel orientation and circumscribed margins.",
)

_MALIGNANT_MARGINS = ("indistinct", "angular", "microlobulated", "spiculated")
_MALIGNANT_ECHO = ("hypoechoic", "heterogeneous", "complex cystic and solid")
_MALIGNANT_POSTERIOR = (
    "posterior acoustic shadowing",
    "a combined posterior pattern",
    "no posterior acoustic features",
)
_MALIGNANT_EXTRA = (
    "A taller-than-wide irregular hypoechoic mass with spiculated margins, an "
    "echogenic halo and posterior acoustic shadowing.",
    "An irregular mass with angular margins that disrupts the surrounding "
    "tissue planes, not parallel to the skin, with posterior shadowing.",
    "An irregular heterogeneous mass with indistinct margins and architectural "
    "distortion of the adjacent Cooper's ligaments.",
)


def _benign() -> tuple[str, ...]:
  made = tuple(
      f"A breast lesion: {shape}, parallel to the skin, circumscribed margin, "
      f"{echo} echo pattern, {posterior}."
      for shape, echo, posterior in itertools.product(
          _BENIGN_SHAPES, _BENIGN_ECHO, _BENIGN_POSTERIOR
      )
  )
  return made + _BENIGN_EXTRA


def _malignant() -> tuple[str, ...]:
  made = tuple(
      f"A breast lesion: irregular, not parallel to the skin, {margin} margin, "
      f"{echo} echo pattern, {posterior}."
      for margin, echo, posterior in itertools.product(
          _MALIGNANT_MARGINS, _MALIGNANT_ECHO, _MALIGNANT_POSTERIOR
      )
  )
  return made + _MALIGNANT_EXTRA


def library() -> dict[int, tuple[str, ...]]:
  """The description library, by class.

  Returns:
    {0: normal descriptions, 1: benign-typical, 2: malignant-typical}; every
    class has at least 12 distinct entries.
  """
  return {0: _NORMAL, 1: _benign(), 2: _malignant()}


def assign_descriptions(
    labels: Sequence[int],
    seed: int,
    group: Sequence[int] | None = None,
) -> list[str]:
  """Assigns one description to each support sample (see the module rule).

  Args:
    labels: [S] class of each sample (0 normal, 1 benign, 2 malignant).
    seed: the draw's seed; the same seed always gives the same assignment.
    group: optional [S] image id of each sample. Samples with the same group
      (augmented views of one image) get the same description and count as
      one image in the rule. A group must not mix classes.

  Returns:
    A list of S strings.

  Raises:
    ValueError: a label outside {0, 1, 2}, a group of another length, or a
      group holding more than one class.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or (
      labels.size and not np.issubdtype(labels.dtype, np.integer)
  ):
    raise ValueError(
        f"labels must be a 1-D integer sequence, got {labels!r:.200}."
    )
  bad = sorted(set(labels.tolist()) - set(range(NUM_CLASSES)))
  if bad:
    raise ValueError(
        f"labels hold {bad}; expected class ids 0 (normal), 1 (benign), "
        "2 (malignant)."
    )
  if group is None:
    group = np.arange(len(labels))
  group = np.asarray(group)
  if group.shape != labels.shape:
    raise ValueError(
        f"group has shape {group.shape}, expected {labels.shape} (one image "
        "id per sample)."
    )
  lib = library()
  perms = {
      c: np.random.default_rng([int(seed) & 0xFFFFFFFF, c]).permutation(
          len(lib[c])
      )
      for c in range(NUM_CLASSES)
  }
  chosen = {}  # group id -> (class, description)
  count = [0] * NUM_CLASSES
  out = []
  for label, g in zip(labels.tolist(), group.tolist()):
    if g not in chosen:
      k = count[label]
      count[label] += 1
      chosen[g] = (label, lib[label][perms[label][k % len(lib[label])]])
    elif chosen[g][0] != label:
      raise ValueError(
          f"group {g} holds samples of classes {chosen[g][0]} and {label}; "
          "views of one image must share its label."
      )
    out.append(chosen[g][1])
  return out

"""A real photograph for tests: scikit-image's bundled astronaut (Eileen Collins, NASA, public
domain), so parity is checked on natural-image statistics, not only on noise."""
import numpy as np
from PIL import Image
import pytest


def astronaut(image_size):
  """uint8 (H, W, 3) RGB, the 512x512 photo stretched to `image_size` (H, W) (bilinear)."""
  data = pytest.importorskip("skimage.data")
  h, w = image_size
  return np.asarray(Image.fromarray(data.astronaut()).resize((w, h), Image.Resampling.BILINEAR))

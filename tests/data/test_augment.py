"""Augmentation numbers: each op against PIL / numpy references, seeds, wiring.

References round to uint8 (PIL truncates), so comparisons allow 1-1.5
levels; geometric ops are compared where neither side touches the fill
(PIL clamps at the border where TF blends with the fill colour).
"""
import colorsys
import itertools

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
import pytest
from scipy import ndimage
import tensorflow as tf

from tests.conftest import shared_data
from tlflax import data
from tlflax.data import augment, preprocess

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _image(height=24, width=32, seed=0):
  """A smooth, asymmetric uint8 image (blurred noise stretched to 0-255)."""
  noise = np.random.default_rng(seed).uniform(0, 255, (height, width, 3))
  image = ndimage.gaussian_filter(noise, (2, 2, 0))
  image = (image - image.min()) / (image.max() - image.min()) * 255
  return image.round().astype(np.uint8)


def _config(**overrides):
  config = data.default_config()
  config.update(overrides)
  return config


def _compare_geometry(ours, pil_op, atol=1.01):
  """ours(fill) vs pil_op(fill) on pixels independent of the fill colour."""
  refs = [np.asarray(pil_op((v,) * 3), np.float64) for v in (0, 255)]
  outs = [ours((float(v),) * 3).numpy() for v in (0, 255)]
  inside = (refs[0] == refs[1]) & (np.abs(outs[0] - outs[1]) < 1e-3)
  assert inside.mean() > 0.6  # Most of the image is compared.
  np.testing.assert_allclose(outs[0][inside], refs[0][inside], atol=atol)


@pytest.mark.parametrize("degrees", [20.0, -35.0])
def test_rotate_matches_pil_bilinear_in_the_interior(degrees):
  image = _image()
  pil = Image.fromarray(image)
  _compare_geometry(
      lambda fill: augment.rotate(image, degrees, fill),
      lambda fill: pil.rotate(degrees, resample=Image.BILINEAR,
                              fillcolor=fill))


def test_rotate_90_is_counter_clockwise_and_exact():
  image = _image(16, 16)
  out = augment.rotate(image, 90.0).numpy()
  np.testing.assert_allclose(out, np.rot90(image, 1), atol=1e-3)


@pytest.mark.parametrize("name,matrix,value", [
    ("shear_x", (1, 0.27, 0, 0, 1, 0), 0.27),
    ("shear_y", (1, 0, 0, -0.27, 1, 0), -0.27),
    ("translate_x", (1, 0, 5.4, 0, 1, 0), 5.4),
    ("translate_y", (1, 0, 0, 0, 1, -3.3), -3.3),
])
def test_shear_and_translate_match_pil_affine(name, matrix, value):
  image = _image()
  pil = Image.fromarray(image)
  op = getattr(augment, name)
  _compare_geometry(
      lambda fill: op(image, value, fill),
      lambda fill: pil.transform(pil.size, Image.AFFINE, matrix,
                                 resample=Image.BILINEAR, fillcolor=fill))


def test_fill_is_per_channel_outside_the_image():
  image = np.full((8, 8, 3), 200, np.uint8)
  out = augment.translate_x(image, 8.0, (1.0, 2.0, 3.0)).numpy()
  np.testing.assert_allclose(out, np.broadcast_to([1.0, 2.0, 3.0], out.shape),
                             atol=1e-4)


def _pil_reference(name, pil, m, sign):
  """timm-style PIL version of each pixel op at m = magnitude / 10."""
  factor = 1.0 + sign * 0.9 * m
  return {
      "identity": lambda: pil,
      "autocontrast": lambda: ImageOps.autocontrast(pil),
      "equalize": lambda: ImageOps.equalize(pil),
      "solarize": lambda: ImageOps.solarize(pil, 256 * (1 - m)),
      "posterize": lambda: ImageOps.posterize(pil, 8 - int(4 * m)),
      "color": lambda: ImageEnhance.Color(pil).enhance(factor),
      "contrast": lambda: ImageEnhance.Contrast(pil).enhance(factor),
      "brightness": lambda: ImageEnhance.Brightness(pil).enhance(factor),
      "sharpness": lambda: ImageEnhance.Sharpness(pil).enhance(factor),
  }[name]()


# Exact where PIL's LUT is exact; 1-1.5 levels where PIL truncates a blend
# (contrast: PIL also rounds the mean grey level, we keep it float).
PIXEL_OPS = {"identity": 0, "autocontrast": 1.0, "equalize": 0, "solarize": 0,
             "posterize": 0, "color": 1.5, "contrast": 1.5, "brightness": 1.0,
             "sharpness": 1.5}


@pytest.mark.parametrize("name,magnitude,sign", [
    (n, m, s) for n in PIXEL_OPS for m, s in ((9, 1), (9, -1), (4, 1))])
def test_randaugment_pixel_ops_match_pil(name, magnitude, sign):
  image = _image()
  ours = augment.randaugment_op(name, image, magnitude, sign).numpy()
  ref = _pil_reference(name, Image.fromarray(image), magnitude / 10, sign)
  np.testing.assert_allclose(ours, np.asarray(ref, np.float64),
                             atol=PIXEL_OPS[name])


def test_autocontrast_of_low_contrast_image_and_flat_channel():
  image = (_image() // 3 + 60).astype(np.uint8)
  image[..., 2] = 77  # Flat channel: PIL leaves it unchanged.
  ours = augment.autocontrast(image).numpy()
  ref = np.asarray(ImageOps.autocontrast(Image.fromarray(image)), np.float64)
  np.testing.assert_allclose(ours, ref, atol=1.0)
  np.testing.assert_array_equal(ours[..., 2], 77)


@pytest.mark.parametrize("name,magnitude,pil_op", [
    ("rotate", 9, lambda pil, s, fill: pil.rotate(
        s * 27.0, resample=Image.BILINEAR, fillcolor=fill)),
    ("shear_x", 10, lambda pil, s, fill: pil.transform(
        pil.size, Image.AFFINE, (1, s * 0.3, 0, 0, 1, 0),
        resample=Image.BILINEAR, fillcolor=fill)),
    ("translate_y", 5, lambda pil, s, fill: pil.transform(
        pil.size, Image.AFFINE, (1, 0, 0, 0, 1, s * 0.225 * 24),
        resample=Image.BILINEAR, fillcolor=fill)),
])
@pytest.mark.parametrize("sign", [1, -1])
def test_randaugment_geometry_magnitudes(name, magnitude, pil_op, sign):
  """30 degrees, 0.3 shear, 0.45 of the side at magnitude 10 (linear in m)."""
  image = _image()
  pil = Image.fromarray(image)
  _compare_geometry(
      lambda fill: augment.randaugment_op(name, image, magnitude, sign, fill),
      lambda fill: pil_op(pil, sign, fill))


def test_magnitude_zero_is_identity_for_every_op():
  image = _image(12, 12)
  for name in augment.RANDAUGMENT_OPS:
    if name in ("autocontrast", "equalize"):
      continue  # No magnitude.
    out = augment.randaugment_op(name, image, 0, -1).numpy()
    np.testing.assert_allclose(out, image, atol=1e-3, err_msg=name)


def test_unknown_randaugment_op_names_the_choices():
  with pytest.raises(ValueError, match="invert.*identity"):
    augment.randaugment_op("invert", _image(), 5, 1)


def test_randaugment_applies_one_of_the_ops_drawn_uniformly():
  image = _image(12, 16)
  candidates = {(n, s): augment.randaugment_op(n, image, 7, s).numpy()
                for n in augment.RANDAUGMENT_OPS for s in (1, -1)}
  chosen = []
  for i in range(42):
    out = augment.randaugment(image, tf.constant([i, 5]), 1, 7).numpy()
    matches = {n for (n, _), ref in candidates.items()
               if np.array_equal(out, ref)}
    assert matches, f"seed {i}: the output is none of the 14 ops"
    chosen.append(sorted(matches)[0])
  assert len(set(chosen)) >= 10  # 42 draws of 14 ops: all but a few appear.


def test_jitter_ops_follow_torchvision_formulas():
  image = _image(6, 7).astype(np.float32)
  luma = image @ np.array(augment.GREY_WEIGHTS, np.float32)
  clip = lambda x: np.clip(x, 0, 255)
  np.testing.assert_allclose(augment.brightness(image, 1.3),
                             clip(1.3 * image), atol=1e-3)
  np.testing.assert_allclose(augment.contrast(image, 0.6),
                             clip(luma.mean() + 0.6 * (image - luma.mean())),
                             atol=1e-3)
  np.testing.assert_allclose(augment.saturation(image, 1.7),
                             clip(luma[..., None]
                                  + 1.7 * (image - luma[..., None])),
                             atol=1e-3)
  hsv = [[colorsys.rgb_to_hsv(*p) for p in row / 255] for row in image]
  ref = np.array([[colorsys.hsv_to_rgb((h - 0.2) % 1, s, v)
                   for h, s, v in row] for row in hsv]) * 255
  np.testing.assert_allclose(augment.hue(image, -0.2), ref, atol=1e-2)


def _factor_of(op_index, seed, amount):
  """The brightness or contrast factor color_jitter draws alone."""
  image = np.full((4, 4, 3), 100.0, np.float32)
  image[0, 0] = 50.0  # Mean grey 99.6875; contrast scales the deviations.
  args = [0.0] * 4
  args[op_index] = amount
  out = augment.color_jitter(image, seed, args).numpy()
  if op_index == 0:
    return out[1, 1, 0] / 100.0
  mean = image.mean()
  return (out[0, 0, 0] - mean) / (50.0 - mean)


def test_color_jitter_factors_ranges_and_order():
  orders = set()
  for i in range(12):
    seed = tf.constant([i, 1])
    fb, fc = _factor_of(0, seed, 0.4), _factor_of(1, seed, 0.8)
    assert 0.6 <= fb <= 1.4 and 0.2 <= fc <= 1.8
    image = _image(6, 6)
    b_then_c = augment.contrast(augment.brightness(image, fb), fc).numpy()
    c_then_b = augment.brightness(augment.contrast(image, fc), fb).numpy()
    fixed = augment.color_jitter(image, seed, (0.4, 0.8, 0, 0),
                                 random_order=False).numpy()
    np.testing.assert_allclose(fixed, b_then_c, atol=1e-3)
    out = augment.color_jitter(image, seed, (0.4, 0.8, 0, 0)).numpy()
    which = [np.allclose(out, r, atol=1e-3) for r in (b_then_c, c_then_b)]
    assert any(which)
    orders.add(which.index(True))
  assert orders == {0, 1}  # Both orders happen over 12 seeds.


def test_jitter_range_of_large_amounts_starts_at_zero():
  ranges = augment.jitter_ranges((1.5, 0.0, 0.3, 0.1))
  assert [(s, lo, hi) for s, _, lo, hi in ranges] == [
      (0, 0.0, 2.5), (2, pytest.approx(0.7), 1.3), (3, -0.1, 0.1)]


AUGMENTED = dict(image_size=16, rotation=20.0, randaugment_layers=2,
                 randaugment_magnitude=9.0, color_jitter=(0.4, 0.4, 0.4, 0.1))


def test_train_transform_same_seed_same_image_other_index_differs():
  transform = preprocess.train_transform(_config(**AUGMENTED), MEAN, STD)
  example = {"image": tf.constant(_image(30, 40)), "label": 1}
  key = tf.constant([7, 1], tf.int64)
  seeds = [tf.random.experimental.stateless_fold_in(key, i) for i in range(6)]
  a = transform(example, seeds[0])["image"].numpy()
  b = transform(example, seeds[0])["image"].numpy()
  np.testing.assert_array_equal(a, b)
  others = {transform(example, s)["image"].numpy().tobytes()
            for s in seeds[1:]}
  assert a.tobytes() not in others and len(others) == 5


def _graph_ops(config):
  transform = preprocess.train_transform(config, MEAN, STD)
  fn = tf.function(transform).get_concrete_function(
      {"image": tf.TensorSpec([None, None, 3], tf.uint8),
       "label": tf.TensorSpec([], tf.int64)},
      tf.TensorSpec([2], tf.int64))
  return {op.type for op in fn.graph.get_operations()}


def test_augmentations_off_by_default_add_no_ops():
  default = _graph_ops(_config(image_size=16))
  for field, value in [("rotation", 10.0), ("randaugment_layers", 1),
                       ("color_jitter", (0.0, 0.2, 0.0, 0.0))]:
    on = _graph_ops(_config(image_size=16, **{field: value}))
    assert on - default, field  # Turning one on adds ops ...
  assert not default & {"ImageProjectiveTransformV3", "StatelessCase",
                        "Case", "AdjustHue", "DepthwiseConv2dNative"}


def test_default_train_transform_is_crop_and_flip_only():
  config = _config(image_size=16)
  image = tf.constant(_image(30, 40))
  seed = tf.constant([3, 4], tf.int64)
  out = preprocess.train_transform(config, MEAN, STD)(
      {"image": image, "label": 0}, seed)["image"].numpy()
  crop_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 2))
  ref = preprocess.random_resized_crop(image, crop_seed, 16)
  ref = tf.image.stateless_random_flip_left_right(ref, flip_seed)
  np.testing.assert_array_equal(out, preprocess.normalize(ref, MEAN, STD))


@pytest.mark.parametrize("field,value,match", [
    ("rotation", -5.0, r"config.rotation=-5.0 must be in \[0, 180\]"),
    ("randaugment_magnitude", 11.0, r"randaugment_magnitude=11.0 .*\[0, 10\]"),
    ("randaugment_layers", -1, r"randaugment_layers=-1 must be >= 0"),
    ("color_jitter", (0.1, 0.1, 0.1), r"color_jitter=\(0.1, 0.1, 0.1\) "
                                      "must be 4 numbers"),
    ("color_jitter", (0.1, -0.1, 0.0, 0.0), r"must be 4 numbers >= 0"),
    ("color_jitter", (0.0, 0.0, 0.0, 0.6), r"hue=0.6 must be <= 0.5"),
])
def test_invalid_augmentation_values_name_the_field(field, value, match):
  config = _config(image_size=16)
  with config.ignore_type():
    setattr(config, field, value)
  with pytest.raises(ValueError, match=match):
    preprocess.train_transform(config, MEAN, STD)


def test_hymenoptera_pipeline_with_augmentation_is_finite_and_rebuilds():
  config = _config(name="folder", root=str(shared_data("hymenoptera")),
                   verify_images=False, image_size=32, eval_crop="resize",
                   **{k: v for k, v in AUGMENTED.items() if k != "image_size"})
  take = lambda it: list(itertools.islice(it, 2))
  first = take(data.build(config, batch_size=4, seed=5).train_batches())
  again = data.build(config, batch_size=4, seed=5)
  rebuilt = take(again.train_batches())
  resumed = next(again.train_batches(start_step=1))
  for batch in first:
    assert batch["image"].shape == (4, 32, 32, 3)
    assert np.isfinite(batch["image"]).all()
  for a, b in zip(first, rebuilt):
    np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(resumed["image"], first[1]["image"])
  plain = _config(name="folder", root=config.root, verify_images=False,
                  image_size=32, eval_crop="resize")
  unaugmented = next(data.build(plain, batch_size=4, seed=5).train_batches())
  np.testing.assert_array_equal(unaugmented["label"], first[0]["label"])
  assert not np.array_equal(unaugmented["image"], first[0]["image"])

"""`python -m tlflax.predict --workdir DIR --images FOLDER --out OUTDIR`: run a trained model.

Rebuilds the model of a finished (or interrupted) run from `DIR/config.json`
and `DIR/run_info.json`, restores its latest checkpoint, and runs it on every
image under FOLDER, in fixed-size batches (one compilation), with a progress
bar. What it writes depends on the run's task:

  classification  OUTDIR/predictions.csv: file, top-k labels and probabilities
  segmentation    OUTDIR/masks/<name>.png (class index per pixel, at the
                  image's own size), OUTDIR/overlays/<name>.png (colours over
                  the photo), OUTDIR/predictions.csv (pixel share per class)
  detection       OUTDIR/detections.json (per file: boxes [x1, y1, x2, y2] in
                  the image's own pixels, label, score) and, with --draw,
                  OUTDIR/drawn/<name>.png

Unreadable files get a row with the reason in the `error` column; the rest
still run. No pretrained weight file is needed: everything comes from the
checkpoint.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import numpy as np  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class TrainedModel:
  """The module, variables and preprocessing of a run's latest checkpoint."""

  def __init__(self, workdir: str):
    import jax  # pylint: disable=g-import-not-at-top
    import ml_collections  # pylint: disable=g-import-not-at-top
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    from tlflax import checkpoint, train  # pylint: disable=g-import-not-at-top
    from tlflax.pretrained import load  # pylint: disable=g-import-not-at-top
    workdir = Path(workdir)
    for name in ("config.json", "run_info.json"):
      if not (workdir / name).is_file():
        raise FileNotFoundError(f"{workdir / name} is missing: is {workdir} the --workdir of a "
                                "tlflax.main run?")
    self.config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    self.info = json.loads((workdir / "run_info.json").read_text())
    self.task = self.info.get("task", "classification")
    self.class_names: List[str] = self.info["class_names"]
    self.config.model.pretrained = False  # Every weight comes from the checkpoint.
    module, variables = train.create_module(self.config, len(self.class_names))
    ckpt = checkpoint.Checkpointer(workdir)
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"No checkpoint under {ckpt.directory}: the run saved none yet.")
    # As saved, without an optimizer template: the optimizer state's structure depends on
    # the run's length (gradual unfreezing) and is not needed to predict.
    saved = ckpt.manager.restore(ckpt.latest_step(), args=ocp.args.StandardRestore())
    ckpt.close()
    self.step = int(saved["step"])
    # Strict: every variable of the model from the checkpoint, same shapes, nothing extra.
    self.variables, _ = load.merge(variables, load.flatten(
        {"params": saved["params"], **saved["model_state"]}), reinit=r"(?!)")
    self.module = module
    self.apply = jax.jit(lambda v, x: module.apply(v, x, train=False))
    pp = self.info["preprocessing"]
    self.mean, self.std = np.asarray(pp["mean"], np.float32), np.asarray(pp["std"], np.float32)
    self.image_size = int(pp["image_size"])

  def __call__(self, images: np.ndarray):
    return self.apply(self.variables, images)


def list_images(folder: str) -> List[Path]:
  """Image files under `folder` (recursive), sorted; other files are ignored."""
  root = Path(folder)
  if not root.is_dir():
    raise FileNotFoundError(f"--images {folder} is not a folder.")
  return sorted(p for p in root.rglob("*") if p.is_file()
                and p.suffix.lower() in IMAGE_EXTENSIONS)


def read_rgb(path: Path) -> np.ndarray:
  """uint8 [H, W, 3]; grey, palette, RGBA and CMYK files are converted."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as image:
    image.load()
    return np.asarray(image.convert("RGB"))


def classification_input(image: np.ndarray, model: TrainedModel) -> np.ndarray:
  """The run's eval preprocessing: resize shorter side, center crop, normalise."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tlflax.data import preprocess  # pylint: disable=g-import-not-at-top
  pp = model.info["preprocessing"]
  size = model.image_size
  x = tf.constant(image)
  if (pp.get("eval_crop") or "center_crop") == "center_crop":
    x = preprocess.center_crop(preprocess.resize_shorter_side(
        x, preprocess.eval_resize_size(size, pp.get("resize_size"))), size)
  else:
    x = preprocess.resize(x, size, size)
  return ((x.numpy() / 255.0 - model.mean) / model.std).astype(np.float32)


def segmentation_input(image: np.ndarray, model: TrainedModel) -> np.ndarray:
  """The segmentation eval's own transform: whole image resized to image_size x image_size."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tlflax.data import preprocess_masks  # pylint: disable=g-import-not-at-top
  return preprocess_masks.eval_image(tf.constant(image), model.image_size, model.mean,
                                     model.std).numpy()


def detection_input(image: np.ndarray, model: TrainedModel):
  """The detection eval's own transform (longer side to image_size, padded) and its scale."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tlflax.data import preprocess_boxes  # pylint: disable=g-import-not-at-top
  x, scale = preprocess_boxes.fit_image(tf.constant(image), model.image_size, model.mean,
                                        model.std)
  return x.numpy(), float(scale)


def batches(paths: Sequence[Path], prepare, batch_size: int
            ) -> Iterator[Tuple[List[Tuple[Path, Optional[np.ndarray], str]], np.ndarray]]:
  """Fixed-size batches (padded with zeros) of readable images, plus per-file status."""
  items, arrays = [], []
  for path in paths:
    try:
      image = read_rgb(path)
      arrays.append(prepare(image))
      items.append((path, image, ""))
    except Exception as e:  # pylint: disable=broad-except  Any unreadable file is reported.
      items.append((path, None, f"{type(e).__name__}: {e}"))
    if len(arrays) == batch_size:
      yield items, np.stack(arrays)
      items, arrays = [], []
  if items:
    pad = [np.zeros_like(arrays[0])] * (batch_size - len(arrays)) if arrays else []
    yield items, np.stack(arrays + pad) if arrays else np.zeros((0,))


def palette(num_classes: int) -> np.ndarray:
  """Distinct colours, class 0 (background) black: bits of the index spread over RGB."""
  colours = np.zeros((num_classes, 3), np.uint8)
  for c in range(num_classes):
    r = g = b = 0
    for bit in range(8):
      r |= ((c >> (3 * bit)) & 1) << (7 - bit)
      g |= ((c >> (3 * bit + 1)) & 1) << (7 - bit)
      b |= ((c >> (3 * bit + 2)) & 1) << (7 - bit)
    colours[c] = (r, g, b)
  return colours


def overlay(image: np.ndarray, mask: np.ndarray, colours: np.ndarray,
            alpha: float = 0.5) -> np.ndarray:
  """The photo with each non-background pixel blended towards its class colour."""
  blended = image.astype(np.float32)
  tint = colours[mask].astype(np.float32)
  foreground = (mask > 0)[..., None]
  blended = np.where(foreground, (1 - alpha) * blended + alpha * tint, blended)
  return blended.round().astype(np.uint8)


def upsampled_mask(logits: np.ndarray, height: int, width: int) -> np.ndarray:
  """Class index per pixel at the image's own size (bilinear logits, then argmax)."""
  import jax  # pylint: disable=g-import-not-at-top
  resized = jax.image.resize(logits, (height, width, logits.shape[-1]), "bilinear")
  return np.asarray(resized.argmax(-1), np.uint8)


def _softmax(logits):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.nn.softmax(logits, axis=-1)


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def predict_classification(model: TrainedModel, paths, out: Path, batch_size: int, top_k: int,
                           progress) -> List[List[Any]]:
  k = min(top_k, len(model.class_names))
  rows = []
  for items, x in batches(paths, lambda im: classification_input(im, model), batch_size):
    probs = np.asarray(_softmax(model(x))) if len(x) else np.zeros((0,))
    row_index = 0
    for path, image, error in items:
      if image is None:
        rows.append([str(path), error] + [""] * (2 * k))
      else:
        p = probs[row_index]
        row_index += 1
        best = np.argsort(-p)[:k]
        rows.append([str(path), ""] + [v for c in best for v in (model.class_names[c],
                                                                    f"{p[c]:.6f}")])
      progress.update(1)
  header = ["file", "error"] + [f"{what}_{i + 1}" for i in range(k) for what in ("label", "prob")]
  write_csv(out / "predictions.csv", header, rows)
  return rows


def predict_segmentation(model: TrainedModel, paths, out: Path, batch_size: int, alpha: float,
                         progress) -> List[List[Any]]:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  colours = palette(len(model.class_names))
  stems = output_stems(paths)
  rows = []
  for d in ("masks", "overlays"):
    (out / d).mkdir(parents=True, exist_ok=True)
  for items, x in batches(paths, lambda im: segmentation_input(im, model), batch_size):
    logits = np.asarray(model(x)["out"]) if len(x) else np.zeros((0,))
    row_index = 0
    for path, image, error in items:
      if image is None:
        rows.append([str(path), error] + [""] * len(model.class_names))
      else:
        mask = upsampled_mask(logits[row_index], *image.shape[:2])
        row_index += 1
        stem = stems[path]
        Image.fromarray(mask).save(out / "masks" / f"{stem}.png")
        Image.fromarray(overlay(image, mask, colours, alpha)).save(out / "overlays" / f"{stem}.png")
        shares = np.bincount(mask.reshape(-1), minlength=len(model.class_names)) / mask.size
        rows.append([str(path), ""] + [f"{s:.6f}" for s in shares])
      progress.update(1)
  write_csv(out / "predictions.csv", ["file", "error"] + [f"share_{c}" for c in model.class_names],
            rows)
  return rows


def output_stems(paths: Sequence[Path]) -> Dict[Path, str]:
  """Output names: the path below the common folder, without extension, sub-folders
  joined by `__`, so `a/x.jpg` and `b/x.jpg` never overwrite each other."""
  root = Path(os.path.commonpath([str(p.parent) for p in paths]))
  return {p: "__".join(p.relative_to(root).with_suffix("").parts) for p in paths}


def predict_detection(model: TrainedModel, paths, out: Path, batch_size: int, draw: bool,
                      progress) -> List[List[Any]]:
  from tlflax.heads import detection as det  # pylint: disable=g-import-not-at-top
  from tlflax.models import detection as det_models  # pylint: disable=g-import-not-at-top
  cfg = model.config.detection
  priors = det_models.priors_for(model.module, model.image_size)
  results, rows = {}, []
  stems = output_stems(paths)
  if draw:
    (out / "drawn").mkdir(parents=True, exist_ok=True)
  for items, x in batches(paths, lambda im: detection_input(im, model)[0], batch_size):
    found = None
    if len(x):
      found = det.postprocess(cfg.head, model(x), priors, score_threshold=cfg.score_threshold,
                              iou_threshold=cfg.iou_threshold, pre_nms_top_k=cfg.pre_nms_top_k,
                              max_detections=cfg.max_detections)
      found = {k: np.asarray(v) for k, v in found.items()}
    row_index = 0
    for path, image, error in items:
      if image is None:
        results[str(path)] = {"error": error}
        rows.append([str(path), error])
      else:
        scale = model.image_size / max(image.shape[:2])  # = preprocess_boxes.fit_scale.
        keep = found["valid"][row_index]
        boxes = clip_boxes(found["boxes"][row_index][keep] / scale, image.shape[:2])
        detections = [{"box": [round(float(v), 2) for v in box],
                       "label": model.class_names[int(c)], "score": round(float(s), 5)}
                      for box, c, s in zip(boxes, found["classes"][row_index][keep],
                                           found["scores"][row_index][keep])]
        results[str(path)] = {"detections": detections}
        if draw:
          draw_boxes(image, detections, model.class_names).save(out / "drawn" / f"{stems[path]}.png")
        rows.append([str(path), ""])
        row_index += 1
      progress.update(1)
  out.mkdir(parents=True, exist_ok=True)
  (out / "detections.json").write_text(json.dumps(results, indent=1))
  return rows


def clip_boxes(boxes: np.ndarray, shape) -> np.ndarray:
  height, width = shape
  return np.clip(boxes, 0, [width, height, width, height])


def draw_boxes(image: np.ndarray, detections, class_names):
  """The photo with each box outlined in its class colour and labelled with its score."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  colours = palette(len(class_names) + 1)[1:]  # Skip black.
  canvas = Image.fromarray(image)
  pen = ImageDraw.Draw(canvas)
  for d in detections:
    colour = tuple(int(v) for v in colours[class_names.index(d["label"])])
    pen.rectangle(d["box"], outline=colour, width=2)
    pen.text((d["box"][0] + 2, d["box"][1] + 1), f"{d['label']} {d['score']:.2f}", fill=colour)
  return canvas


def predict(workdir: str, images: str, out: str, batch_size: int = 16, top_k: int = 5,
            alpha: float = 0.5, draw: bool = False) -> Dict[str, Any]:
  """Runs the trained model of `workdir` on `images`; returns a small summary."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  model = TrainedModel(workdir)
  paths = list_images(images)
  if not paths:
    raise FileNotFoundError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) under {images}.")
  out_dir = Path(out)
  with tqdm(total=len(paths), unit="img", dynamic_ncols=True) as progress:
    if model.task == "segmentation":
      rows = predict_segmentation(model, paths, out_dir, batch_size, alpha, progress)
    elif model.task == "detection":
      rows = predict_detection(model, paths, out_dir, batch_size, draw, progress)
    elif model.task == "classification":
      rows = predict_classification(model, paths, out_dir, batch_size, top_k, progress)
    else:
      raise ValueError(f"Run {workdir} has task {model.task!r}, which predict does not know.")
  failed = [r for r in rows if r[1]]
  return {"task": model.task, "step": model.step, "images": len(paths),
          "failed": len(failed), "out": str(out_dir)}


def main(argv=None) -> None:
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "The --workdir of a tlflax.main run.")
  flags.DEFINE_string("images", None, "Folder of images (searched recursively).")
  flags.DEFINE_string("out", None, "Output folder.")
  flags.DEFINE_integer("batch_size", 16, "Images per forward pass.")
  flags.DEFINE_integer("top_k", 5, "Classification: labels per image.")
  flags.DEFINE_float("alpha", 0.5, "Segmentation overlays: colour opacity.")
  flags.DEFINE_bool("draw", False, "Detection: also write the images with their boxes drawn.")
  flags.mark_flags_as_required(["workdir", "images", "out"])

  def run(unused_argv):
    from tlflax import xla_env  # pylint: disable=g-import-not-at-top
    xla_env.configure()
    f = flags.FLAGS
    summary = predict(f.workdir, f.images, f.out, f.batch_size, f.top_k, f.alpha, f.draw)
    print(json.dumps(summary))

  app.run(run, argv)


if __name__ == "__main__":
  main()

"""`python -m tlflax.export --workdir DIR --out OUTDIR`: a trained run as a serving artifact.

A serving system should not have to know the run's mean/std or the Flax
module: the exported function takes RGB images at the model's input size,
pixel values 0-255 (uint8 by default, or float32 with --input_dtype=float32),
batch x height x width x 3, and does `(x / 255 - mean) / std` itself. Its
weights are constants inside the artifact.

  OUTDIR/model.jax_export   `jax.export` serialized StableHLO (deserialize with
                            `jax.export.deserialize(bytes).call(images)`); the
                            batch dimension is symbolic (`b`) unless --batch_size
  OUTDIR/saved_model/       TensorFlow SavedModel from `jax.experimental.jax2tf`
                            (signature `serving_default`, input `images`), written
                            when jax2tf imports and converts in the installed JAX;
                            checked in jax 0.10.2 + tensorflow 2.21 (see
                            `saved_model` in metadata.json for what happened)
  OUTDIR/metadata.json      task, class names, input shape / dtype / range, the
                            folded-in mean/std, output names and shapes, step, files

Outputs, by task: classification {"logits", "probabilities"} [B, classes];
segmentation {"logits"} [B, S, S, classes] (argmax = class map at the input
size); detection the head's raw outputs (per-level class logits and box
regressions, as `module.apply` returns them): box decoding and NMS stay on the
serving side (`tlflax.heads.detection.postprocess` is the reference), because
NMS has a data-dependent output size.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import numpy as np  # noqa: E402

TASKS = ("classification", "segmentation", "detection")
INPUT_DTYPES = ("uint8", "float32")


@dataclasses.dataclass
class Servable:
  """What export needs of a model: module, variables, task and preprocessing."""
  module: Any
  variables: Any
  task: str
  class_names: List[str]
  image_size: int
  mean: Sequence[float]
  std: Sequence[float]
  info: Dict[str, Any] = dataclasses.field(default_factory=dict)

  @classmethod
  def from_workdir(cls, workdir: str) -> "Servable":
    from tlflax import predict  # pylint: disable=g-import-not-at-top
    model = predict.TrainedModel(workdir)
    return cls(model.module, model.variables, model.task, model.class_names, model.image_size,
               model.mean.tolist(), model.std.tolist(),
               {"workdir": str(workdir), "step": model.step, "model": model.info.get("model"),
                "preprocessing": model.info.get("preprocessing")})


def portable_ops():
  """tlflax's ops as lax ops while tracing for export (`tlflax.ops.platform.lax_ops`).

  The CPU fast paths are CPU-only choices: the compiled kernels are custom calls
  that `jax.export` cannot serialize, and the "shifted" depthwise loops over
  batch chunks, which needs a concrete batch size. The artifact should run well
  anywhere, with a symbolic batch.
  """
  from tlflax.ops import platform  # pylint: disable=g-import-not-at-top
  return platform.lax_ops()


def serving_function(model: Servable) -> Callable:
  """images (0-255, [B, S, S, 3]) -> the task's outputs, normalisation folded in."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if model.task not in TASKS:
    raise ValueError(f"Task {model.task!r} has no export; exportable tasks: {', '.join(TASKS)}.")
  mean = jnp.asarray(model.mean, jnp.float32)
  std = jnp.asarray(model.std, jnp.float32)
  variables = model.variables

  def serve(images):
    x = (images.astype(jnp.float32) / 255.0 - mean) / std
    out = model.module.apply(variables, x, train=False)
    if model.task == "classification":
      return {"logits": out, "probabilities": jax.nn.softmax(out, axis=-1)}
    if model.task == "segmentation":
      return {"logits": out["out"]}
    return out  # Detection: the head's raw outputs.

  return serve


def input_spec(model: Servable, input_dtype: str, batch_size: Optional[int]):
  """ShapeDtypeStruct of the image batch: symbolic batch `b` unless `batch_size` is given."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax import export as jax_export  # pylint: disable=g-import-not-at-top
  if input_dtype not in INPUT_DTYPES:
    raise ValueError(f"input_dtype={input_dtype!r}; choose one of {', '.join(INPUT_DTYPES)}.")
  s = model.image_size
  if batch_size:
    shape = (int(batch_size), s, s, 3)
  else:
    shape = jax_export.symbolic_shape(f"b, {s}, {s}, 3")
  return jax.ShapeDtypeStruct(shape, np.dtype(input_dtype))


def export_stablehlo(model: Servable, input_dtype: str = "uint8",
                     batch_size: Optional[int] = None,
                     platforms: Optional[Sequence[str]] = None):
  """The `jax.export.Exported` of the serving function (not yet serialized)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax import export as jax_export  # pylint: disable=g-import-not-at-top
  spec = input_spec(model, input_dtype, batch_size)
  kwargs = {"platforms": tuple(platforms)} if platforms else {}
  with portable_ops():
    return jax_export.export(jax.jit(serving_function(model)), **kwargs)(spec)


def load_exported(path: str):
  """The deserialized `jax.export.Exported`; call it with `.call(images)`."""
  from jax import export as jax_export  # pylint: disable=g-import-not-at-top
  return jax_export.deserialize(bytearray(Path(path).read_bytes()))


def jax2tf_status() -> Optional[str]:
  """None if `jax.experimental.jax2tf` and TensorFlow import, else the reason they don't."""
  try:
    import importlib  # pylint: disable=g-import-not-at-top
    importlib.import_module("jax.experimental.jax2tf")
    importlib.import_module("tensorflow")
  except Exception as e:  # pylint: disable=broad-except  Any import failure means: not available.
    return f"{type(e).__name__}: {e}"
  return None


def export_saved_model(model: Servable, out: Path, input_dtype: str = "uint8",
                       batch_size: Optional[int] = None) -> Path:
  """A TensorFlow SavedModel of the serving function via jax2tf (native serialization)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  s = model.image_size
  poly = None if batch_size else [f"(b, {s}, {s}, 3)"]
  converted = jax2tf.convert(serving_function(model), polymorphic_shapes=poly,
                             with_gradient=False)
  signature = tf.TensorSpec([batch_size, s, s, 3], tf.as_dtype(input_dtype), name="images")
  module = tf.Module()
  module.serve = tf.function(converted, input_signature=[signature], autograph=False)
  path = out / "saved_model"
  with portable_ops():
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
  return path


def output_shapes(model: Servable, input_dtype: str) -> Dict[str, Any]:
  """{name: [shape with B for the batch]} of the serving function's outputs."""
  import jax  # pylint: disable=g-import-not-at-top
  s = model.image_size
  shapes = jax.eval_shape(serving_function(model),
                          jax.ShapeDtypeStruct((1, s, s, 3), np.dtype(input_dtype)))
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  name = lambda path: "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
  return {name(path): ["B"] + list(v.shape[1:]) for path, v in flat}


def export(model: Servable, out: str, input_dtype: str = "uint8",
           batch_size: Optional[int] = None, saved_model: bool = True,
           platforms: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  """Writes the artifacts and metadata.json into `out`; returns the metadata."""
  import jax  # pylint: disable=g-import-not-at-top
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  exported = export_stablehlo(model, input_dtype, batch_size, platforms)
  (out / "model.jax_export").write_bytes(exported.serialize())
  meta = {
      "task": model.task, "class_names": list(model.class_names),
      "input": {"name": "images", "shape": [batch_size or "b", model.image_size,
                                            model.image_size, 3],
                "dtype": input_dtype, "range": "0-255", "layout": "NHWC, RGB",
                "note": "resize to the input size first, as tlflax.predict does"},
      "preprocessing_folded_in": {"formula": "(images / 255 - mean) / std",
                                  "mean": [float(v) for v in model.mean],
                                  "std": [float(v) for v in model.std]},
      "outputs": output_shapes(model, input_dtype),
      "jax_export": {"file": "model.jax_export", "platforms": list(exported.platforms),
                     "symbolic_batch": not batch_size,
                     "calling_convention_version": exported.calling_convention_version},
      "versions": {"jax": jax.__version__},
      **model.info,
  }
  if model.task == "detection":
    meta["detection_note"] = ("Raw head outputs; decode boxes against the anchors/points and "
                              "apply NMS as tlflax.heads.detection.postprocess does.")
  meta["saved_model"] = write_saved_model(model, out, input_dtype, batch_size, saved_model)
  (out / "metadata.json").write_text(json.dumps(meta, indent=1))
  return meta


def write_saved_model(model, out: Path, input_dtype, batch_size, wanted: bool) -> Dict[str, Any]:
  """Tries the SavedModel; records why not instead of failing the whole export."""
  if not wanted:
    return {"written": False, "reason": "not requested (--nosaved_model)"}
  missing = jax2tf_status()
  if missing:
    return {"written": False, "reason": f"jax.experimental.jax2tf is not available: {missing}"}
  try:
    path = export_saved_model(model, out, input_dtype, batch_size)
  except Exception as e:  # pylint: disable=broad-except  Reported in metadata and output.
    return {"written": False, "reason": f"jax2tf conversion failed: {type(e).__name__}: {e}"}
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return {"written": True, "dir": path.name, "signature": "serving_default",
          "tensorflow": tf.__version__}


def main(argv=None) -> None:
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "The --workdir of a tlflax.main run.")
  flags.DEFINE_string("out", None, "Output folder.")
  flags.DEFINE_enum("input_dtype", "uint8", list(INPUT_DTYPES), "Pixel type of the input.")
  flags.DEFINE_integer("batch_size", None, "Fixed batch size; default: symbolic batch.")
  flags.DEFINE_bool("saved_model", True, "Also write a TensorFlow SavedModel (jax2tf).")
  flags.DEFINE_list("platforms", None, "Lowering platforms, e.g. cpu,cuda; default: this one.")
  flags.mark_flags_as_required(["workdir", "out"])

  def _run(unused_argv):
    from tlflax import xla_env  # pylint: disable=g-import-not-at-top
    xla_env.configure()
    f = flags.FLAGS
    meta = export(Servable.from_workdir(f.workdir), f.out, f.input_dtype, f.batch_size,
                  f.saved_model, f.platforms)
    sm = meta["saved_model"]
    print(f"jax.export: {Path(f.out) / 'model.jax_export'} (platforms "
          f"{meta['jax_export']['platforms']}, batch "
          f"{'symbolic' if meta['jax_export']['symbolic_batch'] else f.batch_size})")
    print(f"SavedModel: {Path(f.out) / sm['dir']}" if sm["written"]
          else f"SavedModel: not written ({sm['reason']})")
    print(json.dumps({"task": meta["task"], "outputs": meta["outputs"], "out": f.out}))

  app.run(_run, argv)


if __name__ == "__main__":
  main()

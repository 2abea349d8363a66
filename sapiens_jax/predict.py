r"""Run a trained checkpoint on your own photos.

  python -m sapiens_jax.predict --workdir=DIR --input=IMAGE_OR_DIR --output=DIR \
      [--boxes=BOXES.json] [--step=N] [--task=features] [--batch_size=8]
  python -m sapiens_jax.predict --weights=FILE_OR_DIR --input=IMAGE_OR_DIR --output=DIR \
      [--task=features] [--image_size=1024,768]

--weights reads a released PyTorch file (Sapiens or Sapiens2, pretrain or task checkpoint) or a
transformers-style directory, with no run of ours: the family and size are read from the tensors,
and for a task checkpoint the task, its reference (Sapiens or Sapiens2) and its labels from the
head's tensors (`init_from.model_from_file`); a pretrain file, or --task=features, gives the
backbone's features. Images are prepared as upstream's test pipelines do at --image_size.

Writes, per image STEM, what the run's task writes (shared sapiens_v1.md section 8; each task
module's `write_prediction` says which files):
  pose:     STEM_pose.png (skeletons), and keypoints.json for all images in the COCO result format
            [{file_name, category_id 1, bbox, keypoints [x, y, score] * K, score}]. Each person box
            is cropped as in evaluation (padded 1.25, 3:4, UDP warp) and flip-tested; without
            --boxes (a JSON object: file name -> list of [x, y, w, h]) the whole image is the box.
  seg:      STEM_seg.png (uint8 class ids) and STEM_seg_overlay.png (palette over the image).
  depth:    STEM_depth.npy (float32 (H, W) relative depth) and STEM_depth.png (inferno colours).
  normal:   STEM_normal.npy (float32 (H, W, 3) unit normals) and STEM_normal.png.
  pointmap, albedo, matting (Sapiens2): see their task modules.
  features: STEM_features.npy, float32 (C, H/16, W/16) final-norm patch features (H/64 with
            Sapiens2's 4K tokenizer); works on any run, pretraining included (prefix tokens, the
            cls token and registers, are attended to, then dropped, as the original).
Dense tasks stretch the image to the run's image size (no aspect kept) and resize the network's
outputs back to the original size (bilinear, before the argmax / renormalisation). Unreadable
images are named in a warning and skipped.
"""
import functools
import json
import os

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sapiens_jax import checkpoint
from sapiens_jax import init_from
from sapiens_jax import objectives
from sapiens_jax import tasks
from sapiens_jax import writers
from sapiens_jax.data import transforms
from sapiens_jax.models import layers

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
FEATURES = "features"  # --task for any run: the backbone's patch features


def load_run(workdir, step=None):
  """(config, params on the default device) of checkpoint `step` (default: the newest) of a run."""
  params, config, _ = checkpoint.restore_params(workdir, step)
  return config, jax.device_put(params)


def load_weights(path, image_size, task=None):
  """(config, params on the default device) of a PyTorch file or directory for images of
  `image_size` ("H", "W" strings or ints): its task model when it holds a task head and `task` is
  not FEATURES, else its backbone."""
  try:
    size = tuple(int(v) for v in image_size)
  except ValueError:
    size = ()
  if len(size) != 2 or min(size) <= 0:
    raise ValueError(f"--image_size={','.join(map(str, image_size))}: expected H,W, two positive integers")
  config, params = init_from.model_from_file(path, size, backbone_only=task == FEATURES)
  if config.get("task") is None and task not in (None, FEATURES):
    raise ValueError(f"--weights={path!r} holds no task head: it predicts --task={FEATURES}, not {task!r}")
  return config, jax.device_put(params)


def check_task(config, task):
  """The task to predict: `task`, or the run's own (features for a pretraining run)."""
  own = objectives.get(config).predict_task(config)
  task = task or own or FEATURES
  if task not in (own, FEATURES):
    can = f"{own} or {FEATURES}" if own else FEATURES
    raise ValueError(f"a {own or config.objective} run predicts {can}, not {task!r}")
  return task


@functools.cache
def _network(config_json, task):
  """The jitted (params, uint8 images) -> outputs of `task`, one per run config (compiled once per
  shape); images are normalised inside, on the device, as in training."""
  config = ml_collections.ConfigDict(json.loads(config_json))
  objective = objectives.get(config)
  if task == FEATURES:
    encoder = objective.encoder(config)

    def features(params, images):
      tokens = encoder.apply({"params": params["encoder"]}, transforms.normalize(images))
      patch_tokens = tokens[:, encoder.num_prefix_tokens:]
      return jnp.moveaxis(layers.tokens_to_map(patch_tokens, encoder.grid), -1, 1).astype(jnp.float32)
    return jax.jit(features)
  model = objective.build_model(config)

  def outputs(params, images):
    forward = lambda x: model.apply({"params": params}, x)
    return tasks.get(task).predict_outputs(forward, transforms.normalize(images), config)
  return jax.jit(outputs)


def run_network(config, params, task, inputs, batch_size):
  """Outputs of a list of uint8 (H, W, 3) inputs, in fixed-size batches (the last zero-padded,
  so every batch reuses one compiled program), as one numpy array."""
  forward = _network(json.dumps(config.to_dict()), task)
  outputs = []
  for start in range(0, len(inputs), batch_size):
    chunk = np.stack(inputs[start:start + batch_size])
    padded = np.pad(chunk, [(0, batch_size - len(chunk))] + [(0, 0)] * 3)
    outputs.append(np.asarray(jax.device_get(forward(params, padded)))[:len(chunk)])
  return np.concatenate(outputs) if outputs else np.zeros((0,))


def whole_image_box(image):
  return [0.0, 0.0, float(image.shape[1]), float(image.shape[0])]


def network_inputs(config, task, image, boxes):
  """(inputs, context): the network inputs of one image (one per person box, for a task that
  crops people) and what `finish` needs to map outputs back."""
  if task == FEATURES:
    return [transforms.stretch(image, config.image_size)], None
  return tasks.get(task).predict_inputs(config, image, boxes)


def finish(config, task, image, outputs, context):
  """One image's network outputs -> its predictions, as predict_image returns them."""
  if task == FEATURES:
    return {"features": outputs[0]}
  return tasks.get(task).finish(config, image, outputs, context)


def predict_image(config, params, image, boxes=None, task=None, batch_size=8):
  """Predictions for one uint8 (H, W, 3) RGB image, as numpy arrays in a dict:

  pose: keypoints (N, K, 2) image pixels and keypoint_scores (N, K), one row per [x, y, w, h] box
  of `boxes` (default: the whole image); seg: labels (H, W) uint8; depth: depth (H, W);
  normal: normals (H, W, 3) unit length; pointmap: pointmap (H, W, 3) metric XYZ; albedo: albedo
  (H, W, 3) in [0, 1]; matting: alpha (H, W) and foreground (H, W, 3) in [0, 1]; features: features (C, h, w).
  """
  task = check_task(config, task)
  boxes = [whole_image_box(image)] if boxes is None else boxes
  inputs, context = network_inputs(config, task, image, boxes)
  outputs = run_network(config, params, task, inputs, batch_size)
  return finish(config, task, image, outputs, context)


def image_files(path):
  """The image files to read: `path` itself, or the images directly inside the folder `path`."""
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise FileNotFoundError(f"--input={path!r} is neither an image file nor a folder")
  names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))
  if not names:
    raise FileNotFoundError(f"--input={path!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
  return [os.path.join(path, n) for n in names]


def load_boxes(path):
  """{file name: [[x, y, w, h], ...]} from a JSON file, every box checked."""
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"cannot read boxes file {path}: {e}") from e
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a JSON object mapping file names to lists of [x, y, w, h]")
  for name, boxes in data.items():
    if not isinstance(boxes, list) or not all(_is_box(b) for b in boxes):
      raise ValueError(f"{path}: {name!r} must be a list of [x, y, w, h] boxes with w, h > 0, got {boxes!r}")
  return data


def _is_box(box):
  numbers = isinstance(box, list) and len(box) == 4 and all(
      isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
  return numbers and box[2] > 0 and box[3] > 0


def read_image(path):
  with open(path, "rb") as f:
    return transforms.decode_image(f.read(), path)


def write_outputs(config, task, output, path, image, prediction, context):
  """The files of one image (see the module doc); returns its records for the task's RECORDS_FILE."""
  stem = os.path.join(output, os.path.splitext(os.path.basename(path))[0])
  if task == FEATURES:
    np.save(stem + "_features.npy", prediction["features"])
    return []
  return tasks.get(task).write_prediction(config, stem, os.path.basename(path), image, prediction, context)


def predict_files(config, params, input_path, output, boxes=None, task=None, batch_size=8):
  """Predicts every image of `input_path` (a file or a folder) into the folder `output`.

  Images are gathered until a batch is full, so the network always runs on `batch_size` inputs
  (people, for pose) at once. `boxes`: {file name: [[x, y, w, h], ...]}; images it does not name
  use the whole image. Returns (names written, names skipped as unreadable).
  """
  task = check_task(config, task)
  paths = image_files(input_path)
  os.makedirs(output, exist_ok=True)
  written, skipped, records, pending = [], [], [], []
  progress = writers.Progress(len(paths), 1, 0, every_secs=10)

  def flush():
    inputs = [x for item in pending for x in item["inputs"]]
    outputs = run_network(config, params, task, inputs, batch_size)
    start = 0
    for item in pending:
      count = len(item["inputs"])
      prediction = finish(config, task, item["image"], outputs[start:start + count], item["context"])
      records.extend(write_outputs(config, task, output, item["path"], item["image"], prediction, item["context"]))
      written.append(os.path.basename(item["path"]))
      start += count
    pending.clear()
    progress.update(len(written) + len(skipped))

  for path in paths:
    try:
      image = read_image(path)
    except (OSError, transforms.ImageDecodeError) as e:
      logging.warning("Skipping unreadable image %s: %s", path, e)
      skipped.append(os.path.basename(path))
      continue
    image_boxes = (boxes or {}).get(os.path.basename(path), [whole_image_box(image)])
    inputs, context = network_inputs(config, task, image, image_boxes)
    pending.append({"path": path, "image": image, "inputs": inputs, "context": context})
    if sum(len(item["inputs"]) for item in pending) >= batch_size:
      flush()
  flush()
  records_file = None if task == FEATURES else getattr(tasks.get(task), "RECORDS_FILE", None)
  if records_file:
    with open(os.path.join(output, records_file), "w") as f:
      json.dump(records, f)
  return written, skipped


def cli():
  """Flags are defined here, not at import, so importing this module never clashes with main.py's."""
  workdir = flags.DEFINE_string("workdir", None, "Run directory whose checkpoints/ to read.")
  weights = flags.DEFINE_string("weights", None, "Instead of --workdir: a PyTorch .pth/.safetensors file or a "
                                "directory with model.safetensors (--task=features).")
  image_size = flags.DEFINE_list("image_size", ["1024", "768"], "With --weights: H,W the image is resized to.")
  input_path = flags.DEFINE_string("input", None, "An image file, or a folder of images.")
  output = flags.DEFINE_string("output", None, "Folder for the predictions.")
  boxes = flags.DEFINE_string("boxes", None, "Person boxes, for tasks that crop people: JSON {file name: "
                              "[[x, y, w, h], ...]}; default: the whole image.")
  step = flags.DEFINE_integer("step", None, "Checkpoint step; default: the newest.")
  task = flags.DEFINE_enum("task", None, [*tasks.TASKS, FEATURES],
                           "What to predict; default: the run's task (features for a pretraining run).")
  batch_size = flags.DEFINE_integer("batch_size", 8, "Images (pose: people) per network call.")
  flags.mark_flags_as_required(["input", "output"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if batch_size.value <= 0:
      raise app.UsageError(f"--batch_size must be positive, got {batch_size.value}")
    if (workdir.value is None) == (weights.value is None):
      raise app.UsageError("give one of --workdir (a run of ours) and --weights (a PyTorch file or directory)")
    person_boxes = load_boxes(boxes.value) if boxes.value else None  # fail before the slow load
    logging.set_verbosity(logging.ERROR)  # Orbax logs every read, and its read-only mode warns
    if weights.value:
      config, params = load_weights(weights.value, image_size.value, task.value)
    else:
      config, params = load_run(workdir.value, step.value)
    logging.set_verbosity(logging.INFO)  # the progress line
    written, skipped = predict_files(config, params, input_path.value, output.value, person_boxes,
                                     task.value, batch_size.value)
    message = f"Wrote predictions for {len(written)} images to {output.value}"
    if skipped:
      message += f"; skipped {len(skipped)} unreadable: {', '.join(skipped)}"
    print(message, flush=True)

  app.run(main)


if __name__ == "__main__":
  cli()

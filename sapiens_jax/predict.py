r"""Run a trained checkpoint on your own photos.

  python -m sapiens_jax.predict --workdir=DIR --input=IMAGE_OR_DIR --output=DIR \
      [--boxes=BOXES.json] [--step=N] [--task=features] [--batch_size=8]

Writes, per image STEM (shared sapiens_v1.md section 8):
  pose:     STEM_pose.png (skeletons), and keypoints.json for all images in the COCO result format
            [{file_name, category_id 1, bbox, keypoints [x, y, score] * K, score}]. Each person box
            is cropped as in evaluation (padded 1.25, 3:4, UDP warp) and flip-tested; without
            --boxes (a JSON object: file name -> list of [x, y, w, h]) the whole image is the box.
  seg:      STEM_seg.png (uint8 class ids) and STEM_seg_overlay.png (palette over the image).
  depth:    STEM_depth.npy (float32 (H, W) relative depth) and STEM_depth.png (inferno colours).
  normal:   STEM_normal.npy (float32 (H, W, 3) unit normals) and STEM_normal.png.
  features: STEM_features.npy, float32 (C, H/16, W/16) final-norm patch features; works on any run,
            pretraining included (the cls token is attended to, then dropped, as the original).
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
import cv2
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from sapiens_jax import evaluate
from sapiens_jax import export
from sapiens_jax import heads
from sapiens_jax import train
from sapiens_jax import visualize
from sapiens_jax import vit
from sapiens_jax import writers
from sapiens_jax.data import meta
from sapiens_jax.data import pose_transforms
from sapiens_jax.data import transforms

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
KEYPOINTS_FILE = "keypoints.json"


def load_run(workdir, step=None):
  """(config, params on the default device) of checkpoint `step` (default: the newest) of a run."""
  params, step = export.restore_params(workdir, step)
  manager, _ = export.checkpoint_steps(workdir)
  saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  return ml_collections.ConfigDict(saved), jax.device_put(params)


def check_task(config, task):
  """The task to predict: `task`, or the run's own (features for a pretraining run)."""
  default = "features" if config.task == "mae" else config.task
  task = task or default
  if task not in ("features", default):
    raise ValueError(f"a {config.task} run predicts {default} or features, not {task!r}")
  return task


@functools.cache
def _network(config_json, task):
  """The jitted (params, uint8 images) -> outputs of `task`, one per run config (compiled once per
  shape); images are normalised inside, on the device, as in training."""
  config = ml_collections.ConfigDict(json.loads(config_json))
  if task == "features":
    # An MAE encoder attends to its cls token; a fine-tuned one has none (reference section 8).
    with_cls = config.task == "mae"
    encoder = vit.vit_from_config(config.model, config.image_size, use_cls_token=with_cls)

    def features(params, images):
      tokens = encoder.apply({"params": params["encoder"]}, transforms.normalize(images))[:, int(with_cls):]
      return jnp.moveaxis(heads.tokens_to_map(tokens, encoder.grid), -1, 1).astype(jnp.float32)
    return jax.jit(features)
  model = train.build_model(config)
  if task == "pose":
    return jax.jit(functools.partial(evaluate.predict, model=model, config=config))
  return jax.jit(lambda params, images: model.apply({"params": params}, transforms.normalize(images)))


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
  """(inputs, crops): one uint8 network input per person box (pose) or per image."""
  height, width = config.image_size
  if task != "pose":
    stretched = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    return [stretched], None
  crops = [pose_transforms.topdown_eval_sample(image, box, input_size=(width, height)) for box in boxes]
  return [c["image"] for c in crops], crops


def resize_labels(logits, height, width):
  """Argmax of the logits resized (bilinear, half-pixel centres) to (height, width), a channel at a
  time, so a large photo never holds all C resized channels at once."""
  best = np.full((height, width), -np.inf, np.float32)
  labels = np.zeros((height, width), np.uint8)
  for c in range(logits.shape[-1]):
    channel = cv2.resize(np.ascontiguousarray(logits[..., c], np.float32), (width, height),
                         interpolation=cv2.INTER_LINEAR)
    better = channel > best  # strict: ties keep the lower class, as argmax
    labels[better], best[better] = c, channel[better]
  return labels


def resize_map(outputs, height, width):
  """(h, w, C) float outputs -> (height, width, C), bilinear with half-pixel centres."""
  resized = cv2.resize(np.asarray(outputs, np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
  return resized.reshape(height, width, outputs.shape[-1])


def finish(config, task, image, outputs, crops):
  """One image's network outputs -> its predictions, as predict_image returns them."""
  height, width = image.shape[:2]
  if task == "pose":
    if not crops:  # no person box given for this image
      count = meta.skeleton(config.data.labels).num_keypoints
      return {"keypoints": np.zeros((0, count, 2), np.float32), "keypoint_scores": np.zeros((0, count), np.float32)}
    size = tuple(config.image_size)[::-1]
    keypoints, scores = evaluate.keypoints_from_heatmaps(
        outputs, [c["center"] for c in crops], [c["scale"] for c in crops], size)
    return {"keypoints": keypoints, "keypoint_scores": scores}
  if task == "features":
    return {"features": outputs[0]}
  if task == "seg":
    return {"labels": resize_labels(outputs[0], height, width)}
  resized = resize_map(outputs[0], height, width)
  if task == "depth":
    return {"depth": resized[..., 0]}
  length = np.linalg.norm(resized, axis=-1, keepdims=True)
  return {"normals": resized / np.maximum(length, visualize.NORMAL_EPS)}


def predict_image(config, params, image, boxes=None, task=None, batch_size=8):
  """Predictions for one uint8 (H, W, 3) RGB image, as numpy arrays in a dict:

  pose: keypoints (N, K, 2) image pixels and keypoint_scores (N, K), one row per [x, y, w, h] box
  of `boxes` (default: the whole image); seg: labels (H, W) uint8; depth: depth (H, W);
  normal: normals (H, W, 3) unit length; features: features (C, h, w).
  """
  task = check_task(config, task)
  boxes = [whole_image_box(image)] if boxes is None else boxes
  inputs, crops = network_inputs(config, task, image, boxes)
  outputs = run_network(config, params, task, inputs, batch_size)
  return finish(config, task, image, outputs, crops)


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


def pose_results(file_name, boxes, prediction):
  """COCO result records of one image; the score is the mean of its confident keypoints, as in
  evaluation."""
  return [evaluate.pose_result(xy, scores, file_name=file_name, bbox=[float(v) for v in box])
          for box, xy, scores in zip(boxes, prediction["keypoints"], prediction["keypoint_scores"])]


def write_outputs(config, task, output, path, image, boxes, prediction):
  """The files of one image (see the module doc); returns its pose records (else [])."""
  stem = os.path.join(output, os.path.splitext(os.path.basename(path))[0])
  if task == "pose":
    skeleton = meta.skeleton(config.data.labels)
    picture = image
    for xy, scores in zip(prediction["keypoints"], prediction["keypoint_scores"]):
      picture = visualize.draw_pose(picture, xy, scores, skeleton)
    visualize.save_png(stem + "_pose.png", picture)
    return pose_results(os.path.basename(path), boxes, prediction)
  if task == "features":
    np.save(stem + "_features.npy", prediction["features"])
  elif task == "seg":
    visualize.save_png(stem + "_seg.png", prediction["labels"])
    palette = meta.seg_classes(config.data.labels).palette
    visualize.save_png(stem + "_seg_overlay.png", visualize.overlay_parts(image, prediction["labels"], palette))
  else:
    everywhere = np.ones(image.shape[:2], bool)  # no person mask without a seg prediction
    if task == "depth":
      np.save(stem + "_depth.npy", prediction["depth"])
      visualize.save_png(stem + "_depth.png", visualize.colorize_depth(prediction["depth"], everywhere))
    else:
      np.save(stem + "_normal.npy", prediction["normals"])
      visualize.save_png(stem + "_normal.png", visualize.colorize_normals(prediction["normals"], everywhere))
  return []


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
      prediction = finish(config, task, item["image"], outputs[start:start + count], item["crops"])
      records.extend(write_outputs(config, task, output, item["path"], item["image"], item["boxes"], prediction))
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
    inputs, crops = network_inputs(config, task, image, image_boxes)
    pending.append({"path": path, "image": image, "boxes": image_boxes, "inputs": inputs, "crops": crops})
    if sum(len(item["inputs"]) for item in pending) >= batch_size:
      flush()
  flush()
  if task == "pose":
    with open(os.path.join(output, KEYPOINTS_FILE), "w") as f:
      json.dump(records, f)
  return written, skipped


def cli():
  """Flags are defined here, not at import, so importing this module never clashes with main.py's."""
  workdir = flags.DEFINE_string("workdir", None, "Run directory whose checkpoints/ to read.")
  input_path = flags.DEFINE_string("input", None, "An image file, or a folder of images.")
  output = flags.DEFINE_string("output", None, "Folder for the predictions.")
  boxes = flags.DEFINE_string("boxes", None, "Pose: JSON {file name: [[x, y, w, h], ...]}; default: whole image.")
  step = flags.DEFINE_integer("step", None, "Checkpoint step; default: the newest.")
  task = flags.DEFINE_enum("task", None, ["pose", "seg", "depth", "normal", "features"],
                           "What to predict; default: the run's task (features for a pretraining run).")
  batch_size = flags.DEFINE_integer("batch_size", 8, "Images (pose: people) per network call.")
  flags.mark_flags_as_required(["workdir", "input", "output"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if batch_size.value <= 0:
      raise app.UsageError(f"--batch_size must be positive, got {batch_size.value}")
    person_boxes = load_boxes(boxes.value) if boxes.value else None  # fail before the slow load
    logging.set_verbosity(logging.ERROR)  # Orbax logs every read, and its read-only mode warns
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

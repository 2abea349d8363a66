r"""Procedural synthetic humans with exact pose, body-part, depth and normal labels.

  python -m sapiens_jax.data.synthetic_humans --output=DIR --num=1000 --height=256 --width=192 \
      [--seed=0] [--workers=1] [--framing=scene|portrait|studio] [--sapiens2]

Each person is ~17 convex primitives (capsules for limbs, neck and shoulders; ellipsoids for head,
chest, pelvis, hands and feet) posed by forward kinematics from joint angles within limits, and
rendered by analytic ray casting, so every label is exact: depth, normals, part labels with the
person's own left/right, and COCO-17 keypoints with visibility from the z-buffer.

Camera convention: pinhole at the origin, x right, y down, z forward (depth = camera z, metres);
pixel (row v, column u) looks along (u - cx, v - cy) / f, so u = fx * x / z + cx and pixel centres
are integers, as COCO keypoints assume. Person boxes are COCO [x, y, w, h] of the person's visible
pixels counted whole (x = first column, w = number of columns), like pycocotools' mask boxes.

Sample i depends only on (seed, i), so a dataset can be written in parallel or resumed.
Body-part labels use the Sapiens 28-class indices; only `SEG_CLASSES_USED` occur (no clothing
classes: garments only change colours, the labels stay anatomical).

Output layout under DIR: images/{i:06d}.jpg, masks/ (0/255 L PNG), segs/ (class ids, L PNG),
depths/ (float32 (H, W), 0 on background), normals/ (float32 (H, W, 3), unit, 0 on background),
cameras.json ({"000000": {"fx", "fy", "cx", "cy"}, ...}, the pinhole K of each image by file stem:
the pointmap depth * K^-1 [u, v, 1] is derived, not stored, see `pointmap`), person_keypoints.json
(COCO keypoints; image id = i, annotation ids from 1) and manifest.json ("folders" lists the folders).

With sapiens2 (write_dataset, --sapiens2) also the labels of the Sapiens2 tasks, 8-bit PNGs, lossless
so the relations below hold on the files:
  albedos/ RGB: base colour (what `shade` multiplies by the light), 0 on background (the mask says
    where it is valid). The shading is Lambert only, so on every person pixel
    image = clip(round(255 albedo (ambient + diffuse max(n.l, 0)) light colour + noise)), noise ~ N(0, 2).
  alphas/ L: 255 x the fraction of 4x4 sub-pixel rays that hit a person, measured in the silhouette
    band (pixels whose 3x3 neighbourhood holds person and background); elsewhere the mask. Holes
    narrower than a pixel inside the person, and slivers that no pixel centre sees, are not measured.
  foregrounds/ RGB: the person's colour (0 where alpha is 0), backgrounds/ RGB: the background
    plate, mattes/ RGB: their composite, exactly round((alpha fg + (255 - alpha) bg) / 255).
images/ keeps its hard edges (a pixel shows whatever its centre ray hits), so its files stay the
same; the matte image equals the image (before JPEG) outside the silhouette band.
"""
import collections
import json
import multiprocessing
import os

from absl import app
from absl import flags
import cv2
import numpy as np

from sapiens_jax.data import meta

_COCO17 = meta.skeleton("coco17")
_SEG_INDEX = {name: i for i, name in enumerate(meta.seg_classes("seg28").names)}

BACKGROUND = _SEG_INDEX["Background"]
FACE_NECK = _SEG_INDEX["Face_Neck"]
HAIR = _SEG_INDEX["Hair"]
TORSO = _SEG_INDEX["Torso"]
# Per side: (upper arm, lower arm, hand, upper leg, lower leg, foot).
_LIMB_PARTS = ("Upper_Arm", "Lower_Arm", "Hand", "Upper_Leg", "Lower_Leg", "Foot")
SIDE_LABELS = {side: tuple(_SEG_INDEX[f"{side.title()}_{part}"] for part in _LIMB_PARTS)
               for side in ("left", "right")}
SEG_CLASSES_USED = tuple(sorted(
    {BACKGROUND, FACE_NECK, HAIR, TORSO} | set(SIDE_LABELS["left"]) | set(SIDE_LABELS["right"])))

KEYPOINT_NAMES = _COCO17.names
COCO_SKELETON = tuple([a + 1, b + 1] for a, b in _COCO17.links)  # COCO's own 1-based links

MIN_VISIBLE_PIXELS = 20  # a person with fewer visible pixels gets no annotation
DEPTH_RANGE = (2.5, 6.0)  # metres from the camera to a person's pelvis

# Materials of one person; garments decide which limb segment wears which.
SKIN, HAIR_MATERIAL, TOP, BOTTOM, SHOES = range(5)
_NUM_MATERIALS = 5

Camera = collections.namedtuple("Camera", "fx fy cx cy")
Capsule = collections.namedtuple("Capsule", "start end radius label material")
# `axes` columns are the local axes in camera coordinates; a head (`hair_cap`) labels its top and
# back as Hair.
Ellipsoid = collections.namedtuple("Ellipsoid", "centre axes radii label material hair_cap")
# keypoints (17, 3) camera coords; keypoint_normals (17, 3) surface normals of face points (0 for
# joints); keypoint_depth (17,) how far below the surface a joint may lie and still be visible.
Person = collections.namedtuple(
    "Person", "primitives keypoints keypoint_normals keypoint_depth appearance")

# Average adult proportions in metres; `radii` triples follow the owning frame's local axes.
AVERAGE_SHAPE = {
    "spine": 0.50, "chest_radii": (0.16, 0.23, 0.11), "pelvis_radii": (0.16, 0.13, 0.11),
    "shoulder_half_width": 0.19, "shoulder_radius": 0.055, "hip_half_width": 0.095,
    "neck_length": 0.09, "neck_radius": 0.055, "head_radii": (0.078, 0.11, 0.095),
    "upper_arm": 0.29, "upper_arm_radius": 0.045, "lower_arm": 0.26, "lower_arm_radius": 0.037,
    "hand_radii": (0.09, 0.045, 0.022),  # length, width, thickness
    "upper_leg": 0.43, "upper_leg_radius": 0.07, "lower_leg": 0.42, "lower_leg_radius": 0.05,
    "foot_radii": (0.12, 0.045, 0.04),  # length, width, height
}
_GIRTH_KEYS = ("chest_radii", "pelvis_radii", "shoulder_radius", "neck_radius", "upper_arm_radius",
               "lower_arm_radius", "upper_leg_radius", "lower_leg_radius")

# Joint angle limits in degrees. Torso/head keys are shared; the rest exist per side as
# "left_NAME" / "right_NAME". Positive = flexion forward, abduction away from the midline,
# head/spine turn or bend to the person's left for yaw/side, nod forward for pitch.
_TRUNK_LIMITS = {"spine_bend": (-15, 35), "spine_side": (-20, 20), "spine_twist": (-30, 30),
                 "head_pitch": (-30, 40), "head_yaw": (-60, 60)}
_LIMB_LIMITS = {"shoulder_abduct": (0, 160), "shoulder_flex": (-40, 150), "arm_twist": (-40, 60),
                "elbow": (0, 145), "hip_flex": (-20, 100), "hip_abduct": (-10, 45),
                "leg_twist": (-30, 30), "knee": (0, 130), "ankle": (-20, 40)}
JOINT_LIMITS = {**{k: np.radians(v) for k, v in _TRUNK_LIMITS.items()},
                **{f"{side}_{k}": np.radians(v) for side in ("left", "right")
                   for k, v in _LIMB_LIMITS.items()}}
REST_POSE = {name: 0.0 for name in JOINT_LIMITS}  # standing straight, arms down, facing forward


class SyntheticDataError(ValueError):
  """Bad arguments to the generator (sizes, counts, unknown joint names)."""


def _rot_x(angle):
  c, s = np.cos(angle), np.sin(angle)
  return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _rot_y(angle):
  c, s = np.cos(angle), np.sin(angle)
  return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rot_z(angle):
  c, s = np.cos(angle), np.sin(angle)
  return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _rotate(vector, axis, angle):
  """Rodrigues: `vector` turned by `angle` about the unit `axis`."""
  return (vector * np.cos(angle) + _cross(axis, vector) * np.sin(angle)
          + axis * (axis @ vector) * (1 - np.cos(angle)))


def _cross(a, b):
  """np.cross for two 3-vectors, without its (here dominant) generic overhead."""
  return np.array([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


def _unit(vector):
  return vector / np.linalg.norm(vector)


def body_rotation(yaw, tilt=0.0, roll=0.0):
  """Body frame -> camera: columns are the person's (left, up, forward) in camera coordinates.

  yaw 0 faces the camera (the person's left is image right); yaw pi shows the back. `tilt` pitches
  the camera, `roll` leans the body sideways.
  """
  facing_camera = np.array([[1.0, 0, 0], [0, -1, 0], [0, 0, -1]])  # l=+x, u=-y, f=-z
  return _rot_x(tilt) @ facing_camera @ _rot_y(yaw) @ _rot_z(roll)


def _limb_directions(frame, abduct, flex, twist, side_sign):
  """Unit direction of the proximal segment and its hinge axis, in camera coordinates.

  From hanging straight down, abduct turns the segment out to its side, then flex turns it
  forward. The hinge (elbow/knee axis) starts as the person's right-pointing axis, so a positive
  rotation about it swings the distal segment forward, and follows the segment continuously.
  """
  local = _rotate(np.array([0.0, -1.0, 0.0]), np.array([0.0, 0.0, 1.0]), side_sign * abduct)
  local = _rotate(local, np.array([1.0, 0.0, 0.0]), -flex)
  hinge = _cross(local, [0.0, 0.0, 1.0])
  hinge = _unit(hinge) if np.linalg.norm(hinge) > 1e-6 else np.array([-1.0, 0.0, 0.0])
  hinge = _rotate(hinge, local, side_sign * twist)
  return frame @ local, frame @ hinge


def _ellipsoid_point(centre, axes, radii, direction):
  """Point on the ellipsoid surface along local `direction`, and the outward normal there."""
  unit = _unit(np.asarray(direction, float))
  scaled = unit / np.sqrt(np.sum(unit**2 / radii**2))  # local point on the surface
  return centre + axes @ scaled, _unit(axes @ (scaled / radii**2))


def build_person(shape, pose, rotation, position, appearance):
  """Forward kinematics: primitives and 3D COCO keypoints of one posed person.

  Args:
    shape: proportions like AVERAGE_SHAPE.
    pose: joint angles (radians) for every key of JOINT_LIMITS.
    rotation: body frame -> camera (see `body_rotation`).
    position: pelvis centre in camera coordinates (metres).
    appearance: from `sample_appearance` (garment lengths decide limb materials).
  """
  unknown = set(pose) ^ set(JOINT_LIMITS)
  if unknown:
    raise SyntheticDataError(
        f"pose must have exactly the joints of JOINT_LIMITS; differs in {sorted(unknown)}")
  shape = {k: np.asarray(v, float) for k, v in shape.items()}
  position = np.asarray(position, float)
  at = lambda frame, local: position + frame @ np.asarray(local, float)
  chest = rotation @ _rot_y(pose["spine_twist"]) @ _rot_z(-pose["spine_side"]) @ _rot_x(
      pose["spine_bend"])
  head = chest @ _rot_y(pose["head_yaw"]) @ _rot_x(pose["head_pitch"])
  spine = shape["spine"]
  keypoints, normals, depth = np.zeros((17, 3)), np.zeros((17, 3)), np.zeros(17)

  neck_base = at(chest, (0, 0.92 * spine, 0))
  neck_top = neck_base + head @ np.array([0, shape["neck_length"], 0])
  head_radii = shape["head_radii"]
  head_centre = neck_top + head @ np.array([0, 0.75 * head_radii[1], 0.1 * head_radii[2]])
  shoulders = [at(chest, (s * 0.8 * shape["shoulder_half_width"], 0.9 * spine, 0)) for s in (1, -1)]
  primitives = [
      Ellipsoid(at(rotation, (0, 0, 0)), rotation, shape["pelvis_radii"], TORSO, BOTTOM, False),
      Ellipsoid(at(chest, (0, 0.56 * spine, 0)), chest, shape["chest_radii"], TORSO, TOP, False),
      Capsule(shoulders[0], shoulders[1], shape["shoulder_radius"], TORSO, TOP),
      Capsule(neck_base, neck_top, shape["neck_radius"], FACE_NECK, SKIN),
      Ellipsoid(head_centre, head, head_radii, FACE_NECK, SKIN, True),
  ]
  # Face points on the head surface, with their normals for the facing test. Left = +x local.
  face_directions = ((0, -0.1, 1), (0.33, 0.12, 0.93), (-0.33, 0.12, 0.93), (1, 0, 0.1), (-1, 0, 0.1))
  for k, direction in enumerate(face_directions):
    keypoints[k], normals[k] = _ellipsoid_point(head_centre, head, head_radii, direction)

  sleeve = TOP if appearance["long_sleeves"] else SKIN
  trouser = BOTTOM if appearance["long_pants"] else SKIN
  for side, sign, first in (("left", 1.0, 5), ("right", -1.0, 6)):
    upper_arm, lower_arm, hand, upper_leg, lower_leg, foot = SIDE_LABELS[side]
    angle = lambda name: pose[f"{side}_{name}"]
    # Arm: shoulder -> elbow -> wrist, hand along the forearm.
    shoulder = at(chest, (sign * shape["shoulder_half_width"], 0.9 * spine, 0))
    direction, hinge = _limb_directions(chest, angle("shoulder_abduct"), angle("shoulder_flex"),
                                        angle("arm_twist"), sign)
    elbow = shoulder + shape["upper_arm"] * direction
    direction = _rotate(direction, hinge, angle("elbow"))
    wrist = elbow + shape["lower_arm"] * direction
    hand_axes = np.stack([direction, hinge, _cross(direction, hinge)], axis=1)
    primitives += [
        Capsule(shoulder, elbow, shape["upper_arm_radius"], upper_arm, TOP),
        Capsule(elbow, wrist, shape["lower_arm_radius"], lower_arm, sleeve),
        Ellipsoid(wrist + 0.9 * shape["hand_radii"][0] * direction, hand_axes, shape["hand_radii"],
                  hand, SKIN, False),
    ]
    # Leg: hip -> knee -> ankle, foot pointing forward from the ankle.
    hip = at(rotation, (sign * shape["hip_half_width"], -0.05, 0))
    direction, hinge = _limb_directions(rotation, angle("hip_abduct"), angle("hip_flex"),
                                        angle("leg_twist"), sign)
    knee = hip + shape["upper_leg"] * direction
    direction = _rotate(direction, hinge, -angle("knee"))
    ankle = knee + shape["lower_leg"] * direction
    toes = _rotate(direction, hinge, np.pi / 2 + angle("ankle"))
    foot_axes = np.stack([toes, hinge, _cross(toes, hinge)], axis=1)
    foot_radii = shape["foot_radii"]
    primitives += [
        Capsule(hip, knee, shape["upper_leg_radius"], upper_leg, BOTTOM),
        Capsule(knee, ankle, shape["lower_leg_radius"], lower_leg, trouser),
        Ellipsoid(ankle + 0.55 * foot_radii[0] * toes + 0.8 * foot_radii[2] * direction, foot_axes,
                  foot_radii, foot, SHOES, False),
    ]
    joints = (shoulder, elbow, wrist, hip, knee, ankle)
    radii = ("upper_arm_radius", "upper_arm_radius", "lower_arm_radius", "upper_leg_radius",
             "upper_leg_radius", "lower_leg_radius")
    for k, joint, radius in zip(range(first, 17, 2), joints, radii):
      keypoints[k] = joint
      depth[k] = shape[radius] + 0.03
  depth[:5] = 0.03
  return Person(primitives, keypoints, normals, depth, appearance)


def _signed_power(rng, low, high, power=1.5):
  """A value in [low, high] that prefers 0 (the rest angle) but reaches both limits."""
  u = rng.uniform(-1.0, 1.0)
  return abs(u)**power * (high if u > 0 else low)


def sample_pose(rng):
  """Random joint angles within JOINT_LIMITS, biased towards the rest pose."""
  return {name: float(_signed_power(rng, low, high)) for name, (low, high) in JOINT_LIMITS.items()}


def sample_shape(rng):
  """Random proportions: overall size, girth, and a small jitter per measurement."""
  size, girth = rng.uniform(0.85, 1.12), rng.uniform(0.8, 1.3)
  shape = {}
  for key, value in AVERAGE_SHAPE.items():
    jitter = rng.uniform(0.92, 1.08, np.shape(value))
    shape[key] = np.asarray(value) * size * jitter * (girth if key in _GIRTH_KEYS else 1.0)
  return shape


def _random_colour(rng, low=20, high=235):
  return rng.uniform(low, high, 3)


def sample_appearance(rng):
  """Per-material colours and procedural textures (plain, stripes, checks, waves), garments."""
  skin = np.array([240.0, 200, 170]) + rng.uniform(0, 1) * np.array([-160.0, -150, -140])
  hair = np.array([[20.0, 15, 10], [90, 55, 30], [200, 170, 110], [160, 160, 160]])[rng.integers(4)]
  colours = np.stack([skin + rng.uniform(-10, 10, 3), hair * rng.uniform(0.8, 1.2),
                      _random_colour(rng), _random_colour(rng), _random_colour(rng, 10, 120)])
  second = np.stack([colours[m] * rng.uniform(0.6, 0.9) if m < TOP else _random_colour(rng)
                     for m in range(_NUM_MATERIALS)])
  pattern = np.array([0, 1, rng.integers(4), rng.integers(4), rng.integers(2)])
  first_axis = rng.normal(size=(_NUM_MATERIALS, 3))
  first_axis /= np.linalg.norm(first_axis, axis=1, keepdims=True)
  second_axis = np.cross(first_axis, rng.normal(size=(_NUM_MATERIALS, 3)))
  second_axis /= np.linalg.norm(second_axis, axis=1, keepdims=True)
  frequency = 2 * np.pi / rng.uniform(0.03, 0.15, _NUM_MATERIALS)  # texture period in metres
  frequency[HAIR_MATERIAL] = 2 * np.pi / 0.01
  return {"colour": np.clip(colours, 0, 255), "second_colour": np.clip(second, 0, 255),
          "pattern": pattern, "frequency": frequency,
          "texture_axes": np.stack([first_axis, second_axis], 1),
          "long_sleeves": bool(rng.random() < 0.5), "long_pants": bool(rng.random() < 0.7)}


def ray_directions(camera, height, width):
  """(H, W, 3) ray per pixel with z = 1, so a hit at ray parameter t has depth t."""
  u = (np.arange(width) - camera.cx) / camera.fx
  v = (np.arange(height) - camera.cy) / camera.fy
  rays = np.ones((height, width, 3))
  rays[..., 0] = u[None, :]
  rays[..., 1] = v[:, None]
  return rays


def project(camera, points):
  """(N, 3) camera-coordinate points -> (N, 2) pixel (x, y); pixel centres are integers."""
  points = np.asarray(points, float)
  return np.stack([camera.fx * points[:, 0] / points[:, 2] + camera.cx,
                   camera.fy * points[:, 1] / points[:, 2] + camera.cy], axis=1)


def _bounding_sphere(primitive):
  if isinstance(primitive, Capsule):
    return (primitive.start + primitive.end) / 2, (
        np.linalg.norm(primitive.end - primitive.start) / 2 + primitive.radius)
  return primitive.centre, float(np.max(primitive.radii))


def _screen_rect(camera, primitive, height, width):
  """Pixel rows/columns [v0, v1) x [u0, u1) that can see `primitive` (its bounding cube's image)."""
  centre, radius = _bounding_sphere(primitive)
  corners = centre + radius * np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)])
  if np.min(corners[:, 2]) <= 1e-3:
    return 0, height, 0, width
  pixels = project(camera, corners)
  u0, v0 = np.floor(pixels.min(axis=0)).astype(int)
  u1, v1 = np.ceil(pixels.max(axis=0)).astype(int) + 1
  return max(v0, 0), min(v1, height), max(u0, 0), min(u1, width)


def _sphere_hit(rays, ray_sq, centre, radius):
  half_b = -(rays @ centre)
  c = centre @ centre - radius**2
  disc = half_b**2 - ray_sq * c
  with np.errstate(invalid="ignore"):
    t = (-half_b - np.sqrt(disc)) / ray_sq
  return np.where(disc >= 0, t, np.inf)


def _capsule_hit(rays, capsule):
  """Nearest hit t of rays from the origin with a capsule: min of its cylinder and end spheres."""
  start, radius = capsule.start, capsule.radius
  axis = capsule.end - start
  axis_sq = axis @ axis
  ray_sq = np.einsum("ij,ij->i", rays, rays)
  ray_axis = rays @ axis
  origin_axis = -(start @ axis)
  a = axis_sq * ray_sq - ray_axis**2
  half_b = -axis_sq * (rays @ start) - origin_axis * ray_axis
  c = axis_sq * (start @ start) - origin_axis**2 - radius**2 * axis_sq
  disc = half_b**2 - a * c
  with np.errstate(invalid="ignore", divide="ignore"):
    t = (-half_b - np.sqrt(disc)) / a
    along = origin_axis + t * ray_axis
    t = np.where((disc >= 0) & (a > 1e-12) & (along > 0) & (along < axis_sq), t, np.inf)
  t = np.minimum(t, _sphere_hit(rays, ray_sq, start, radius))
  return np.minimum(t, _sphere_hit(rays, ray_sq, capsule.end, radius))


def _capsule_normal(points, capsule):
  axis = capsule.end - capsule.start
  along = np.clip((points - capsule.start) @ axis / (axis @ axis), 0.0, 1.0)
  normal = points - capsule.start - along[:, None] * axis
  return normal / np.linalg.norm(normal, axis=1, keepdims=True)


def _ellipsoid_local(rays, ellipsoid):
  """Ray origins and directions in the ellipsoid's frame scaled to the unit sphere."""
  origin = -(ellipsoid.centre @ ellipsoid.axes) / ellipsoid.radii
  return origin, (rays @ ellipsoid.axes) / ellipsoid.radii


def _ellipsoid_hit(rays, ellipsoid):
  origin, directions = _ellipsoid_local(rays, ellipsoid)
  a = np.einsum("ij,ij->i", directions, directions)
  half_b = directions @ origin
  disc = half_b**2 - a * (origin @ origin - 1.0)
  with np.errstate(invalid="ignore"):
    t = (-half_b - np.sqrt(disc)) / a
  return np.where(disc >= 0, t, np.inf)


def _ellipsoid_normal_and_local(rays, t, ellipsoid):
  origin, directions = _ellipsoid_local(rays, ellipsoid)
  local = origin + t[:, None] * directions  # on the unit sphere
  normal = (local / ellipsoid.radii) @ ellipsoid.axes.T
  return normal / np.linalg.norm(normal, axis=1, keepdims=True), local


def _is_hair(local):
  """Top cap and back of a head, from unit-sphere coordinates (left, up, forward)."""
  return (local[:, 1] > 0.5) | ((local[:, 2] < -0.25) & (local[:, 1] > -0.35))


def render_people(people, camera, height, width):
  """Ray casts all primitives of all people with a z-buffer.

  Returns a dict: depth (H, W) camera z (0 background), normal (H, W, 3) unit towards the camera,
  seg (H, W) uint8 28-class labels, instances (H, W) uint8 (0 background, k+1 = people[k]),
  primitives (H, W) int16 (-1 background, else index within its person), material (H, W) uint8.
  """
  rays = ray_directions(camera, height, width)
  depth = np.full((height, width), np.inf)
  normal = np.zeros((height, width, 3))
  seg = np.zeros((height, width), np.uint8)
  instances = np.zeros((height, width), np.uint8)
  primitive_ids = np.full((height, width), -1, np.int16)
  material = np.zeros((height, width), np.uint8)
  for person_index, person in enumerate(people):
    for primitive_index, primitive in enumerate(person.primitives):
      v0, v1, u0, u1 = _screen_rect(camera, primitive, height, width)
      if v0 >= v1 or u0 >= u1:
        continue
      window = rays[v0:v1, u0:u1].reshape(-1, 3)
      if isinstance(primitive, Capsule):
        t = _capsule_hit(window, primitive)
      else:
        t = _ellipsoid_hit(window, primitive)
      closer = t < depth[v0:v1, u0:u1].reshape(-1)
      if not closer.any():
        continue
      hit_rays, hit_t = window[closer], t[closer]
      labels = np.full(len(hit_t), primitive.label, np.uint8)
      materials = np.full(len(hit_t), primitive.material, np.uint8)
      if isinstance(primitive, Capsule):
        normals = _capsule_normal(hit_t[:, None] * hit_rays, primitive)
      else:
        normals, local = _ellipsoid_normal_and_local(hit_rays, hit_t, primitive)
        if primitive.hair_cap:
          hair = _is_hair(local)
          labels[hair], materials[hair] = HAIR, HAIR_MATERIAL
      closer = closer.reshape(v1 - v0, u1 - u0)
      depth[v0:v1, u0:u1][closer] = hit_t
      normal[v0:v1, u0:u1][closer] = normals
      seg[v0:v1, u0:u1][closer] = labels
      material[v0:v1, u0:u1][closer] = materials
      instances[v0:v1, u0:u1][closer] = person_index + 1
      primitive_ids[v0:v1, u0:u1][closer] = primitive_index
  depth[instances == 0] = 0.0
  return {"depth": depth, "normal": normal, "seg": seg, "instances": instances,
          "primitives": primitive_ids, "material": material, "rays": rays}


SUBPIXELS = 4  # sub-pixel rays per side measuring the alpha; `coverage` packs the 16 hits in a uint16
_SUB_OFFSETS = (np.arange(SUBPIXELS) + 0.5) / SUBPIXELS - 0.5
_SUB_U, _SUB_V = np.tile(_SUB_OFFSETS, SUBPIXELS), np.repeat(_SUB_OFFSETS, SUBPIXELS)


def silhouette_band(mask):
  """Pixels whose 3x3 neighbourhood holds both person and background: where the alpha is measured."""
  mask = mask.astype(np.uint8)
  kernel = np.ones((3, 3), np.uint8)
  return cv2.dilate(mask, kernel) > cv2.erode(mask, kernel)


def _ellipsoid_gap(x, y, q):
  """Squared scale of the ellipsoid whose surface the ray (x, y, 1) grazes: <= 1 is a hit.

  q: columns of `_gap_table` rows (the ray's squared length and its dot with the centre in the
  ellipsoid's unit-sphere frame are quadratic and linear in x, y).
  """
  length = (q[0] * x + q[3] * y + q[4]) * x + (q[1] * y + q[5]) * y + q[2]
  along = q[6] * x + q[7] * y + q[8]
  return q[9] - along * along / length


def _capsule_gap(x, y, q):
  """(Distance from the ray (x, y, 1) to the capsule's axis segment / radius)^2: <= 1 is a hit."""
  ray_sq = x * x + y * y + 1
  ray_start = q[0] * x + q[1] * y + q[2]
  ray_axis = q[3] * x + q[4] * y + q[5]
  denominator = q[8] * ray_sq - ray_axis * ray_axis  # 0 only for a ray along the axis
  with np.errstate(divide="ignore", invalid="ignore"):
    s = np.where(denominator > 0, (ray_start * ray_axis - q[7] * ray_sq) / denominator, 0.0)
  s = np.clip(s, 0.0, 1.0)  # the closest point of the segment is start + s * axis
  return (q[6] + s * (2 * q[7] + s * q[8]) - (ray_start + s * ray_axis)**2 / ray_sq) / q[9]


def _gap_table(primitives):
  """`_ellipsoid_gap` or `_capsule_gap` parameters (one row each) of primitives of one kind, their
  bounding spheres (x, y, z, radius), smallest radii and largest depths."""
  if isinstance(primitives[0], Ellipsoid):
    centre = np.array([e.centre for e in primitives])
    radii = np.array([e.radii for e in primitives], float)
    scaled = np.array([e.axes for e in primitives]) / radii[:, None, :]  # camera -> unit-sphere frame
    origin = -np.einsum("ei,eij->ej", centre, scaled)
    quadric = np.einsum("eij,ekj->eik", scaled, scaled)
    table = np.column_stack([quadric[:, 0, 0], quadric[:, 1, 1], quadric[:, 2, 2], 2 * quadric[:, 0, 1],
                             2 * quadric[:, 0, 2], 2 * quadric[:, 1, 2],
                             np.einsum("eij,ej->ei", scaled, origin), np.sum(origin**2, 1)])
    return table, np.column_stack([centre, radii.max(1)]), radii.min(1), centre[:, 2] + radii.max(1)
  start = np.array([c.start for c in primitives])
  end = np.array([c.end for c in primitives])
  radius = np.array([c.radius for c in primitives], float)
  axis = end - start
  table = np.column_stack([start, axis, np.sum(start**2, 1), np.sum(start * axis, 1), np.sum(axis**2, 1),
                           radius**2])
  sphere = np.column_stack([(start + end) / 2, np.linalg.norm(axis, axis=1) / 2 + radius])
  return table, sphere, radius, np.maximum(start[:, 2], end[:, 2]) + radius


def coverage(people, camera, rows, cols):
  """Fraction of the 4x4 sub-pixel rays of pixels (rows, cols) that hit any person.

  Sub-rays lie within `reach` (metres per metre of depth) of the pixel's centre ray, so where the
  centre ray is inside a primitive shrunk by reach x its far depth, all its sub-rays hit it; outside
  the primitive grown by as much, none do. Only the pixel-primitive pairs in between cast their
  16 rays, which keeps the matte cheap.
  """
  rows, cols = np.asarray(rows), np.asarray(cols)
  half_u, half_v = _SUB_OFFSETS[-1] / camera.fx, _SUB_OFFSETS[-1] / camera.fy
  reach = np.hypot(half_u, half_v)
  # Normalised image coordinates of every row and column: x = (u - cx) / fx, y = (v - cy) / fy.
  column_x = (np.arange(cols.max(initial=0) + 1) - camera.cx) / camera.fx
  row_y = (np.arange(rows.max(initial=0) + 1) - camera.cy) / camera.fy
  x, y = column_x[cols], row_y[rows]
  covered = np.zeros(len(x), np.uint16)  # bit k: sub-ray k hits
  for kind, gap in ((Ellipsoid, _ellipsoid_gap), (Capsule, _capsule_gap)):
    primitives = [p for person in people for p in person.primitives if isinstance(p, kind)]
    if not primitives:
      continue
    table, sphere, smallest, deepest = _gap_table(primitives)
    # Pixels whose sub-rays can meet a bounding sphere: x/z and y/z peak at its box's corners.
    near, far = sphere[:, 2:3] - sphere[:, 3:], sphere[:, 2:3] + sphere[:, 3:]
    low, high = sphere[:, :2] - sphere[:, 3:], sphere[:, :2] + sphere[:, 3:]
    with np.errstate(divide="ignore", invalid="ignore"):
      low = np.where(near > 1e-3, np.minimum(low / near, low / far), -np.inf)
      high = np.where(near > 1e-3, np.maximum(high / near, high / far), np.inf)
    column_ok = (column_x[:, None] + half_u >= low[:, 0]) & (column_x[:, None] - half_u <= high[:, 0])
    row_ok = (row_y[:, None] + half_v >= low[:, 1]) & (row_y[:, None] - half_v <= high[:, 1])
    pixel, primitive = np.nonzero(column_ok[cols] & row_ok[rows])  # sorted by pixel
    q = table[primitive].T
    centre_gap = gap(x[pixel], y[pixel], q)
    margin = (deepest * reach / smallest)[primitive]  # in units of the primitive's size
    inside = centre_gap < np.maximum(1 - margin, 0)**2
    covered[pixel[inside]] = 0xFFFF
    between = ~inside & (centre_gap <= (1 + margin)**2)
    if between.any():
      pixel = pixel[between]
      hits = gap(x[pixel, None] + _SUB_U / camera.fx, y[pixel, None] + _SUB_V / camera.fy,
                 q[:, between, None]) <= 1
      bits = np.packbits(hits, axis=1, bitorder="little").view(np.uint16)[:, 0]
      starts = np.flatnonzero(np.diff(pixel, prepend=-1))  # one run of pairs per pixel
      covered[pixel[starts]] |= np.bitwise_or.reduceat(bits, starts)
  return np.unpackbits(covered.view(np.uint8)).reshape(-1, SUBPIXELS**2).mean(1)


def sample_background(rng, height, width, shapes=True):
  """Gradient + low-frequency colour noise (+ a few random shapes), uint8 (H, W, 3)."""
  angle = rng.uniform(0, 2 * np.pi)
  ramp = (np.cos(angle) * np.arange(width)[None, :] / width
          + np.sin(angle) * np.arange(height)[:, None] / height)
  ramp = (ramp - ramp.min()) / max(np.ptp(ramp), 1e-6)
  start, end = _random_colour(rng, 0, 255), _random_colour(rng, 0, 255)
  image = start + ramp[..., None] * (end - start)
  noise = rng.normal(0, rng.uniform(5, 40), (rng.integers(3, 9), rng.integers(3, 9), 3))
  image += cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)
  image = np.ascontiguousarray(np.clip(image, 0, 255).astype(np.uint8))
  scale = max(height, width)
  for _ in range(rng.integers(2, 9) if shapes else 0):
    colour = tuple(int(c) for c in _random_colour(rng, 0, 255))
    x, y = int(rng.integers(width)), int(rng.integers(height))
    size = int(rng.integers(scale // 16 + 1, scale // 3 + 2))
    kind = rng.integers(3)
    if kind == 0:
      cv2.rectangle(image, (x, y), (x + size, y + int(rng.integers(1, 2 * size))), colour, -1)
    elif kind == 1:
      cv2.circle(image, (x, y), size // 2, colour, -1)
    else:
      cv2.line(image, (x, y), (int(rng.integers(width)), int(rng.integers(height))), colour,
               int(rng.integers(1, scale // 32 + 2)))
  return image


def _shade_layers(render, people, light, rng):
  """Textured albedo (0-255) and its Lambert-lit colour at the person pixels, and the sensor noise.

  Kept apart so the albedo and matting labels reuse exactly what `shade` puts in the image.
  """
  foreground = render["instances"] > 0
  albedo = lit = np.zeros((0, 3))
  if foreground.any():
    person_index = render["instances"][foreground].astype(int) - 1
    key = person_index * _NUM_MATERIALS + render["material"][foreground]
    table = lambda name: np.concatenate([person.appearance[name] for person in people])
    points = render["depth"][foreground][:, None] * render["rays"][foreground]
    axes, frequency, pattern = table("texture_axes")[key], table("frequency")[key], table("pattern")[key]
    phase = np.einsum("ij,ij->i", points, axes[:, 0]) * frequency
    phase2 = np.einsum("ij,ij->i", points, axes[:, 1]) * frequency
    weight = np.select(
        [pattern == 1, pattern == 2, pattern == 3],
        [np.sin(phase) > 0, np.sin(phase) * np.sin(phase2) > 0,
         0.5 + 0.5 * np.sin(phase) * np.cos(0.6 * phase2)], 0.0)
    colour = table("colour")[key]
    albedo = colour + weight[:, None] * (table("second_colour")[key] - colour)
    lambert = np.maximum(render["normal"][foreground] @ light["direction"], 0.0)
    lit = albedo * (light["ambient"] + light["diffuse"] * lambert)[:, None] * light["colour"]
  noise = 2.0 * rng.standard_normal(render["instances"].shape + (3,), dtype=np.float32)  # sensor noise
  return albedo, lit, noise


def shading(normal, light):
  """RGB factor (..., 3) by which `shade` multiplies the albedo: (ambient + diffuse max(n.l, 0)) colour."""
  lambert = np.maximum(np.asarray(normal) @ light["direction"], 0.0)
  return (light["ambient"] + light["diffuse"] * lambert)[..., None] * light["colour"]


def _to_uint8(image):
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def shade(render, people, light, background, rng):
  """Lambert shading of textured albedo over `background`; light = dict(direction, ambient, ...)."""
  _, lit, noise = _shade_layers(render, people, light, rng)
  image = background.astype(np.float32)
  image[render["instances"] > 0] = lit
  return _to_uint8(image + noise)


def sample_light(rng):
  """A light from roughly the camera's side and above, for `shade`."""
  direction = [rng.uniform(-1, 1), rng.uniform(-1.2, 0.3), -rng.uniform(0.3, 1.2)]
  return {"direction": _unit(np.array(direction)),
          "ambient": rng.uniform(0.25, 0.5), "diffuse": rng.uniform(0.5, 0.9),
          "colour": rng.uniform(0.85, 1.1, 3)}


def annotate(people, render, camera):
  """COCO keypoints (17, 3) and tight [x, y, w, h] box per person with enough visible pixels.

  Visibility: 0 outside the image (x = y = 0), 2 if the pixel under the keypoint shows this
  person no more than the keypoint's allowed depth in front of it (and, for face points, the
  surface faces the camera), else 1.
  Returns (keypoints list, boxes list, areas list, indices of the annotated people).
  """
  height, width = render["depth"].shape
  results = ([], [], [], [])
  for index, person in enumerate(people):
    rows, cols = np.nonzero(render["instances"] == index + 1)
    if len(rows) < MIN_VISIBLE_PIXELS:
      continue
    xy = project(camera, person.keypoints)
    inside = ((xy[:, 0] >= -0.5) & (xy[:, 0] < width - 0.5) & (xy[:, 1] >= -0.5)
              & (xy[:, 1] < height - 0.5) & (person.keypoints[:, 2] > 0))
    u = np.clip(np.floor(xy[:, 0] + 0.5), 0, width - 1).astype(int)
    v = np.clip(np.floor(xy[:, 1] + 0.5), 0, height - 1).astype(int)
    facing = np.einsum("ij,ij->i", person.keypoint_normals, person.keypoints) < 0.1 * np.linalg.norm(
        person.keypoints, axis=1)
    visible = (inside & (render["instances"][v, u] == index + 1) & facing
               & (render["depth"][v, u] >= person.keypoints[:, 2] - person.keypoint_depth))
    keypoints = np.zeros((17, 3))
    keypoints[inside, :2] = xy[inside]
    keypoints[:, 2] = np.where(visible, 2, np.where(inside, 1, 0))
    x0, y0 = cols.min(), rows.min()
    box = [float(x0), float(y0), float(cols.max() - x0 + 1), float(rows.max() - y0 + 1)]
    for store, value in zip(results, (keypoints, box, int(len(rows)), index)):
      store.append(value)
  return results


def _place_people(rng, camera, width, shapes):
  """Pelvis positions at DEPTH_RANGE depth, mostly in view, on a ground plane, not interpenetrating."""
  camera_height = rng.uniform(0.9, 1.7)
  positions = []
  for shape in shapes:
    leg = shape["upper_leg"] + shape["lower_leg"] + shape["foot_radii"][2] * 2 + 0.05
    for _ in range(20):
      z = rng.uniform(*DEPTH_RANGE)
      x = rng.uniform(-0.8, 0.8) * z * (width / 2) / camera.fx
      position = np.array([x, camera_height - leg + rng.uniform(-0.1, 0.1), z])
      if all(np.hypot(*(position - other)[[0, 2]]) > 0.7 for other in positions):
        break
    positions.append(position)
  return positions


def _sample_yaw(rng):
  """Mostly towards the camera, but also sideways and from the back."""
  return rng.uniform(-np.pi / 4, np.pi / 4) if rng.random() < 0.6 else rng.uniform(-np.pi, np.pi)


def _check_size(height, width):
  if int(height) != height or int(width) != width or height < 16 or width < 16:
    raise SyntheticDataError(f"height and width must be integers >= 16, got {height}x{width}")


def _extent(person):
  """(min, max) corners of the box around the person's primitives (camera coordinates)."""
  points = []
  for primitive in person.primitives:
    if isinstance(primitive, Capsule):
      for end in (primitive.start, primitive.end):
        points += [end - primitive.radius, end + primitive.radius]
    else:
      radius = float(np.max(primitive.radii))
      points += [primitive.centre - radius, primitive.centre + radius]
  return np.min(points, axis=0), np.max(points, axis=0)


def _portrait_position(rng, camera, height, width, person):
  """Pelvis position that centres `person` (built with its pelvis at the origin) and makes it
  fill 80-100% of the frame along its tighter side, the way person-centred crops frame people."""
  low, high = _extent(person)
  size = high - low
  fill = rng.uniform(0.8, 1.0)
  z = max(size[0] * camera.fx / width, size[1] * camera.fy / height) / fill + size[2] / 2
  offset = rng.uniform(-0.05, 0.05, 2) * np.array([width, height])  # pixels off-centre
  centre = (low + high) / 2
  target = np.array([width - 1, height - 1]) / 2 + offset - np.array([camera.cx, camera.cy])
  xy = target * z / np.array([camera.fx, camera.fy]) - centre[:2]
  return np.array([xy[0], xy[1], z - centre[2]])


FRAMINGS = ("scene", "portrait", "studio")


def _check_framing(framing):
  if framing not in FRAMINGS:
    raise SyntheticDataError(f"framing must be one of {FRAMINGS}, got {framing!r}")


def render_sample(seed, index, height, width, framing="scene", sapiens2=True):
  """Sample `index` of the dataset with `seed`: image, labels and COCO annotations.

  framing "scene" stands 1-3 people on a ground plane 2.5-6 m away; "portrait" centres one person
  who fills most of the frame, like the person crops the reference's task datasets hold; "studio"
  is a portrait facing the camera (yaw within 45 degrees) before a background without shapes:
  left/right is plain to see and nothing limb-like distracts, so small models learn it fast.

  Returns a dict: image uint8 (H, W, 3) RGB, mask bool, seg uint8, depth float32 (0 background),
  normal float32 (H, W, 3), instances uint8 (0 background, k = k-th person), keypoints list of
  (17, 3) float arrays, boxes list of [x, y, w, h], areas list, instance_ids (the instances value
  of each annotated person) and camera. With `sapiens2` also the Sapiens2 labels (module
  docstring): albedo float32 (H, W, 3) in [0, 1] (0 background), light (the `shade` light),
  alpha float32 (H, W) in multiples of 1/255, foreground, background and matte uint8 (H, W, 3).
  They draw no random numbers, so the other outputs are the same either way.
  """
  _check_size(height, width)
  if int(seed) != seed or int(index) != index or seed < 0 or index < 0:
    raise SyntheticDataError(f"seed and index must be integers >= 0, got {seed!r}, {index!r}")
  _check_framing(framing)
  rng = np.random.default_rng([int(seed), int(index)])
  focal = height * rng.uniform(0.9, 1.3)
  centre = np.array([width - 1, height - 1]) / 2 + rng.uniform(-2, 2, 2)
  camera = Camera(focal, focal, centre[0], centre[1])
  if framing in ("portrait", "studio"):
    shape, pose = sample_shape(rng), sample_pose(rng)
    yaw = _sample_yaw(rng) if framing == "portrait" else rng.uniform(-np.pi / 4, np.pi / 4)
    rotation = body_rotation(yaw, rng.uniform(-0.12, 0.12), rng.uniform(-0.1, 0.1))
    appearance = sample_appearance(rng)
    at_origin = build_person(shape, pose, rotation, np.zeros(3), appearance)
    position = _portrait_position(rng, camera, height, width, at_origin)
    people = [build_person(shape, pose, rotation, position, appearance)]
    background = sample_background(rng, height, width, shapes=framing == "portrait")
    return compose_sample(people, camera, background, sample_light(rng), rng, sapiens2)
  num_people = int(rng.integers(1, 4))
  shapes = [sample_shape(rng) for _ in range(num_people)]
  tilt = rng.uniform(-0.12, 0.12)
  people = []
  for shape, position in zip(shapes, _place_people(rng, camera, width, shapes)):
    rotation = body_rotation(_sample_yaw(rng), tilt, rng.uniform(-0.1, 0.1))
    people.append(build_person(shape, sample_pose(rng), rotation, position, sample_appearance(rng)))
  background = sample_background(rng, height, width)
  return compose_sample(people, camera, background, sample_light(rng), rng, sapiens2)


def compose_sample(people, camera, background, light, rng, sapiens2=True):
  """Renders `people` over `background` into the dict `render_sample` returns."""
  height, width = background.shape[:2]
  render = render_people(people, camera, height, width)
  mask = render["instances"] > 0
  albedo, lit, noise = _shade_layers(render, people, light, rng)
  colour = background.astype(np.float32)
  colour[mask] = lit
  image = _to_uint8(colour + noise)
  keypoints, boxes, areas, annotated = annotate(people, render, camera)
  sample = {"image": image, "mask": mask, "seg": render["seg"],
            "depth": render["depth"].astype(np.float32), "normal": render["normal"].astype(np.float32),
            "instances": render["instances"], "keypoints": keypoints, "boxes": boxes, "areas": areas,
            "instance_ids": [k + 1 for k in annotated], "camera": camera}
  if sapiens2:
    albedo_map = np.zeros((height, width, 3), np.float32)
    albedo_map.reshape(-1, 3)[np.flatnonzero(mask)] = albedo / 255  # row-major, like mask indexing
    sample.update(albedo=albedo_map, light=light,
                  **_matting_labels(people, camera, image, colour, background, noise, mask))
  return sample


def _matting_labels(people, camera, image, colour, background, noise, mask):
  """alpha, foreground, background plate and their composite `matte` (see the module docstring).

  `colour` is `image` before noise and rounding. Foreground and plate carry the image's own sensor
  noise, so outside the silhouette band alpha is the mask and the matte is the image itself.
  Works on flat pixel indices: boolean indexing of (H, W, 3) arrays costs more than the rest.
  """
  flat = lambda array: array.reshape(-1, 3)
  band = np.flatnonzero(silhouette_band(mask))
  rows, cols = np.divmod(band, mask.shape[1])
  alpha = mask.astype(np.uint8) * np.uint8(255)
  band_alpha = np.round(coverage(people, camera, rows, cols) * 255).astype(np.uint8)
  alpha.reshape(-1)[band] = band_alpha
  plate = _to_uint8(background.astype(np.float32) + noise)  # the image where no person is
  foreground = np.zeros_like(image)
  person = np.flatnonzero(mask)
  flat(foreground)[person] = flat(image)[person]
  flat(foreground)[band[band_alpha == 0]] = 0
  # A partly covered pixel whose centre ray misses takes the mean colour of its person neighbours.
  extend = band[(band_alpha > 0) & ~mask.reshape(-1)[band]]
  if len(extend):
    on_person = mask.astype(np.float32)
    total = cv2.boxFilter(colour * on_person[..., None], -1, (3, 3), normalize=False,
                          borderType=cv2.BORDER_CONSTANT)
    count = cv2.boxFilter(on_person, -1, (3, 3), normalize=False, borderType=cv2.BORDER_CONSTANT)
    flat(foreground)[extend] = _to_uint8(flat(total)[extend] / count.reshape(-1)[extend, None] + flat(noise)[extend])
  matte = image.copy()
  weight = band_alpha[:, None].astype(np.uint32)
  flat(matte)[band] = (weight * flat(foreground)[band] + (255 - weight) * flat(plate)[band] + 127) // 255
  return {"alpha": alpha / np.float32(255), "foreground": foreground, "background": plate, "matte": matte}


def pointmap(depth, camera):
  """(H, W, 3) float32 camera-frame XYZ in metres, depth * K^-1 [u, v, 1], 0 where depth is 0.

  The data pipeline derives it instead of reading a file; `camera` is a `Camera` or an entry of
  cameras.json (fx, fy, cx, cy); u = column and v = row, pixel centres at integers.
  """
  if isinstance(camera, dict):
    camera = Camera(*(float(camera[k]) for k in Camera._fields))
  depth = np.asarray(depth, np.float64)
  return (depth[..., None] * ray_directions(camera, *depth.shape)).astype(np.float32)


_SUBDIRS = ("images", "masks", "segs", "depths", "normals")
# Labels of the Sapiens2 tasks (albedo, matting), all lossless PNG so the matte relation holds exactly.
SAPIENS2_SUBDIRS = ("albedos", "alphas", "mattes", "backgrounds", "foregrounds")
CAMERAS = "cameras.json"


def _write_sample(args):
  """Renders sample `index` into `output`; returns its COCO annotations (without ids) and camera."""
  output, seed, index, height, width, framing, sapiens2 = args
  sample = render_sample(seed, index, height, width, framing, sapiens2)
  name = f"{index:06d}"
  cv2.imwrite(os.path.join(output, "images", name + ".jpg"), sample["image"][..., ::-1],
              [cv2.IMWRITE_JPEG_QUALITY, 95])
  cv2.imwrite(os.path.join(output, "masks", name + ".png"), sample["mask"].astype(np.uint8) * 255)
  cv2.imwrite(os.path.join(output, "segs", name + ".png"), sample["seg"])
  np.save(os.path.join(output, "depths", name + ".npy"), sample["depth"])
  np.save(os.path.join(output, "normals", name + ".npy"), sample["normal"])
  if sapiens2:
    albedo = np.round(sample["albedo"] * 255).astype(np.uint8)
    alpha = np.round(sample["alpha"] * 255).astype(np.uint8)
    for folder, image in (("albedos", albedo[..., ::-1]), ("alphas", alpha),
                          ("mattes", sample["matte"][..., ::-1]), ("backgrounds", sample["background"][..., ::-1]),
                          ("foregrounds", sample["foreground"][..., ::-1])):
      cv2.imwrite(os.path.join(output, folder, name + ".png"), image)
  annotations = []
  for keypoints, box, area in zip(sample["keypoints"], sample["boxes"], sample["areas"]):
    flat = [round(float(x), 2) if k % 3 < 2 else int(x) for k, x in enumerate(keypoints.reshape(-1))]
    annotations.append({"image_id": index, "category_id": 1, "bbox": box, "area": area, "iscrowd": 0,
                        "num_keypoints": int(np.sum(keypoints[:, 2] > 0)), "keypoints": flat})
  return annotations, {k: float(v) for k, v in sample["camera"]._asdict().items()}


def write_dataset(output, num, height, width, seed=0, workers=1, framing="scene", sapiens2=False):
  """Writes samples 0..num-1 in the layout of the module docstring; returns the COCO dict.

  workers > 1 renders in spawned processes, so a calling script needs the usual
  `if __name__ == "__main__":` guard; the files are the same for any number of workers.
  `sapiens2` adds the SAPIENS2_SUBDIRS folders; it is off by default because their five PNGs
  and the matte's sub-pixel rays make writing ~40% slower, and only the Sapiens2 tasks read them.
  """
  _check_size(height, width)
  if int(num) != num or num < 1:
    raise SyntheticDataError(f"num must be a positive integer, got {num!r}")
  if int(workers) != workers or workers < 1:
    raise SyntheticDataError(f"workers must be a positive integer, got {workers!r}")
  folders = _SUBDIRS + (SAPIENS2_SUBDIRS if sapiens2 else ())
  for subdir in folders:
    os.makedirs(os.path.join(output, subdir), exist_ok=True)
  _check_framing(framing)
  jobs = [(output, seed, i, height, width, framing, bool(sapiens2)) for i in range(num)]
  if workers == 1:
    per_image = [_write_sample(job) for job in jobs]
  else:
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
      per_image = pool.map(_write_sample, jobs, chunksize=max(1, min(16, num // (4 * workers))))
  annotations = [annotation for image, _ in per_image for annotation in image]
  for annotation_id, annotation in enumerate(annotations, start=1):  # COCOeval needs ids > 0
    annotation["id"] = annotation_id
  coco = {
      "images": [{"id": i, "file_name": f"images/{i:06d}.jpg", "width": width, "height": height}
                 for i in range(num)],
      "annotations": annotations,
      "categories": [{"id": 1, "name": "person", "keypoints": list(KEYPOINT_NAMES),
                      "skeleton": [list(link) for link in COCO_SKELETON]}],
  }
  with open(os.path.join(output, "person_keypoints.json"), "w") as f:
    json.dump(coco, f)
  with open(os.path.join(output, CAMERAS), "w") as f:
    json.dump({f"{i:06d}": camera for i, (_, camera) in enumerate(per_image)}, f)
  manifest = {"generator": "sapiens_jax.data.synthetic_humans", "seed": seed, "num": num,
              "height": height, "width": width, "framing": framing,
              "seg_classes_used": list(SEG_CLASSES_USED), "folders": list(folders),
              "cameras": CAMERAS}
  with open(os.path.join(output, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=1)
  return coco


def cli():
  """Flags are defined here, not at import, so importing this module never clashes with main.py's."""
  output = flags.DEFINE_string("output", None, "Dataset folder to write.")
  num = flags.DEFINE_integer("num", 1000, "Number of images.")
  height = flags.DEFINE_integer("height", 256, "Image height in pixels.")
  width = flags.DEFINE_integer("width", 192, "Image width in pixels.")
  seed = flags.DEFINE_integer("seed", 0, "Dataset seed; image i depends only on (seed, i).")
  workers = flags.DEFINE_integer("workers", 1, "Processes rendering in parallel.")
  framing = flags.DEFINE_enum("framing", "scene", FRAMINGS,
                              "scene: 1-3 people in a room; portrait: one person filling the frame;"
                              " studio: a portrait facing the camera, plain background.")
  sapiens2 = flags.DEFINE_boolean("sapiens2", False, "Also write the albedo and matting labels.")
  flags.mark_flags_as_required(["output"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    coco = write_dataset(output.value, num.value, height.value, width.value, seed.value, workers.value,
                         framing.value, sapiens2.value)
    print(f"Wrote {num.value} images with {len(coco['annotations'])} people to {output.value}",
          flush=True)

  app.run(main)


if __name__ == "__main__":
  cli()

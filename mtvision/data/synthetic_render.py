"""Procedural indoor scenes, ray-cast analytically: the exact labels behind ``SyntheticScenes``.

Each sample is a closed box-shaped room (floor, four walls, ceiling) seen by a pinhole camera standing
inside it, with 1..``max_objects`` boxes (yaw-rotated), spheres and capped vertical cylinders standing
on the floor. Every pixel's ray is intersected with every primitive in closed form (vectorised numpy)
and the nearest hit gives the labels, so segmentation, depth, normals and boxes are exact up to float
rounding. Colours are Lambertian shading of random procedural textures (plain, checker, stripes, value
noise) under a point light with hard shadows, plus Gaussian noise, so a class cannot be read off a
pixel's colour: it must be inferred from geometry and context.

Conventions (see also ``SyntheticScenes``):

- World frame: x, y horizontal, z up; the room is ``[0, Lx] x [0, Ly] x [0, Hc]``, floor at z = 0.
- Camera frame: x right, y down, z forward (OpenCV / NYUv2). ``R_wc`` maps camera to world
  (``X_w = C + R_wc @ X_c``).
- Pixel ``(row i, col j)`` covers ``[j, j+1) x [i, i+1)`` in image coordinates; its ray goes through the
  centre ``(u, v) = (j + 0.5, i + 0.5)``, with ``cx = W / 2``, ``cy = H / 2``. Back-projection of a
  pixel with depth ``z`` is ``((u - cx) / fx * z, (v - cy) / fy * z, z)`` (see ``backproject``).
- ``depth`` is the camera-frame z coordinate (z-depth, as NYUv2's depth maps), not the ray length.
- ``boxes`` are ``[x1, y1, x2, y2]`` in those image coordinates: the pixel edges enclosing every visible
  pixel of the object (``x2 = last column + 1``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Class names; the index is the class id used in ``seg`` and ``labels``.
SYNTHETIC_CLASSES = ("floor", "wall", "ceiling", "box", "sphere", "cylinder")
FLOOR, WALL, CEILING, BOX, SPHERE, CYLINDER = range(6)

# Horizontal field of view of NYUv2's Kinect (fx = 518.8 at 640 px wide).
_HFOV = 2.0 * math.atan(320.0 / 518.8)
_EPS = 1e-9
# Room surfaces are ids 0..5 in the per-pixel surface map; object k is id 6 + k.
_ROOM_SURFACES = (
    # name, class id, inward normal (world), axis, bound (0 = low, 1 = high)
    ("floor", FLOOR, (0.0, 0.0, 1.0), 2, 0),
    ("ceiling", CEILING, (0.0, 0.0, -1.0), 2, 1),
    ("wall_x0", WALL, (1.0, 0.0, 0.0), 0, 0),
    ("wall_x1", WALL, (-1.0, 0.0, 0.0), 0, 1),
    ("wall_y0", WALL, (0.0, 1.0, 0.0), 1, 0),
    ("wall_y1", WALL, (0.0, -1.0, 0.0), 1, 1),
)
_NUM_ROOM = len(_ROOM_SURFACES)
_KIND_CLASS = {"box": BOX, "sphere": SPHERE, "cylinder": CYLINDER}


def intrinsics_for_size(size: Sequence[int]) -> dict[str, float]:
    """Pinhole intrinsics (pixels) used for an image of ``size = (H, W)``: square pixels, NYUv2's
    horizontal field of view (~63.4 deg), principal point at the image centre."""
    h, w = int(size[0]), int(size[1])
    f = (w / 2.0) / math.tan(_HFOV / 2.0)
    return {"fx": f, "fy": f, "cx": w / 2.0, "cy": h / 2.0}


def backproject(depth: np.ndarray, fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """Camera-frame 3D points ``[H, W, 3]`` (metres) of a z-depth map ``[H, W]`` (pixel centres)."""
    h, w = depth.shape
    u = np.arange(w, dtype=np.float64) + 0.5
    v = np.arange(h, dtype=np.float64) + 0.5
    z = depth.astype(np.float64)
    x = (u[None, :] - cx) / fx * z
    y = (v[:, None] - cy) / fy * z
    return np.stack([x, y, z], axis=-1)


def _rot_z(yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def camera_rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """World-from-camera rotation ``R_wc [3, 3]`` (columns: camera x right, y down, z forward in the
    z-up world) for a camera looking along heading ``yaw``, tilted up by ``pitch``, rolled by ``roll``
    (radians)."""
    cp, sp = math.cos(pitch), math.sin(pitch)
    fwd = np.array([cp * math.cos(yaw), cp * math.sin(yaw), sp])
    right0 = np.array([math.sin(yaw), -math.cos(yaw), 0.0])
    down0 = np.cross(fwd, right0)
    cr, sr = math.cos(roll), math.sin(roll)
    right = cr * right0 + sr * down0
    down = -sr * right0 + cr * down0
    return np.stack([right, down, fwd], axis=1)


# ----------------------------------------------------------------------------------------------
# Ray / primitive intersection, on structure-of-arrays data: points and directions are ``[3, N]`` (or a
# single origin ``[3, 1]``). Rays are ``o + t d`` with ``d`` not normalised; every function returns the
# smallest ``t > eps`` at which the ray enters the solid (inf where it misses). The origin must lie
# outside the solid, which holds for the camera and, for shadow rays, for every lit point.


def _to_local(p: np.ndarray, obj: dict) -> np.ndarray:
    """World points ``[3, N]`` -> object frame (origin at the centre, rotated by -yaw about z)."""
    return obj["_rz"].T @ (p - obj["_c"])


def _intersect_box(o, d, obj, eps):
    half = obj["_half"]
    o_l = _to_local(o, obj)
    d_l = obj["_rz"].T @ d
    d_l[np.abs(d_l) < 1e-15] = 1e-15
    inv = 1.0 / d_l
    t1 = (-half - o_l) * inv
    t2 = (half - o_l) * inv
    tmin = np.minimum(t1, t2)
    tmax = np.maximum(t1, t2)
    tn = np.maximum(np.maximum(tmin[0], tmin[1]), tmin[2])
    tf = np.minimum(np.minimum(tmax[0], tmax[1]), tmax[2])
    return np.where((tn <= tf) & (tn > eps), tn, np.inf)


def _intersect_sphere(o, d, obj, eps):
    oc = o - obj["_c"]
    a = d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
    b = oc[0] * d[0] + oc[1] * d[1] + oc[2] * d[2]
    c = oc[0] * oc[0] + oc[1] * oc[1] + oc[2] * oc[2] - obj["radius"] ** 2
    disc = b * b - a * c
    t = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
    return np.where((disc >= 0) & (t > eps), t, np.inf)


def _intersect_cylinder(o, d, obj, eps):
    r, hh = obj["radius"], obj["height"] / 2.0
    oc = o - obj["_c"]
    ox, oy, oz = oc[0], oc[1], oc[2]
    dx, dy, dz = d[0], d[1], d[2]
    a = dx * dx + dy * dy
    b = ox * dx + oy * dy
    c = ox * ox + oy * oy - r * r
    disc = b * b - a * c
    with np.errstate(divide="ignore", invalid="ignore"):
        ts = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
        zs = oz + ts * dz
        side = (disc >= 0) & (a > 1e-30) & (ts > eps) & (np.abs(zs) <= hh)
        # Top cap only: the bottom cap lies on the floor and can't be seen from inside the room.
        tc = (hh - oz) / dz
        xc, yc = ox + tc * dx, oy + tc * dy
        cap = (tc > eps) & (xc * xc + yc * yc <= r * r)
    t = np.where(side, ts, np.inf)
    return np.where(cap & (tc < t), tc, t)


_INTERSECT = {"box": _intersect_box, "sphere": _intersect_sphere, "cylinder": _intersect_cylinder}


def _object_normals(p: np.ndarray, p_l: np.ndarray, obj: dict) -> np.ndarray:
    """Outward unit normals ``[3, N]`` (world) at surface points ``p`` (world) / ``p_l`` (local)."""
    kind = obj["kind"]
    if kind == "sphere":
        return (p - obj["_c"]) / obj["radius"]
    n_l = np.zeros_like(p_l)
    if kind == "box":
        # The hit face is the axis along which the point is closest to the box's boundary.
        axis = np.argmax(np.abs(p_l) / obj["_half"], axis=0)
        cols = np.arange(p_l.shape[1])
        n_l[axis, cols] = np.sign(p_l[axis, cols])
    else:
        r, hh = obj["radius"], obj["height"] / 2.0
        rho = np.hypot(p_l[0], p_l[1])
        side = (hh - p_l[2]) >= (r - rho)
        safe = np.maximum(rho, 1e-12)
        n_l[0] = np.where(side, p_l[0] / safe, 0.0)
        n_l[1] = np.where(side, p_l[1] / safe, 0.0)
        n_l[2] = ~side
    return obj["_rz"] @ n_l


# ----------------------------------------------------------------------------------------------
# Procedural textures on 3D surface coordinates (solid textures evaluated on the surface).


def _value_noise(q: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Trilinear value noise in [0, 1] at ``q [3, N]`` from a periodic lattice ``table [n, n, n]``."""
    n = table.shape[0]
    flat = table.reshape(-1)
    i = np.floor(q)
    f = q - i
    f = f * f * (3.0 - 2.0 * f)
    i = i.astype(np.int64) % n
    x0, y0, z0 = i[0] * (n * n), i[1] * n, i[2]
    x1, y1, z1 = (x0 + n * n) % (n ** 3), (y0 + n) % (n * n), (z0 + 1) % n
    fx, fy, fz = f[0], f[1], f[2]
    c00 = flat[x0 + y0 + z0] * (1 - fx) + flat[x1 + y0 + z0] * fx
    c10 = flat[x0 + y1 + z0] * (1 - fx) + flat[x1 + y1 + z0] * fx
    c01 = flat[x0 + y0 + z1] * (1 - fx) + flat[x1 + y0 + z1] * fx
    c11 = flat[x0 + y1 + z1] * (1 - fx) + flat[x1 + y1 + z1] * fx
    c0 = c00 * (1 - fy) + c10 * fy
    c1 = c01 * (1 - fy) + c11 * fy
    return c0 * (1 - fz) + c1 * fz


def _texture(p: np.ndarray, app: dict) -> np.ndarray:
    """Albedo ``[3, N]`` in [0, 1] of a surface with appearance ``app`` at surface coordinates ``p``."""
    kind = app["pattern"]
    c0, c1 = app["colors"][0][:, None], app["colors"][1][:, None]
    if kind == "plain":
        return np.broadcast_to(c0, p.shape)
    q = (p * (1.0 / app["scale"]) + app["offset"][:, None]).astype(np.float32)
    if kind == "checker":
        w = (np.floor(q[0]) + np.floor(q[1]) + np.floor(q[2])) % 2.0
    elif kind == "stripes":
        w = np.floor(app["direction"].astype(np.float32) @ q) % 2.0
    else:
        w = 0.65 * _value_noise(q, app["noise"]) + 0.35 * _value_noise(2.0 * q + 17.0, app["noise"])
    return c0 + w * (c1 - c0)


def _random_appearance(rng: np.random.Generator) -> dict:
    pattern = ("plain", "checker", "stripes", "noise")[int(rng.integers(4))]
    direction = rng.normal(size=3)
    return {
        "pattern": pattern,
        "colors": rng.uniform(0.05, 0.95, size=(2, 3)).astype(np.float32),
        "scale": float(rng.uniform(0.08, 0.5)),
        "offset": rng.uniform(0.0, 8.0, size=3),
        "direction": direction / np.linalg.norm(direction),
        "noise": rng.random((8, 8, 8), dtype=np.float32),
    }


# ----------------------------------------------------------------------------------------------


def make_scene(rng: np.random.Generator, max_objects: int, intr: dict, size) -> dict:
    lx, ly, hc = rng.uniform(3.0, 8.0), rng.uniform(3.0, 8.0), rng.uniform(2.4, 3.4)
    margin = 0.4
    cam = np.array([rng.uniform(margin, lx - margin), rng.uniform(margin, ly - margin),
                    rng.uniform(0.9, 1.8)])
    yaw = math.atan2(ly / 2 - cam[1], lx / 2 - cam[0]) + rng.uniform(-0.6, 0.6)
    pitch = rng.uniform(-0.35, 0.05)
    roll = rng.uniform(-0.08, 0.08)
    r_wc = camera_rotation(yaw, pitch, roll)

    objects: list[dict] = []
    n_obj = int(rng.integers(1, max_objects + 1))
    half_fov = 0.45 * _HFOV
    for _ in range(n_obj):
        kind = ("box", "sphere", "cylinder")[int(rng.integers(3))]
        if kind == "box":
            half = np.array([rng.uniform(0.15, 0.6), rng.uniform(0.15, 0.6), rng.uniform(0.1, 0.6)])
            footprint = float(np.hypot(half[0], half[1]))
        elif kind == "sphere":
            radius = rng.uniform(0.15, 0.5)
            footprint = radius
        else:
            radius, height = rng.uniform(0.1, 0.4), rng.uniform(0.2, 1.5)
            footprint = radius
        obj_yaw = rng.uniform(-math.pi, math.pi)
        for _attempt in range(30):
            if rng.random() < 0.2:  # anywhere in the room (may be off-screen: shadows, occluders)
                xy = np.array([rng.uniform(0, lx), rng.uniform(0, ly)])
            else:  # in front of the camera
                ang = yaw + rng.uniform(-half_fov, half_fov)
                dist = rng.uniform(0.8, 5.0)
                xy = cam[:2] + dist * np.array([math.cos(ang), math.sin(ang)])
            x, y = float(xy[0]), float(xy[1])
            fits = (footprint + 0.05 <= x <= lx - footprint - 0.05
                    and footprint + 0.05 <= y <= ly - footprint - 0.05
                    and math.hypot(x - cam[0], y - cam[1]) > footprint + 0.3
                    and all(math.hypot(x - o["center"][0], y - o["center"][1])
                            > footprint + o["_footprint"] + 0.05 for o in objects))
            if fits:
                break
        else:
            continue
        obj: dict[str, Any] = {"kind": kind, "class_id": _KIND_CLASS[kind], "yaw": float(obj_yaw)}
        if kind == "box":
            obj["half_extents"] = half
            obj["center"] = np.array([xy[0], xy[1], half[2]])
        elif kind == "sphere":
            obj["radius"] = float(radius)
            obj["center"] = np.array([xy[0], xy[1], radius])
        else:
            obj["radius"], obj["height"] = float(radius), float(height)
            obj["center"] = np.array([xy[0], xy[1], height / 2.0])
        obj["_footprint"] = footprint
        obj["_rz"] = _rot_z(obj_yaw)
        obj["_c"] = obj["center"][:, None]
        if kind == "box":
            obj["_half"] = half[:, None]
            obj["_bound"] = float(np.linalg.norm(half))
        else:
            obj["_bound"] = float(math.hypot(radius, 0.0 if kind == "sphere" else height / 2.0))
        objects.append(obj)

    planes = []
    for name, cls, n_w, axis, bound in _ROOM_SURFACES:
        n_w = np.array(n_w)
        offset = -float(n_w[axis]) * (0.0, (lx, ly, hc)[axis])[bound]  # n . X + offset = 0
        planes.append({
            "name": name, "class_id": cls, "normal": n_w, "offset": offset,
            "normal_cam": r_wc.T @ n_w, "offset_cam": offset + float(n_w @ cam),
        })

    light = {
        "position": np.array([rng.uniform(0.3, lx - 0.3), rng.uniform(0.3, ly - 0.3),
                              hc - rng.uniform(0.3, 0.8)]),
        "ambient": float(rng.uniform(0.15, 0.35)),
        "intensity": float(rng.uniform(0.8, 1.2)),
        "color": rng.uniform(0.85, 1.0, size=3),
    }
    # Walls share one appearance, like a painted room; floor, ceiling and each object get their own.
    wall_app = _random_appearance(rng)
    floor_app, ceil_app = _random_appearance(rng), _random_appearance(rng)
    appearance = [floor_app, ceil_app, wall_app, wall_app, wall_app, wall_app]
    appearance += [_random_appearance(rng) for _ in objects]
    return {
        "room_size": np.array([lx, ly, hc]),
        "camera": {"position": cam, "rotation": r_wc, "yaw": yaw, "pitch": pitch, "roll": roll,
                   "size": tuple(size), **intr},
        "planes": planes,
        "objects": objects,
        "light": light,
        "appearance": appearance,
    }


def _screen_rect(obj: dict, cam: dict, h: int, w: int):
    """Pixel rectangle ``(r0, r1, c0, c1)`` that contains the object's projection, ``None`` when it is
    entirely behind the camera, or the full image when it straddles the image plane."""
    kind = obj["kind"]
    if kind == "box":
        half = obj["half_extents"]
        signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
        corners = obj["center"] + (signs * half) @ obj["_rz"].T
    else:
        r = obj["radius"]
        hz = r if kind == "sphere" else obj["height"] / 2.0
        signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
        corners = obj["center"] + signs * np.array([r, r, hz])
    pc = (corners - cam["position"]) @ cam["rotation"]
    z = pc[:, 2]
    if np.all(z <= 0):
        return None
    if np.any(z <= 1e-3):
        return 0, h, 0, w
    u = cam["fx"] * pc[:, 0] / z + cam["cx"]
    v = cam["fy"] * pc[:, 1] / z + cam["cy"]
    c0, c1 = max(int(math.floor(u.min())) - 1, 0), min(int(math.ceil(u.max())) + 1, w)
    r0, r1 = max(int(math.floor(v.min())) - 1, 0), min(int(math.ceil(v.max())) + 1, h)
    if c0 >= c1 or r0 >= r1:
        return None
    return r0, r1, c0, c1


def render_scene(scene: dict, rays_cam: np.ndarray) -> dict:
    """Ray-cast ``scene`` through camera-frame ray directions ``rays_cam [3, H, W]`` (z component 1).

    Returns numpy arrays: ``rgb [H,W,3]`` float32 noiseless in [0, 1], ``seg [H,W]`` int64 class ids,
    ``depth [H,W]`` float64 z-depth (metres), ``normal [H,W,3]`` float64 camera-frame unit normals facing
    the camera, ``surface [H,W]`` int64 (0..5: room planes in ``scene["planes"]`` order, 6 + k: object
    k), ``instance [H,W]`` int64 (object index, -1 on room surfaces).
    """
    _, h, w = rays_cam.shape
    cam = scene["camera"]
    c, r_wc = cam["position"], cam["rotation"]
    c_col = c[:, None]
    # World ray directions; since the camera-frame rays have z = 1, the ray parameter t of a hit is
    # its camera z-depth.
    d = (r_wc @ rays_cam.reshape(3, -1)).reshape(3, h, w)
    lx, ly, hc = scene["room_size"]

    # The room is a closed box around the camera: every ray leaves it through exactly one plane.
    with np.errstate(divide="ignore"):
        tx = np.where(d[0] > 0, lx - c[0], -c[0]) / d[0]
        ty = np.where(d[1] > 0, ly - c[1], -c[1]) / d[1]
        tz = np.where(d[2] > 0, hc - c[2], -c[2]) / d[2]
    tx[d[0] == 0] = np.inf
    ty[d[1] == 0] = np.inf
    tz[d[2] == 0] = np.inf
    # Surface ids: floor 0 / ceiling 1 (z), walls 2 / 3 (x = 0 / Lx), 4 / 5 (y = 0 / Ly).
    surface = (d[2] > 0).astype(np.int64)
    depth = tz
    closer = tx < depth
    surface[closer] = 2 + (d[0][closer] > 0)
    depth = np.where(closer, tx, depth)
    closer = ty < depth
    surface[closer] = 4 + (d[1][closer] > 0)
    depth = np.where(closer, ty, depth)

    for k, obj in enumerate(scene["objects"]):
        rect = _screen_rect(obj, cam, h, w)
        if rect is None:
            continue
        r0, r1, c0, c1 = rect
        t = _INTERSECT[obj["kind"]](c_col, d[:, r0:r1, c0:c1].reshape(3, -1), obj, 1e-6)
        t = t.reshape(r1 - r0, c1 - c0)
        closer = t < depth[r0:r1, c0:c1]
        depth[r0:r1, c0:c1][closer] = t[closer]
        surface[r0:r1, c0:c1][closer] = _NUM_ROOM + k

    df = d.reshape(3, -1)
    sf = surface.reshape(-1)
    p = c_col + depth.reshape(1, -1) * df  # world hit points [3, HW]
    n_w = np.empty_like(p)
    albedo = np.empty(p.shape, dtype=np.float32)
    seg = np.empty(h * w, dtype=np.int64)
    present = np.bincount(sf, minlength=_NUM_ROOM + len(scene["objects"]))
    order = np.argsort(sf, kind="stable")
    starts = np.concatenate([[0], np.cumsum(present)])
    for s in np.flatnonzero(present):
        idx = order[starts[s]:starts[s + 1]]
        app = scene["appearance"][s]
        ps = p[:, idx]
        if s < _NUM_ROOM:
            plane = scene["planes"][s]
            n_w[:, idx] = plane["normal"][:, None]
            seg[idx] = plane["class_id"]
            albedo[:, idx] = _texture(ps, app)
        else:
            obj = scene["objects"][s - _NUM_ROOM]
            p_l = _to_local(ps, obj)
            n_w[:, idx] = _object_normals(ps, p_l, obj)
            seg[idx] = obj["class_id"]
            albedo[:, idx] = _texture(p_l, app)

    # Lambertian shading from a point light, with hard shadows cast by the objects.
    light = scene["light"]
    lpos = light["position"]
    to_light = lpos[:, None] - p
    dist = np.sqrt(to_light[0] ** 2 + to_light[1] ** 2 + to_light[2] ** 2)
    cos = (n_w[0] * to_light[0] + n_w[1] * to_light[1] + n_w[2] * to_light[2]) / dist
    lit = np.flatnonzero(cos > 0)
    if len(lit) and scene["objects"]:
        seg_dir = to_light[:, lit]
        seg_len = dist[lit]
        shadow = np.zeros(len(lit), dtype=bool)
        for obj in scene["objects"]:
            # Cull with the cone from the light around the object's bounding sphere: only points
            # behind the sphere as seen from the light can be shadowed by it.
            axis = obj["center"] - lpos
            dist_c = float(np.linalg.norm(axis))
            if dist_c > obj["_bound"]:
                cos_cone = math.sqrt(1.0 - (obj["_bound"] / dist_c) ** 2)
                cand = np.flatnonzero((-(axis / dist_c) @ seg_dir > cos_cone * seg_len)
                                      & (seg_len > dist_c - obj["_bound"]))
            else:
                cand = np.arange(len(lit))
            if len(cand) == 0:
                continue
            sub = lit[cand]
            origin = p[:, sub] + 1e-6 * n_w[:, sub]
            shadow[cand] |= _INTERSECT[obj["kind"]](origin, seg_dir[:, cand], obj, 1e-7) < 1.0
        cos[lit[shadow]] = 0.0
    diffuse = light["intensity"] * np.maximum(cos, 0.0) / (1.0 + 0.03 * dist * dist)
    shade = (light["ambient"] + diffuse).astype(np.float32)
    rgb = albedo * shade * light["color"].astype(np.float32)[:, None]
    np.clip(rgb, 0.0, 1.0, out=rgb)
    rgb **= np.float32(1.0 / 2.2)

    n_c = r_wc.T @ n_w  # camera frame
    # Guard: every visible surface is hit from outside, so its normal already faces the camera.
    rc = rays_cam.reshape(3, -1)
    flip = (n_c[0] * rc[0] + n_c[1] * rc[1] + n_c[2] * rc[2]) > 0
    n_c[:, flip] *= -1.0
    instance = np.where(surface >= _NUM_ROOM, surface - _NUM_ROOM, -1)
    return {
        "rgb": rgb.reshape(3, h, w).transpose(1, 2, 0),
        "seg": seg.reshape(h, w),
        "depth": depth,
        "normal": n_c.reshape(3, h, w).transpose(1, 2, 0),
        "surface": surface,
        "instance": instance,
    }


def instance_boxes(instance: np.ndarray, objects: list[dict], min_pixels: int):
    """Tight ``xyxy`` boxes ``[N, 4]`` (pixel edges) and class ids ``[N]`` of the objects with at least
    ``min_pixels`` visible pixels in the ``instance`` map; also returns their object indices."""
    counts = np.bincount(instance.reshape(-1) + 1, minlength=len(objects) + 1)[1:]
    boxes, labels, keep = [], [], []
    for k in np.flatnonzero(counts >= max(min_pixels, 1)):
        mask = instance == k
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        boxes.append([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
        labels.append(objects[k]["class_id"])
        keep.append(int(k))
    return (np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            np.asarray(labels, dtype=np.int64), keep)

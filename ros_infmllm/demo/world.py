"""A synthetic camera world: a table seen from above with coloured shapes, drawn with OpenCV.

Two tables: ``TABLE`` (5 places, up to 3 shapes: the tiny test model's world) and ``BUSY_TABLE``
(9 places, up to 5 shapes: the demo VLM's world). Everything is seeded, so a stream, its frames
and the ground truth behind every answer can be regenerated exactly (training, evaluation, demo
bags and the synthetic camera node share it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import cv2
import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "green": (40, 170, 70), "blue": (45, 85, 230),
    "yellow": (235, 210, 40), "purple": (150, 60, 195), "orange": (245, 135, 25),
}
# Where each named position sits in the frame (fractions of width, height); the order is the
# order in which answers list the things in view.
ALL_POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.2, 0.5), "right": (0.8, 0.5), "top": (0.5, 0.2), "bottom": (0.5, 0.8), "centre": (0.5, 0.5),
    "top left": (0.2, 0.2), "top right": (0.8, 0.2), "bottom left": (0.2, 0.8), "bottom right": (0.8, 0.8),
}


@dataclass(frozen=True)
class WorldSpec:
    """Which places a table has and how many shapes it holds at most."""

    name: str
    positions: tuple[str, ...]
    max_objects: int


TABLE = WorldSpec("table", ("left", "right", "top", "bottom", "centre"), 3)
BUSY_TABLE = WorldSpec("busy_table", tuple(ALL_POSITIONS), 5)
WORLDS = {w.name: w for w in (TABLE, BUSY_TABLE)}
POSITIONS = {name: ALL_POSITIONS[name] for name in TABLE.positions}  # the small table's places
MAX_OBJECTS = TABLE.max_objects


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    position: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...] = ()

    def free_positions(self, world: WorldSpec = TABLE) -> list[str]:
        taken = {t.position for t in self.things}
        return [p for p in world.positions if p not in taken]

    def ordered(self) -> list[Thing]:
        """Things in a fixed reading order (by position), so answers listing them are unique."""
        order = list(ALL_POSITIONS)
        return sorted(self.things, key=lambda t: order.index(t.position))


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    if shape == "star":
        radii = [r if i % 2 == 0 else r * 0.45 for i in range(10)]
        angles = [angle + np.pi / 2 + i * np.pi / 5 for i in range(10)]
    else:
        sides, offset = {"square": (4, np.pi / 4), "triangle": (3, np.pi / 2), "diamond": (4, 0.0)}[shape]
        radii = [r * (1.0 if shape != "diamond" else (1.0 if i % 2 == 0 else 0.65)) for i in range(sides)]
        angles = [angle + offset + i * 2 * np.pi / sides for i in range(sides)]
    points = [(cx + rad * np.cos(a), cy - rad * np.sin(a)) for rad, a in zip(radii, angles)]
    return np.round(np.array(points) * 16).astype(np.int32)  # 4 fractional bits for smooth edges


def thing_class(thing: Thing) -> int:
    """1 + the index of (shape, colour): the label a training mask holds where the thing is; 0 is the table."""
    return 1 + SHAPES.index(thing.shape) * len(COLOURS) + list(COLOURS).index(thing.colour)


def render(scene: Scene, rng: np.random.Generator, width: int = 64, height: int = 64,
           labels: np.ndarray | None = None) -> np.ndarray:
    """One camera frame of ``scene``: textured background, lighting gradient, jittered camera.
    ``labels`` (``height x width`` uint8, optional): filled with each thing's `thing_class` where it
    is drawn, for training a vision tower to tell what is where."""
    base = rng.uniform(90, 170)
    texture = rng.normal(0, rng.uniform(4, 14), (height // 4 + 1, width // 4 + 1))
    texture = cv2.resize(texture, (width, height), interpolation=cv2.INTER_LINEAR)
    gx, gy = np.meshgrid(np.linspace(-1, 1, width), np.linspace(-1, 1, height))
    light = rng.uniform(-25, 25) * gx + rng.uniform(-25, 25) * gy
    tint = rng.uniform(-12, 12, 3)
    image = np.clip(base + texture[..., None] + light[..., None] + tint, 0, 255).astype(np.uint8)
    dx, dy = rng.uniform(-0.03, 0.03, 2)
    size = min(width, height)
    for thing in scene.things:
        fx, fy = ALL_POSITIONS[thing.position]
        cx, cy = (fx + dx + rng.uniform(-0.02, 0.02)) * width, (fy + dy + rng.uniform(-0.02, 0.02)) * height
        r = size * rng.uniform(0.1, 0.13)
        colour = tuple(int(np.clip(c * rng.uniform(0.85, 1.1), 0, 255)) for c in COLOURS[thing.colour])
        targets = [(image, colour, cv2.LINE_AA)] + ([(labels, thing_class(thing), cv2.LINE_8)] if labels is not None
                                                    else [])
        if thing.shape == "circle":
            for target, value, line in targets:
                cv2.circle(target, (int(cx * 16), int(cy * 16)), int(r * 16), value, -1, line, shift=4)
        else:
            polygon = _polygon(thing.shape, cx, cy, r, rng.uniform(-0.15, 0.15))
            for target, value, line in targets:
                cv2.fillPoly(target, [polygon], value, line, shift=4)
    return image


def random_thing(rng: np.random.Generator, scene: Scene, exclude: set[tuple[str, str]] = frozenset(),
                 world: WorldSpec = TABLE) -> Thing:
    """A thing at a free position whose (shape, colour) is not already in the scene or ``exclude``."""
    used = {(t.shape, t.colour) for t in scene.things} | set(exclude)
    while True:
        shape, colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
        if (shape, colour) not in used:
            free = scene.free_positions(world)
            return Thing(shape, colour, free[rng.integers(len(free))])


def random_scene(rng: np.random.Generator, count: int | None = None, world: WorldSpec = TABLE) -> Scene:
    count = int(rng.integers(0, world.max_objects + 1)) if count is None else count
    scene = Scene()
    for _ in range(count):
        scene = Scene(scene.things + (random_thing(rng, scene, world=world),))
    return scene


def next_scene(scene: Scene, rng: np.random.Generator, world: WorldSpec = TABLE) -> tuple[Scene, str]:
    """The scene after one change: an object enters, leaves or moves (or nothing happens)."""
    choices = ["stay"]
    if len(scene.things) < world.max_objects:
        choices += ["enter", "enter"]
    if scene.things:
        choices += ["leave", "move"]
    event = choices[rng.integers(len(choices))]
    things = list(scene.things)
    if event == "enter":
        things.append(random_thing(rng, scene, world=world))
    elif event == "leave":
        things.pop(int(rng.integers(len(things))))
    elif event == "move":
        i = int(rng.integers(len(things)))
        free = scene.free_positions(world)
        t = things[i]
        things[i] = Thing(t.shape, t.colour, free[rng.integers(len(free))])
    return Scene(tuple(things)), event


@dataclass(frozen=True)
class StreamFrame:
    index: int
    scene: Scene
    event: str
    image: np.ndarray
    labels: np.ndarray | None = None  # per-pixel thing_class, when the stream was asked for it


def scene_stream(seed: int, scenes: int, frames_per_scene: int = 1, width: int = 64,
                 height: int = 64, world: WorldSpec = TABLE, with_labels: bool = False) -> Iterator[StreamFrame]:
    """A seeded stream: ``scenes`` successive scenes, each seen in ``frames_per_scene`` frames."""
    rng = np.random.default_rng(seed)
    scene, event = random_scene(rng, world=world), "start"
    index = 0
    for _ in range(scenes):
        for _ in range(frames_per_scene):
            labels = np.zeros((height, width), np.uint8) if with_labels else None
            yield StreamFrame(index, scene, event, render(scene, rng, width, height, labels), labels)
            index += 1
            event = "stay"
        scene, event = next_scene(scene, rng, world)

"""The world: scene graphs, a PIL renderer with in- and out-of-distribution renditions, captions and questions, and
the renderer's own detector (`detect`), which scores what a model draws.

A scene is 1-3 objects on a plain background, each with a shape (circle, square, triangle, diamond), a colour (six
named colours), a size (small / big), a slot (left / middle / right) and, for triangles, an orientation (pointing
up / down). Scene graphs are exact: every caption, question, answer and mask is computed from them.

Renditions (``style``): ``"plain"`` (training: filled shapes on a light background), and the out-of-distribution
ones the training data never shows (the ImageNet-R / -A analogue): ``"outline"`` (contours only), ``"striped"``
(textured fill), ``"noisy"`` (pixel noise), ``"dark"`` (dark background), ``"pastel"`` (another palette).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "big")
SLOTS = ("left", "middle", "right")
ORIENTATIONS = ("up", "down")
STYLES = ("plain", "outline", "striped", "noisy", "dark", "pastel")
OOD_STYLES = STYLES[1:]
BACKGROUND = (225, 225, 225)
NUMBERS = {1: "one", 2: "two", 3: "three"}


@dataclass(frozen=True)
class Obj:
    """One object of a scene."""

    shape: str
    colour: str
    size: str = "big"
    slot: str = "middle"
    orientation: str = "up"

    def name(self, with_size: bool = False) -> str:
        words = ([self.size] if with_size else []) + [self.colour, self.shape]
        return " ".join(words)

    def phrase(self) -> str:
        """``"a big red triangle pointing down"``."""
        text = f"a {self.size} {self.colour} {self.shape}"
        if self.shape == "triangle":
            text += f" pointing {self.orientation}"
        return text


@dataclass(frozen=True)
class Scene:
    """A scene graph: objects ordered left to right (distinct slots)."""

    objects: tuple[Obj, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if not 1 <= len(self.objects) <= 3:
            raise ValueError(f"a scene has 1-3 objects, got {len(self.objects)}")
        slots = [o.slot for o in self.objects]
        if len(set(slots)) != len(slots):
            raise ValueError(f"two objects share a slot: {slots}")
        for o in self.objects:
            if o.shape not in SHAPES or o.colour not in COLOURS or o.size not in SIZES or o.slot not in SLOTS:
                raise ValueError(f"unknown attribute in {o}")
            if o.orientation not in ORIENTATIONS:
                raise ValueError(f"unknown orientation in {o}")

    def to_dict(self) -> dict:
        return {"objects": [dataclasses.asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, value: dict) -> "Scene":
        return cls(tuple(Obj(**o) for o in value["objects"]))

    def has(self, shape: str | None = None, colour: str | None = None) -> bool:
        return any((shape is None or o.shape == shape) and (colour is None or o.colour == colour) for o in self.objects)


# ------------------------------------------------------------------------------------------------------- sampling


def random_object(rng: random.Random, slot: str) -> Obj:
    return Obj(
        shape=rng.choice(SHAPES),
        colour=rng.choice(list(COLOURS)),
        size=rng.choice(SIZES),
        slot=slot,
        orientation=rng.choice(ORIENTATIONS),
    )


def random_scene(rng: random.Random, max_objects: int = 3, min_objects: int = 1) -> Scene:
    n = rng.randint(min_objects, max_objects)
    slots = sorted(rng.sample(SLOTS, n), key=SLOTS.index) if n > 1 else [rng.choice(SLOTS)]
    return Scene(tuple(random_object(rng, s) for s in slots))


def change_scene(scene: Scene, rng: random.Random) -> tuple[Scene, str]:
    """A small edit of ``scene`` and the sentence describing it (for interleaved documents)."""
    objs = list(scene.objects)
    i = rng.randrange(len(objs))
    o = objs[i]
    free = [s for s in SLOTS if s not in {x.slot for x in objs}]
    kinds = ["colour", "shape", "size"] + (["add", "move"] if free else []) + (["remove"] if len(objs) > 1 else [])
    kind = rng.choice(kinds)
    if kind == "colour":
        new = rng.choice([c for c in COLOURS if c != o.colour])
        objs[i] = dataclasses.replace(o, colour=new)
        text = f"Then the {o.colour} {o.shape} turns {new}."
    elif kind == "shape":
        new = rng.choice([s for s in SHAPES if s != o.shape])
        objs[i] = dataclasses.replace(o, shape=new)
        text = f"Then the {o.colour} {o.shape} becomes a {new}."
    elif kind == "size":
        new = "small" if o.size == "big" else "big"
        objs[i] = dataclasses.replace(o, size=new)
        text = f"Then the {o.colour} {o.shape} gets {'smaller' if new == 'small' else 'bigger'}."
    elif kind == "add":
        added = random_object(rng, rng.choice(free))
        objs.append(added)
        text = f"Then {added.phrase()} appears {where(added.slot)}."
    elif kind == "move":
        slot = rng.choice(free)
        objs[i] = dataclasses.replace(o, slot=slot)
        text = f"Then the {o.colour} {o.shape} moves {where(slot).replace('on the', 'to the')}."
    else:
        del objs[i]
        text = f"Then the {o.colour} {o.shape} disappears."
    objs.sort(key=lambda x: SLOTS.index(x.slot))
    return Scene(tuple(objs)), text


# ------------------------------------------------------------------------------------------------------- language


def where(slot: str) -> str:
    """``"on the left"``, ``"in the middle"``, ``"on the right"``."""
    return "in the middle" if slot == "middle" else f"on the {slot}"


def caption(scene: Scene, variant: int = 0) -> str:
    """A caption of the scene; ``variant`` 0 is the canonical one, 1-2 other phrasings (more CIDEr references)."""
    objs = scene.objects
    if variant == 1:
        count = NUMBERS[len(objs)]
        noun = "object" if len(objs) == 1 else "objects"
        return f"{count} {noun}: " + ", ".join(o.name() for o in objs) + "."
    if variant == 2:
        return " and ".join(f"a {o.colour} {o.shape} {where(o.slot)}" for o in objs) + "."
    return " and ".join(o.phrase() for o in objs) + "."


def short_caption(scene: Scene) -> str:
    """``"a red circle and a blue square"``: what text-to-image prompts and drawing checks use."""
    return " and ".join(f"a {o.colour} {o.shape}" for o in scene.objects)


def existence_question(shape: str, colour: str | None = None) -> str:
    thing = f"{colour} {shape}" if colour else shape
    article = "an" if thing[0] in "aeiou" else "a"
    return f"Is there {article} {thing} in the image?"


def scene_questions(scene: Scene, rng: random.Random, n: int = 4) -> list[tuple[str, str]]:
    """Question-answer pairs in random order: yes/no existence of coloured shapes (each independently present or
    absent with probability 1/2, so neither the turn nor the other answers give the answer away), count, colour of a
    shape."""
    qa = []
    for k in range(n):
        kind = k % 4
        if kind in (0, 1):
            if rng.random() < 0.5:
                o = rng.choice(scene.objects)
                qa.append((existence_question(o.shape, o.colour), "yes"))
            else:
                for _ in range(50):
                    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
                    if not scene.has(shape, colour):
                        break
                qa.append((existence_question(shape, colour), "yes" if scene.has(shape, colour) else "no"))
        elif kind == 2:
            qa.append(("How many objects are there?", NUMBERS[len(scene.objects)]))
        else:
            o = rng.choice(scene.objects)
            qa.append((f"What colour is the {o.shape} {where(o.slot)}?", o.colour))
    rng.shuffle(qa)
    return qa


# ------------------------------------------------------------------------------------------------------- rendering


def _box(obj: Obj, size: int) -> tuple[float, float, float, float]:
    cell = size / 3.0
    cx = (SLOTS.index(obj.slot) + 0.5) * cell
    cy = size / 2.0
    half = cell * (0.46 if obj.size == "big" else 0.3)
    return cx - half, cy - half, cx + half, cy + half


def _polygon(shape: str, box, orientation: str = "up"):
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)] if orientation == "up" else [(x0, y0), (x1, y0), (cx, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "square":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    raise ValueError(shape)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, fill=None, outline=None, width: int = 1, orientation="up"):
    if shape == "circle":
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    else:
        draw.polygon(_polygon(shape, box, orientation), fill=fill, outline=outline, width=width)


def object_mask(obj: Obj, size: int) -> np.ndarray:
    """Boolean [size, size] mask of the object's filled area."""
    canvas = Image.new("L", (size, size), 0)
    draw_shape(ImageDraw.Draw(canvas), obj.shape, _box(obj, size), fill=255, orientation=obj.orientation)
    return np.asarray(canvas) > 0


def _pastel(rgb):
    return tuple(int(0.45 * c + 0.55 * 255) for c in rgb)


def render(scene: Scene, size: int = 32, style: str = "plain", seed: int = 0) -> Image.Image:
    """The scene as an RGB image of side ``size`` in rendition ``style`` (see the module docstring)."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
    background = (30, 30, 40) if style == "dark" else BACKGROUND
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    rng = np.random.default_rng(seed)
    for obj in scene.objects:
        colour = COLOURS[obj.colour]
        box = _box(obj, size)
        if style == "pastel":
            colour = _pastel(colour)
        if style == "outline":
            draw_shape(draw, obj.shape, box, outline=colour, width=max(1, size // 24), orientation=obj.orientation)
        else:
            draw_shape(draw, obj.shape, box, fill=colour, orientation=obj.orientation)
        if style == "striped":
            mask = object_mask(obj, size)
            pixels = np.asarray(image).copy()
            stripes = (np.add.outer(np.arange(size), np.arange(size)) // max(1, size // 16)) % 2 == 0
            pixels[mask & stripes] = (255, 255, 255)
            image = Image.fromarray(pixels)
            draw = ImageDraw.Draw(image)
    if style == "noisy":
        pixels = np.asarray(image).astype(np.float32) + rng.normal(0, 40, (size, size, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image


# ------------------------------------------------------------------------------------------------------- scoring


def detect(image, min_area: int | None = None) -> list[dict]:
    """The renderer's own detector: the objects in an image (any size), largest first, as
    ``{"colour", "shape", "area", "box", "iou"}``.

    Background = the median border colour; foreground = pixels far from it; each connected component's colour is the
    nearest named colour of its median pixel, its shape the template (each shape rendered into the component's
    bounding box) with the highest IoU."""
    from scipy import ndimage

    if isinstance(image, Image.Image):
        pixels = np.asarray(image.convert("RGB")).astype(np.float32)
    else:
        pixels = np.asarray(image, dtype=np.float32)
        if pixels.ndim == 3 and pixels.shape[0] == 3:
            pixels = pixels.transpose(1, 2, 0)
        if pixels.max() <= 1.0:
            pixels = pixels * 255.0
    h, w = pixels.shape[:2]
    min_area = min_area if min_area is not None else max(4, (h * w) // 200)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    foreground = np.linalg.norm(pixels - background, axis=-1) > 60
    labels, n = ndimage.label(foreground)
    names = list(COLOURS)
    palette = np.array([COLOURS[c] for c in names], dtype=np.float32)
    found = []
    for k in range(1, n + 1):
        component = labels == k
        area = int(component.sum())
        if area < min_area:
            continue
        ys, xs = np.nonzero(component)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        median = np.median(pixels[component], axis=0)
        colour = names[int(np.linalg.norm(palette - median, axis=-1).argmin())]
        crop = component[y0:y1, x0:x1]
        best, best_iou = None, -1.0
        for shape in SHAPES:
            for orientation in ORIENTATIONS if shape == "triangle" else ("up",):
                canvas = Image.new("L", (int(x1 - x0), int(y1 - y0)), 0)
                draw_shape(
                    ImageDraw.Draw(canvas),
                    shape,
                    (0, 0, x1 - x0 - 1, y1 - y0 - 1),
                    fill=255,
                    orientation=orientation,
                )
                template = np.asarray(canvas) > 0
                iou = float((template & crop).sum() / max(1, (template | crop).sum()))
                if iou > best_iou:
                    best, best_iou = shape, iou
        found.append(
            {
                "colour": colour,
                "shape": best,
                "area": area,
                "box": [int(x0), int(y0), int(x1), int(y1)],
                "iou": best_iou,
            }
        )
    found.sort(key=lambda d: -d["area"])
    return found

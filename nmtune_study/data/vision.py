"""Datasets for the vision study: an offline default and loaders for real datasets.

Offline default (no downloads; everything comes from pip packages):

* **Pre-training**: glyph classification. ~100 characters (Latin upper and lower
  case, Greek lower case, punctuation) rendered with Pillow from the DejaVu
  Sans/Serif/Mono TrueType fonts that matplotlib ships, with random size, stroke,
  rotation, shear and shift. Label noise is injected into this set.
* **In-domain (ID) tasks**, different from the pre-training task:
  ``digits`` (scikit-learn's real handwritten 8x8 digits, upsampled to 32x32) and
  ``heldout-glyphs`` (20 characters never seen in pre-training: the digits and
  the Greek capitals that look like no Latin letter, in the pre-training fonts).
* **Out-of-domain (OOD) tasks**, train on one domain, test on the others:
  ``font-domains`` (36 characters 0-9 A-Z; train on DejaVu, test on STIX,
  Computer Modern Roman, Computer Modern Sans, Computer Modern Typewriter) and
  ``rotated-digits`` (scikit-learn digits as in DomainBed's RotatedMNIST: train
  at 0 degrees, test at 30, 45 and 60 degrees).

Real datasets (paper scale): ImageFolder trees (ImageNet, DomainNet-style domain
folders, the ImageNet variants), and CIFAR-10/100 in their python-pickle format
(downloaded through torchvision on request). Every dataset yields
``(image_tensor, label)`` pairs.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import pickle
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "ImageTask",
    "PretrainData",
    "TensorImageDataset",
    "RelabeledDataset",
    "TensorBatches",
    "tensor_source",
    "render_glyphs",
    "offline_pretrain_data",
    "offline_tasks",
    "cifar_dataset",
    "imagefolder_dataset",
    "domain_task",
    "imagefolder_task",
    "cifar_task",
    "imagenet_variant_dataset",
    "parse_task_spec",
    "PRETRAIN_CHARS",
]

# ----------------------------------------------------------------------------- glyphs

_GREEK_LOWER = "αβγδεζηθικλμνξπρστυφχψω"  # omicron left out (identical to 'o')
_PUNCT = "!?#$%&@*+=<>/|{}[]()~^;:"
PRETRAIN_CHARS = (
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ" "abcdefghijklmnopqrstuvwxyz" + _GREEK_LOWER + _PUNCT
)
HELDOUT_CHARS = "0123456789ΓΔΘΛΞΠΣΦΨΩ"
OOD_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"

_DEJAVU = [
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
]
FONT_DOMAINS: dict[str, list[str]] = {
    "dejavu": _DEJAVU,
    "stix": ["STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf"],
    "cm-roman": ["cmr10.ttf", "cmb10.ttf", "cmti10.ttf"],
    "cm-sans": ["cmss10.ttf"],
    "cm-typewriter": ["cmtt10.ttf"],
}
ROTATIONS = (0, 30, 45, 60)


def _font_dir() -> pathlib.Path:
    try:
        import matplotlib
    except ModuleNotFoundError as err:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError(
            'the offline glyph data needs matplotlib\'s fonts: pip install "nmtune[examples]"'
        ) from err
    return pathlib.Path(matplotlib.get_data_path()) / "fonts" / "ttf"


_FONT_CACHE: dict[tuple[str, int], object] = {}


def _font(name: str, size: int):
    from PIL import ImageFont

    key = (name, size)
    if key not in _FONT_CACHE:
        _FONT_CACHE[key] = ImageFont.truetype(str(_font_dir() / name), size)
    return _FONT_CACHE[key]


def render_glyphs(
    chars: str,
    fonts: Sequence[str],
    per_char: int,
    *,
    seed: int,
    size: int = 32,
    augment: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render ``per_char`` augmented images of every character.

    Each image draws a random font from ``fonts``, a random glyph size, stroke
    width, rotation, shear and shift; white glyph on black, ``uint8``.

    Args:
        chars: the classes, one character each (label ``i`` is ``chars[i]``).
        fonts: TrueType file names inside matplotlib's font folder.
        per_char: images per character.
        seed: seed of the augmentation.
        size: output side in pixels.
        augment: draw random transforms; ``False`` renders centred glyphs.

    Returns:
        ``(images, labels)`` with shapes ``(N, 1, size, size)`` (uint8) and ``(N,)``.

    Example:
        >>> x, y = render_glyphs("AB", ["DejaVuSans.ttf"], 2, seed=0)
        >>> tuple(x.shape), y.tolist()
        ((4, 1, 32, 32), [0, 0, 1, 1])
    """
    from PIL import Image, ImageDraw

    if per_char < 1:
        raise ValueError(f"per_char must be >= 1, got {per_char}")
    if not fonts:
        raise ValueError("fonts is empty; expected at least one TrueType file name")
    rng = np.random.default_rng(seed)
    canvas = size * 2
    images = np.zeros((len(chars) * per_char, size, size), dtype=np.uint8)
    labels = np.repeat(np.arange(len(chars)), per_char)
    for idx in range(len(images)):
        ch = chars[labels[idx]]
        font_name = fonts[rng.integers(len(fonts))]
        if augment:
            pt = int(canvas * rng.uniform(0.45, 0.75))
            stroke = int(rng.integers(0, 2))
            angle = rng.uniform(-12, 12)
            shear = rng.uniform(-0.2, 0.2)
            dx, dy = rng.uniform(-0.1, 0.1, size=2) * canvas
        else:
            pt, stroke, angle, shear, dx, dy = int(canvas * 0.6), 0, 0.0, 0.0, 0.0, 0.0
        font = _font(font_name, pt)
        img = Image.new("L", (canvas, canvas), 0)
        draw = ImageDraw.Draw(img)
        left, top, right, bottom = draw.textbbox((0, 0), ch, font=font, stroke_width=stroke)
        pos = ((canvas - (right - left)) / 2 - left + dx, (canvas - (bottom - top)) / 2 - top + dy)
        draw.text(pos, ch, fill=255, font=font, stroke_width=stroke, stroke_fill=255)
        if augment:
            c = canvas / 2
            img = img.transform(
                img.size, Image.Transform.AFFINE, (1, shear, -shear * c, 0, 1, 0), resample=Image.BILINEAR
            )
            img = img.rotate(angle, resample=Image.BILINEAR)
        images[idx] = np.asarray(img.resize((size, size), Image.LANCZOS))
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long()


def _sklearn_digits(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError as err:  # pragma: no cover
        raise ModuleNotFoundError('the digits tasks need scikit-learn: pip install "nmtune[examples]"') from err
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), torch.tensor(d.target, dtype=torch.long)


def _rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    if degrees == 0:
        return x.clone()
    import torchvision.transforms.functional as TF

    return TF.rotate(x, degrees, interpolation=TF.InterpolationMode.BILINEAR)


def _split(x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_test = int(round(len(y) * test_fraction))
    te, tr = perm[:n_test], perm[n_test:]
    return (x[tr], y[tr]), (x[te], y[te])


# ----------------------------------------------------------------------------- datasets


class TensorImageDataset(Dataset):
    """``uint8`` image tensor ``(N, C, H, W)`` + labels -> normalised float images.

    Example:
        >>> ds = TensorImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]))
        >>> ds[1][0].shape, int(ds[1][1])
        (torch.Size([1, 4, 4]), 1)
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"images must be (N, C, H, W) with N == len(labels); got {tuple(images.shape)} "
                f"and {tuple(labels.shape)}"
            )
        self.images, self.labels = images, labels.long()
        self.targets = self.labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return (self.images[i].float() / 127.5 - 1.0), self.labels[i]


class RelabeledDataset(Dataset):
    """Wrap a dataset and return ``labels[i]`` instead of its own label (noisy labels)."""

    def __init__(self, base: Dataset, labels: torch.Tensor) -> None:
        if len(base) != len(labels):
            raise ValueError(f"labels has {len(labels)} entries; the dataset has {len(base)}")
        self.base, self.labels = base, torch.as_tensor(labels).long()

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        return self.base[i][0], self.labels[i]


def tensor_source(ds) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(uint8 images, labels)`` when ``ds`` is (a relabelling of) a :class:`TensorImageDataset`, else None.

    Example:
        >>> ds = TensorImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]))
        >>> tensor_source(RelabeledDataset(ds, torch.tensor([1, 0])))[1].tolist()
        [1, 0]
    """
    if isinstance(ds, RelabeledDataset) and isinstance(ds.base, TensorImageDataset):
        return ds.base.images, ds.labels
    if isinstance(ds, TensorImageDataset):
        return ds.images, ds.labels
    return None


class TensorBatches:
    """Batches of an in-memory image tensor in the order drawn from ``generator``
    (sequential when ``generator`` is None; then the last partial batch is kept).

    Example:
        >>> ds = TensorImageDataset(torch.zeros(5, 1, 4, 4, dtype=torch.uint8), torch.arange(5))
        >>> [len(y) for _, y in TensorBatches(ds, 2, None)]
        [2, 2, 1]
    """

    def __init__(self, ds, batch_size: int, generator: torch.Generator | None) -> None:
        self.images, self.labels = tensor_source(ds)
        self.batch_size, self.generator = batch_size, generator

    def __len__(self) -> int:
        n = len(self.labels)
        if self.generator is not None:  # training: drop the last partial batch, but keep at least one
            return max(1, n // self.batch_size) if n else 0
        return -(-n // self.batch_size)

    def __iter__(self):
        return self.iter_from(0)

    def iter_from(self, step: int):
        """The batches from batch ``step`` on, in the order of a whole pass (the
        permutation is drawn as in a whole pass; the batches before ``step`` are not built)."""
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.generator is not None else torch.arange(n)
        for i in range(step, len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.images[idx].float() / 127.5 - 1.0, self.labels[idx]


@dataclasses.dataclass
class PretrainData:
    """The pre-training set: ``train`` (clean labels in ``labels``), ``val`` and the class count."""

    train: Dataset
    val: Dataset
    labels: torch.Tensor
    num_classes: int
    in_chans: int
    image_size: int


@dataclasses.dataclass
class ImageTask:
    """A downstream task: ``kind`` is ``"id"`` (``tests == {"test": ...}``) or ``"ood"``
    (``train`` is the source domain, ``tests`` maps each target domain to its data)."""

    name: str
    kind: str
    train: Dataset
    tests: dict[str, Dataset]
    num_classes: int


def offline_pretrain_data(*, per_char: int = 80, seed: int = 0, tiny: bool = False) -> PretrainData:
    """The offline glyph pre-training set (~100 classes in 12 DejaVu fonts).

    Example:
        >>> d = offline_pretrain_data(tiny=True)
        >>> d.num_classes, d.in_chans
        (20, 1)
    """
    chars = PRETRAIN_CHARS[:20] if tiny else PRETRAIN_CHARS
    per = 6 if tiny else per_char
    x, y = render_glyphs(chars, _DEJAVU, per, seed=seed)
    xv, yv = render_glyphs(chars, _DEJAVU, max(2, per // 8), seed=seed + 1)
    return PretrainData(TensorImageDataset(x, y), TensorImageDataset(xv, yv), y, len(chars), 1, 32)


def offline_tasks(*, seed: int = 0, tiny: bool = False) -> list[ImageTask]:
    """The offline ID and OOD tasks (see the module docstring).

    Example:
        >>> [(t.name, t.kind, len(t.tests)) for t in offline_tasks(tiny=True)]
        [('digits', 'id', 1), ('heldout-glyphs', 'id', 1), ('font-domains', 'ood', 4), ('rotated-digits', 'ood', 3)]
    """
    tasks: list[ImageTask] = []
    dx, dy = _sklearn_digits()
    if tiny:
        dx, dy = dx[:200], dy[:200]
    tr, te = _split(dx, dy, 0.5, seed)
    tasks.append(ImageTask("digits", "id", TensorImageDataset(*tr), {"test": TensorImageDataset(*te)}, 10))

    per = 4 if tiny else 40
    hx, hy = render_glyphs(HELDOUT_CHARS, _DEJAVU, per, seed=seed + 10)
    tr, te = _split(hx, hy, 0.5, seed)
    tasks.append(
        ImageTask("heldout-glyphs", "id", TensorImageDataset(*tr), {"test": TensorImageDataset(*te)}, len(HELDOUT_CHARS))
    )

    per = 3 if tiny else 24
    domains = {}
    for i, (dom, fonts) in enumerate(FONT_DOMAINS.items()):
        domains[dom] = TensorImageDataset(*render_glyphs(OOD_CHARS, fonts, per, seed=seed + 20 + i))
    source = domains.pop("dejavu")
    tasks.append(ImageTask("font-domains", "ood", source, domains, len(OOD_CHARS)))

    # RotatedMNIST-style: disjoint halves of the digits for source and targets
    (sx, sy), (tx, ty) = _split(dx, dy, 0.5, seed + 1)
    rot = {f"rot{a}": TensorImageDataset(_rotate(tx, a), ty) for a in ROTATIONS[1:]}
    tasks.append(ImageTask("rotated-digits", "ood", TensorImageDataset(sx, sy), rot, 10))
    return tasks


# ----------------------------------------------------------------------------- real data


def _default_transform(image_size: int, train: bool) -> Callable:
    import torchvision.transforms as T

    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    if train:
        return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    return T.Compose([T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size), T.ToTensor(), norm])


class _ArrayImageDataset(Dataset):
    """HWC ``uint8`` numpy images + labels through a torchvision transform."""

    def __init__(self, data: np.ndarray, labels: Sequence[int], transform: Callable) -> None:
        self.data, self.targets, self.transform = data, list(labels), transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


def cifar_dataset(
    root: str | os.PathLike,
    name: str,
    *,
    train: bool,
    image_size: int = 224,
    download: bool = False,
    transform: Callable | None = None,
) -> Dataset:
    """CIFAR-10/100 from the python-pickle batches under ``root`` (torchvision's layout).

    The pickles are read directly (no checksum), so any file in the official
    format works; ``download=True`` fetches the official archive with torchvision.

    Example:
        >>> ds = cifar_dataset("data", "cifar10", train=False)  # doctest: +SKIP
    """
    if name not in ("cifar10", "cifar100"):
        raise ValueError(f"name must be 'cifar10' or 'cifar100', got {name!r}")
    root = pathlib.Path(root)
    if download:
        import torchvision

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        cls(str(root), train=train, download=True)
    if name == "cifar10":
        folder, files, key = root / "cifar-10-batches-py", (
            [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        ), b"labels"
    else:
        folder, files, key = root / "cifar-100-python", (["train"] if train else ["test"]), b"fine_labels"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found; pass download=True or point root at the extracted archive")
    data, labels = [], []
    for f in files:
        with open(folder / f, "rb") as fh:
            entry = pickle.load(fh, encoding="bytes")
        data.append(np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.extend(int(v) for v in entry[key])
    tf = transform or _default_transform(image_size, train)
    return _ArrayImageDataset(np.concatenate(data), labels, tf)


def imagefolder_dataset(
    root: str | os.PathLike,
    *,
    train: bool,
    image_size: int = 224,
    class_to_idx: dict[str, int] | None = None,
    transform: Callable | None = None,
) -> Dataset:
    """``root/<class>/<image>`` as a dataset; ``class_to_idx`` fixes the label of each folder
    name (folders missing from it raise ``ValueError``), so that domains share labels.

    Example:
        >>> ds = imagefolder_dataset("imagenet/val", train=False)  # doctest: +SKIP
    """
    import torchvision

    tf = transform or _default_transform(image_size, train)
    ds = torchvision.datasets.ImageFolder(str(root), transform=tf)
    if class_to_idx is not None:
        unknown = sorted(set(ds.classes) - set(class_to_idx))
        if unknown:
            raise ValueError(f"{root} has class folders {unknown[:5]} that are not in class_to_idx")
        remap = {ds.class_to_idx[c]: class_to_idx[c] for c in ds.classes}
        ds.samples = [(p, remap[t]) for p, t in ds.samples]
        ds.imgs = ds.samples
        ds.targets = [t for _, t in ds.samples]
        ds.class_to_idx = {c: class_to_idx[c] for c in ds.classes}
    return ds


def imagenet_variant_dataset(
    root: str | os.PathLike, class_to_idx: dict[str, int], *, image_size: int = 224
) -> Dataset:
    """An ImageNet variant (V2 after renaming to wnids, -R, -Sketch, -A) whose class folders
    are ImageNet wnids, with labels in the ImageNet-1K index of ``class_to_idx``.

    Limitation: for the 200-class variants (-R, -A) the paper masks the logits to
    the 200 classes; this loader keeps the 1000-way labels and no mask.
    """
    return imagefolder_dataset(root, train=False, image_size=image_size, class_to_idx=class_to_idx)


def imagefolder_task(name: str, root: str | os.PathLike, *, image_size: int = 224) -> ImageTask:
    """ID task from ``root/train`` and ``root/test`` (or ``root/val``) ImageFolder trees."""
    root = pathlib.Path(root)
    test_dir = root / "test" if (root / "test").is_dir() else root / "val"
    if not (root / "train").is_dir() or not test_dir.is_dir():
        raise FileNotFoundError(f"{root} must hold train/ and test/ (or val/) class folders")
    tr = imagefolder_dataset(root / "train", train=False, image_size=image_size)
    te = imagefolder_dataset(test_dir, train=False, image_size=image_size, class_to_idx=tr.class_to_idx)
    return ImageTask(name, "id", tr, {"test": te}, len(tr.classes))


def cifar_task(name: str, root: str | os.PathLike, *, image_size: int = 224, download: bool = False) -> ImageTask:
    """ID task on CIFAR-10/100 (train split -> test split), frozen-feature transforms."""
    tr = cifar_dataset(root, name, train=True, image_size=image_size, download=download,
                       transform=_default_transform(image_size, False))
    te = cifar_dataset(root, name, train=False, image_size=image_size, download=False,
                       transform=_default_transform(image_size, False))
    return ImageTask(name, "id", tr, {"test": te}, 10 if name == "cifar10" else 100)


def domain_task(
    name: str, root: str | os.PathLike, source: str, *, targets: Sequence[str] | None = None, image_size: int = 224
) -> ImageTask:
    """OOD task on DomainNet-style data ``root/<domain>/<class>/<image>``: train on
    ``source``, test on every other domain (or ``targets``); labels follow the sorted
    union of class folder names so every domain agrees."""
    root = pathlib.Path(root)
    domains = sorted(p.name for p in root.iterdir() if p.is_dir())
    if source not in domains:
        raise ValueError(f"source domain {source!r} not in {domains}")
    targets = list(targets) if targets else [d for d in domains if d != source]
    classes = sorted({c.name for d in domains for c in (root / d).iterdir() if c.is_dir()})
    c2i = {c: i for i, c in enumerate(classes)}
    tr = imagefolder_dataset(root / source, train=False, image_size=image_size, class_to_idx=c2i)
    tests = {t: imagefolder_dataset(root / t, train=False, image_size=image_size, class_to_idx=c2i) for t in targets}
    return ImageTask(name, "ood", tr, tests, len(classes))


def parse_task_spec(spec: str, *, image_size: int = 224, download: bool = False) -> ImageTask:
    """Build a task from a command-line spec.

    Forms: ``cifar10:ROOT``, ``cifar100:ROOT``, ``folder:ROOT`` (train/ + test/ or val/),
    ``domains:ROOT:SOURCE[:T1,T2]`` (DomainNet-style OOD),
    ``variants:IMAGENET_TRAIN_ROOT:V1_ROOT,V2_ROOT`` (train on ImageNet, test on variants).

    Example:
        >>> parse_task_spec("folder:/data/dtd").name  # doctest: +SKIP
        'dtd'
    """
    kind, _, rest = spec.partition(":")
    if not rest:
        raise ValueError(f"task spec {spec!r} must look like KIND:ROOT[...]")
    if kind in ("cifar10", "cifar100"):
        return cifar_task(kind, rest, image_size=image_size, download=download)
    if kind == "folder":
        return imagefolder_task(pathlib.Path(rest).name, rest, image_size=image_size)
    if kind == "domains":
        parts = rest.split(":")
        if len(parts) < 2:
            raise ValueError(f"domains spec {spec!r} needs ROOT:SOURCE")
        targets = parts[2].split(",") if len(parts) > 2 and parts[2] else None
        return domain_task(pathlib.Path(parts[0]).name, parts[0], parts[1], targets=targets, image_size=image_size)
    if kind == "variants":
        train_root, _, variants = rest.partition(":")
        if not variants:
            raise ValueError(f"variants spec {spec!r} needs TRAIN_ROOT:V1,V2")
        tr = imagefolder_dataset(train_root, train=False, image_size=image_size)
        tests = {
            pathlib.Path(v).name: imagenet_variant_dataset(v, tr.class_to_idx, image_size=image_size)
            for v in variants.split(",")
        }
        return ImageTask("imagenet-variants", "ood", tr, tests, len(tr.classes))
    raise ValueError(f"unknown task kind {kind!r} in {spec!r}; expected cifar10, cifar100, folder, domains or variants")

"""Models and images from outside the package: torchvision models by name, image folders.

A model is named by a *spec*: a torchvision classification model
(``"vgg16"``, ``"resnet50"``, any name of ``torchvision.models.list_models()``)
or a factory, ``"package.module:function"`` or ``"path/to/file.py:function"``,
called without arguments.  Weights come from a local file, from torchvision's
cache when the file is already there, or are random (seeded, for tests);
nothing is ever downloaded.

Images are preprocessed as the weights expect (:func:`preprocessing_for`):
torchvision's weights with their own transforms
(``get_model_weights(name).<entry>.transforms()``: ResNet-50's current
weights resize to 232, EfficientNet-B3's to 320 with bicubic interpolation);
weights of unknown origin (a factory, a state-dict file torchvision does not
list, random weights) with the standard ImageNet evaluation transform, resize
to ``256/224`` of the crop, centre crop 224, bilinear, ImageNet mean and
standard deviation.  Each part can be overridden (``--resize``, ``--crop``,
``--interpolation`` on the command line).

Every image mode Pillow reads becomes RGB floats in ``[0, 1]`` without losing
range (:func:`read_image`): 8-bit modes (``1``, ``L``, ``P``, ``RGB``,
``RGBA``, ``CMYK``, ``LA``, ...) through Pillow's RGB conversion, alpha
dropped (the stored colour is kept, as torchvision's ``read_image`` does);
16-bit greyscale (``I;16*``) divided by 65535; 32-bit integers (``I``)
divided by 65535 when they lie in ``0..65535`` (how Pillow reads 16-bit
files), else scaled from their minimum to their maximum; floats (``F``, e.g.
a float TIFF) kept when they lie in ``[0, 1]``, else scaled from their minimum
to their maximum (a constant image is clipped to ``[0, 1]``).  A file that
cannot be read raises :class:`UnreadableImageError`, naming it.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import Tensor, nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .errors import InvalidDataError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "INTERPOLATIONS",
    "ImageFiles",
    "Preprocessing",
    "ResumableBatches",
    "UnreadableImageError",
    "class_names",
    "image_paths",
    "image_transform",
    "load_images",
    "load_model",
    "load_state_dict",
    "preprocessing_for",
    "read_image",
    "torchvision_cache_file",
    "torchvision_weights",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: ``--interpolation`` choices (torchvision's ``InterpolationMode`` values)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


class UnreadableImageError(InvalidDataError):
    """An image file that cannot be opened or decoded (missing, truncated, not an image).

    ``path`` is the file.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: cannot read this image ({reason})")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self.path), self.reason))


# ------------------------------------------------------------------- images
_EIGHT_BIT_MODES = ("1", "L", "P", "RGB", "RGBA", "CMYK", "LA", "PA", "La", "RGBa", "RGBX")


def image_to_rgb(image: Image.Image) -> Image.Image | Tensor:
    """RGB pixels of ``image``: an RGB image for 8-bit modes, else ``(3, H, W)`` floats in [0, 1].

    See the module docstring for how each mode is scaled.

    >>> image_to_rgb(Image.new("I;16", (2, 1), 65535)).tolist()
    [[[1.0, 1.0]], [[1.0, 1.0]], [[1.0, 1.0]]]
    >>> image_to_rgb(Image.new("F", (2, 1), 0.25))[0].tolist()
    [[0.25, 0.25]]
    """
    mode = image.mode
    if mode in _EIGHT_BIT_MODES or not (mode.startswith("I") or mode == "F"):
        return image if mode == "RGB" else image.convert("RGB")
    values = np.asarray(image).astype(np.float64)
    if values.ndim != 2:
        raise ValueError(f"unsupported {mode} image of shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"mode {mode} image with NaN or Inf values")
    low, high = float(values.min()), float(values.max())
    if mode.startswith("I;16") or (mode == "I" and low >= 0 and high <= 65535):
        values = values / 65535.0
    elif mode == "I" or low < 0 or high > 1:
        values = (values - low) / (high - low) if high > low else values.clip(0.0, 1.0)
    grey = torch.from_numpy(values.astype(np.float32))
    return grey.expand(3, *grey.shape).contiguous()


def read_image(path: str | os.PathLike[str]) -> Image.Image | Tensor:
    """Open, decode and convert an image file (:func:`image_to_rgb`); errors name the file."""
    try:
        with Image.open(path) as image:
            image.load()
            return image_to_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UnreadableImageError(path, f"{type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class Preprocessing:
    """Resize the short side, centre crop, scale to ``[0, 1]``, normalise: as the weights expect.

    The steps and their order are those of torchvision's ``ImageClassification``
    (its weights' ``transforms()``); ``resize`` or ``crop`` ``None`` skips that
    step.  Called on an RGB PIL image or a ``(3, H, W)`` float tensor in
    ``[0, 1]`` (:func:`read_image` gives either); :meth:`display` is the same
    without the normalisation.

    >>> p = Preprocessing.default(32)
    >>> p.resize, p.crop, p.interpolation
    (37, 32, 'bilinear')
    >>> p(Image.new("RGB", (64, 48), (255, 0, 0))).shape
    torch.Size([3, 32, 32])
    """

    resize: int | None = 256
    crop: int | None = 224
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    source: str = "default (ImageNet evaluation transform)"

    @classmethod
    def default(cls, crop: int = 224) -> Preprocessing:
        """The standard ImageNet evaluation transform at ``crop`` pixels (resize ``256/224``)."""
        return cls(resize=round(crop * 256 / 224), crop=crop)

    @classmethod
    def from_weights(cls, weights: Any) -> Preprocessing:
        """The transforms of a torchvision weights entry (``ResNet50_Weights.DEFAULT``, ...)."""
        transform = weights.transforms()
        resize, crop = transform.resize_size, transform.crop_size
        return cls(
            resize=int(resize[0]) if resize else None,
            crop=int(crop[0]) if crop else None,
            interpolation=InterpolationMode(transform.interpolation).value,
            mean=tuple(transform.mean),
            std=tuple(transform.std),
            source=f"torchvision's {weights}.transforms()",
        )

    def overridden(
        self, resize: int | None = None, crop: int | None = None, interpolation: str | None = None
    ) -> Preprocessing:
        """The same with the given parts replaced.

        A new ``crop`` without a new ``resize`` keeps the resize-to-crop ratio.

        >>> Preprocessing(resize=232, crop=224).overridden(crop=112).resize
        116
        """
        if resize is None and crop is not None and self.resize and self.crop:
            resize = round(crop * self.resize / self.crop)
        changes: dict[str, Any] = {
            k: v
            for k, v in (("resize", resize), ("crop", crop), ("interpolation", interpolation))
            if v is not None
        }
        if not changes:
            return self
        return replace(self, **changes, source=f"{self.source}, overridden: {changes}")

    def describe(self) -> str:
        """One line: the steps and where they come from."""
        return (
            f"resize {self.resize}, centre crop {self.crop}, {self.interpolation}, "
            f"mean {list(self.mean)}, std {list(self.std)} ({self.source})"
        )

    def display(self, image: Image.Image | Tensor) -> Tensor:
        """Resize and crop ``image`` into a ``(3, crop, crop)`` float tensor in ``[0, 1]``."""
        mode = InterpolationMode(self.interpolation)
        if self.resize is not None:
            image = TF.resize(image, [self.resize], interpolation=mode, antialias=True)
        if self.crop is not None:
            image = TF.center_crop(image, [self.crop])
        if isinstance(image, Tensor):
            return image.float().clamp(0.0, 1.0)
        return TF.convert_image_dtype(TF.pil_to_tensor(image), torch.float)

    def __call__(self, image: Image.Image | Tensor) -> Tensor:
        """:meth:`display`, then normalised with ``mean`` and ``std``."""
        return TF.normalize(self.display(image), list(self.mean), list(self.std))


def image_transform(
    image_size: int = 224, normalize: bool = True
) -> Callable[[Image.Image | Tensor], Tensor]:
    """The standard ImageNet evaluation transform at ``image_size`` pixels.

    Resize the short side to ``round(image_size * 256 / 224)``, centre crop
    ``image_size``, to a tensor in ``[0, 1]`` and, with ``normalize``, subtract
    the ImageNet mean and divide by its standard deviation
    (:meth:`Preprocessing.default`).

    >>> image = Image.new("RGB", (64, 48), (255, 0, 0))
    >>> x = image_transform(32)(image)
    >>> x.shape, round(float(x[0, 0, 0]), 3)
    (torch.Size([3, 32, 32]), 2.249)
    """
    preprocessing = Preprocessing.default(image_size)
    return preprocessing if normalize else preprocessing.display


def image_paths(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Image files: files as given, folders searched recursively in sorted order.

    A folder in ``ImageFolder`` layout (one subfolder per class) is read in
    the order ``torchvision.datasets.ImageFolder`` reads it.  Only files count:
    a sub-folder named ``album.png`` is searched, not opened.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files = (p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            found += sorted(
                (p for p in files if p.is_file()), key=lambda p: p.relative_to(path).parts
            )
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return found


class ImageFiles(Dataset):
    """Image files as a dataset of ``(image, index)``; see :func:`image_paths`.

    Each file goes through :func:`read_image` (an unreadable one raises
    :class:`UnreadableImageError`), then ``transform``, which gets an RGB PIL
    image or a ``(3, H, W)`` float tensor (a :class:`Preprocessing` takes both).

    >>> ImageFiles([], image_transform(32)).__len__()
    0
    """

    def __init__(
        self,
        paths: Iterable[str | os.PathLike[str]],
        transform: Callable[[Any], Tensor],
        search: bool = True,
    ) -> None:
        self.paths = image_paths(paths) if search else [Path(p) for p in paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.transform(read_image(self.paths[index])), index


def load_images(
    paths: Sequence[str | os.PathLike[str]],
    image_size: int = 224,
    preprocessing: Preprocessing | None = None,
) -> tuple[Tensor, Tensor]:
    """A batch of images: ``(normalised, for_display)``, both ``(N, 3, S, S)``.

    ``for_display`` is the same crop in ``[0, 1]``, before normalisation;
    ``preprocessing`` defaults to :meth:`Preprocessing.default` at ``image_size``.
    """
    files = image_paths(paths)
    if not files:
        raise FileNotFoundError(f"no image files in {[str(p) for p in paths]}")
    steps = preprocessing or Preprocessing.default(image_size)
    shown = torch.stack([steps.display(read_image(p)) for p in files])
    mean = torch.tensor(steps.mean).reshape(1, -1, 1, 1)
    std = torch.tensor(steps.std).reshape(1, -1, 1, 1)
    return (shown - mean) / std, shown


class _Tolerant(Dataset):
    """``dataset[i]`` as ``(item, None)``, or ``(None, (path, reason))`` for an unreadable image."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, tuple[str, str] | None]:
        try:
            return self.dataset[index], None
        except UnreadableImageError as exc:
            return None, (str(exc.path), exc.reason)


def _collate(items: list[tuple[Any, tuple[str, str] | None]]) -> tuple[Any, list[tuple[str, str]]]:
    good = [item for item, bad in items if bad is None]
    bad = [bad for _, bad in items if bad is not None]
    return (default_collate(good) if good else None), bad


class ResumableBatches:
    """The batches of a dataset in order, as a ``DataLoader`` yields them; bad images left out.

    Batch ``j`` holds the items ``j·b .. (j+1)·b − 1`` whatever happens to the
    others.  An item whose image cannot be read (:class:`UnreadableImageError`:
    removed, truncated, not an image) is left out of its batch and passed to
    ``on_unreadable`` (default: raise it); a batch left empty is not yielded
    and its index goes to ``on_dropped``.

    For a resumed fit the first ``skip`` yielded batches are already
    accounted for: they are not read from disk, and the first readable batch
    stands in for them (the fitter skips them; it reads the first batch to
    learn the model's structure).  ``dropped`` lists the batches the earlier
    run dropped, so that the fit continues with the right batch.

    >>> data = torch.utils.data.TensorDataset(torch.arange(10.0))
    >>> [b[0].tolist() for b in ResumableBatches(data, batch_size=4, skip=2)]
    [[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0], [8.0, 9.0]]
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        workers: int = 0,
        pin_memory: bool = False,
        skip: int = 0,
        on_unreadable: Callable[[UnreadableImageError], None] | None = None,
        dropped: Iterable[int] = (),
        on_dropped: Callable[[int], None] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.workers = workers
        self.pin_memory = pin_memory
        self.skip = skip
        self.on_unreadable = on_unreadable
        self.dropped = set(dropped)
        self.on_dropped = on_dropped

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)  # type: ignore[arg-type]

    def _indices(self, batch: int) -> list[int]:
        stop = min((batch + 1) * self.batch_size, len(self.dataset))  # type: ignore[arg-type]
        return list(range(batch * self.batch_size, stop))

    def _batches(self, start: int, quiet: bool = False) -> Iterator[Any]:
        loader = DataLoader(
            _Tolerant(self.dataset),
            batch_sampler=[self._indices(j) for j in range(start, len(self))],
            collate_fn=_collate,
            num_workers=0 if quiet else self.workers,
            pin_memory=self.pin_memory and not quiet,
        )
        for j, (batch, bad) in enumerate(loader, start=start):
            for path, reason in [] if quiet else bad:
                error = UnreadableImageError(path, reason)
                if self.on_unreadable is None:
                    raise error
                self.on_unreadable(error)
            if batch is not None:
                yield batch
            elif not quiet and self.on_dropped is not None:
                self.on_dropped(j)

    def _position(self) -> int:
        """The batch that follows the first ``skip`` batches the earlier run yielded."""
        yielded = 0
        for j in range(len(self)):
            if yielded == self.skip:
                return j
            yielded += j not in self.dropped
        return len(self)

    def __iter__(self) -> Iterator[Any]:
        if self.skip == 0:
            yield from self._batches(0)
            return
        first = next(self._batches(0, quiet=True), None)
        if first is None:
            return
        for _ in range(min(self.skip, len(self))):  # a damaged count must not run for ever
            yield first
        yield from self._batches(self._position())


# ------------------------------------------------------------------- models
def torchvision_cache_file(name: str) -> Path:
    """Where torchvision keeps the default weights of model ``name`` once downloaded.

    >>> torchvision_cache_file("resnet18").name
    'resnet18-f37072fd.pth'
    """
    weights = torchvision.models.get_model_weights(name).DEFAULT
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def torchvision_weights(spec: str, weights: str | os.PathLike[str] | None = None) -> Any | None:
    """The torchvision weights entry a model's weights are, or ``None`` when unknown.

    For a torchvision model name: its ``DEFAULT`` entry when ``weights`` is
    ``None`` (the cache file :func:`load_model` reads), the entry whose file
    name matches ``weights`` (torchvision names its files after the entry's
    URL, e.g. ``resnet50-11ad3fa6.pth``), else ``None``: a factory, random
    weights, or a state-dict file torchvision does not list.

    >>> torchvision_weights("resnet50")
    ResNet50_Weights.IMAGENET1K_V2
    >>> torchvision_weights("resnet50", "/somewhere/resnet50-0676ba61.pth")
    ResNet50_Weights.IMAGENET1K_V1
    >>> torchvision_weights("resnet50", "finetuned.pth") is None
    True
    """
    if ":" in spec or str(weights) == "random":
        return None
    try:
        entries = torchvision.models.get_model_weights(spec)
    except (ValueError, KeyError):
        return None
    if weights is None:
        return entries.DEFAULT  # type: ignore[attr-defined]
    name = Path(weights).name
    return next((e for e in entries if Path(e.url).name == name), None)  # type: ignore[attr-defined]


def preprocessing_for(
    spec: str,
    weights: str | os.PathLike[str] | None = None,
    resize: int | None = None,
    crop: int | None = None,
    interpolation: str | None = None,
) -> Preprocessing:
    """How images are prepared for the model ``spec`` with the ``weights`` of :func:`load_model`.

    torchvision's own weights (:func:`torchvision_weights`) bring their
    transforms; anything else gets :meth:`Preprocessing.default`.  ``resize``,
    ``crop`` and ``interpolation`` override the parts given.

    >>> p = preprocessing_for("resnet50")
    >>> p.resize, p.crop, p.source
    (232, 224, "torchvision's ResNet50_Weights.IMAGENET1K_V2.transforms()")
    >>> preprocessing_for("resnet50", "random", crop=32).resize
    37
    """
    entry = torchvision_weights(spec, weights)
    base = Preprocessing.default() if entry is None else Preprocessing.from_weights(entry)
    return base.overridden(resize, crop, interpolation)


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """A state dict from a ``.pth``/``.pt`` file (loaded with ``weights_only``) or ``.safetensors``.

    A checkpoint dict holding it under ``"state_dict"`` or ``"model"`` is
    unwrapped; the prefixes ``module.`` (``DataParallel``/``DistributedDataParallel``)
    and ``_orig_mod.`` (``torch.compile``), in any nesting, are removed with
    PyTorch's ``consume_prefix_in_state_dict_if_present`` when every key has them.
    """
    path = Path(path)
    state: Any
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(
                f"{path}: not a state dict that loads with weights_only=True ({exc}); save "
                "model.state_dict() rather than the model object"
            ) from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict")
    stripped = True
    while stripped:
        stripped = False
        for prefix in ("module.", "_orig_mod."):
            if state and all(isinstance(k, str) and k.startswith(prefix) for k in state):
                consume_prefix_in_state_dict_if_present(state, prefix)
                stripped = True
    return state


def _factory(spec: str) -> Callable[[], nn.Module]:
    target, _, attribute = spec.rpartition(":")
    if target.endswith(".py"):
        file = Path(target)
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no such file (model spec {spec!r})")
        module_spec = importlib.util.spec_from_file_location(file.stem, file)
        if module_spec is None or module_spec.loader is None:
            raise ImportError(f"cannot import {file}")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise AttributeError(f"{target} has no {attribute!r} (model spec {spec!r})") from None


def _torchvision(name: str, num_classes: int | None) -> nn.Module:
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"{name!r} is not a torchvision classification model{hint} (or give a factory as "
            "'package.module:function' or 'file.py:function')"
        )
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    return torchvision.models.get_model(name, weights=None, **kwargs)


def load_model(
    spec: str,
    weights: str | os.PathLike[str] | None = None,
    num_classes: int | None = None,
    seed: int = 0,
) -> nn.Module:
    """Build the model ``spec`` names and load its weights, never downloading; eval mode.

    Parameters
    ----------
    spec:
        A torchvision model name, ``"package.module:function"`` or
        ``"path/to/file.py:function"`` (called without arguments).
    weights:
        A state-dict file; ``"random"`` for the seeded initial weights; or
        ``None``: for a torchvision model the default weights from
        torchvision's cache (:func:`torchvision_cache_file`), which must already
        be there; for a factory, the weights it sets.
    num_classes:
        For a torchvision model: the size of its last layer (default 1000).
    seed:
        Seeds the initial weights (the global random state is left as it was).

    Examples
    --------
    >>> model = load_model("resnet18", weights="random", num_classes=10)
    >>> model(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 10])
    """
    is_factory = ":" in spec
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _factory(spec)() if is_factory else _torchvision(spec, num_classes)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{spec} returned a {type(model).__name__}, not an nn.Module")
    if weights is None and not is_factory:
        cached = torchvision_cache_file(spec)
        if not cached.is_file():
            raise FileNotFoundError(
                f"no weights for {spec}: {cached} is not there and nothing is downloaded. "
                "Give --weights FILE (a state dict), put the file in torchvision's cache "
                f"(python -c \"import torchvision; torchvision.models.get_model('{spec}', "
                "weights='DEFAULT')\" on a machine with internet), or --weights random"
            )
        weights = cached
    if weights is not None and str(weights) != "random":
        model.load_state_dict(load_state_dict(weights))
    return model.eval()


def class_names(
    spec: str, model: nn.Module, labels: str | os.PathLike[str] | None = None
) -> list[str] | None:
    """Class names: one per line of ``labels``, or ImageNet's for a 1000-class torchvision model."""
    if labels is not None:
        return [line.strip() for line in Path(labels).read_text().splitlines() if line.strip()]
    if ":" in spec:
        return None
    categories = torchvision.models.get_model_weights(spec).DEFAULT.meta.get("categories")
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if categories and last and last[-1].out_features == len(categories):
        return list(categories)
    return None

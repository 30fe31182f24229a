"""Image preprocessing: the paper's RESIZE_LARGE, or the model's own eval transform.

RESIZE_LARGE keeps the whole image: the larger side becomes R (small images are upscaled), PIL
bicubic, then to tensor and normalised with the model's mean/std. ViT-style models then get zero
padding (after normalisation) up to a multiple of their patch size, the floor half before and the
rest after, and run at that size with interpolated positional embeddings. Padded sizes take few
values (R is fixed, the other side rounds up to a patch multiple), which is what lets the loop
batch images of equal padded size together.
"""

from __future__ import annotations

from PIL import Image

from ..models.factory import torch

F = torch.nn.functional


def resize_large_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The (W, H) that RESIZE_LARGE gives an image of (width, height): the reference's exact rounding."""
    ar = height / width
    if ar <= 1:
        return resolution, max(1, int(resolution * ar))
    return max(1, int(resolution / ar)), resolution


def pad_amounts(size: int, multiple: int) -> tuple[int, int]:
    """(before, after) zero padding that brings `size` to the next multiple."""
    pad = -size % multiple
    return pad // 2, pad - pad // 2


def padded_size(width: int, height: int, resolution: int, multiple: int | None) -> tuple[int, int]:
    """The (W, H) of the tensor the model sees for an image of (width, height)."""
    w, h = resize_large_size(width, height, resolution)
    if multiple:
        w, h = w + sum(pad_amounts(w, multiple)), h + sum(pad_amounts(h, multiple))
    return w, h


class ResizeLarge:
    """PIL image -> normalised (and padded) float tensor, the paper's preprocessing."""

    name = "resize_large"

    def __init__(self, resolution: int, mean, std, multiple: int | None = None):
        self.resolution, self.multiple = int(resolution), multiple
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, img: Image.Image):
        size = resize_large_size(img.width, img.height, self.resolution)
        img = img.resize(size, Image.Resampling.BICUBIC)
        # what torchvision's to_tensor does, without the dependency in the worker's hot path
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3)
        x = (x.permute(2, 0, 1).float() / 255 - self.mean) / self.std
        if self.multiple:
            top, bottom = pad_amounts(x.shape[1], self.multiple)
            left, right = pad_amounts(x.shape[2], self.multiple)
            x = F.pad(x, (left, right, top, bottom))
        return x

    def __repr__(self) -> str:
        return f"ResizeLarge(resolution={self.resolution}, multiple={self.multiple})"


class ModelTransform:
    """The model's own eval transform (resize + center crop, as its framework defines it)."""

    name = "model"

    def __init__(self, encoder):
        self.fn = _framework_transform(encoder)

    def __call__(self, img: Image.Image):
        return self.fn(img)

    def __repr__(self) -> str:
        return f"ModelTransform({self.fn})"


def _framework_transform(encoder):
    spec = encoder.spec
    if spec.framework == "timm":
        import timm.data

        return timm.data.create_transform(**timm.data.resolve_data_config({}, model=encoder.backbone))
    if spec.framework == "open_clip":
        import open_clip

        return open_clip.image_transform(encoder.backbone.image_size, is_train=False, mean=spec.mean, std=spec.std)
    import torchvision.transforms as T

    return T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(spec.mean, spec.std)])


def make_transform(encoder, kind: str = "resize_large", resolution: int | None = None):
    """`resize_large` (the paper; R from the registry unless given) or `model` (the framework's own)."""
    if kind == "resize_large":
        return ResizeLarge(resolution or encoder.spec.resolution, encoder.mean, encoder.std, encoder.patch)
    if kind == "model":
        return ModelTransform(encoder)
    raise ValueError(f"transform: {kind!r} is not one of resize_large, model")

"""A card's resize of the data: what it does and the factor it puts in the input-radius bound.

An encoder whose card fixes an input size (a pretrained network at 32 or 224 px) resizes every
image first (:class:`gmcert.data.Resize`). That map is linear (then a 1-Lipschitz clamp), so it
multiplies the encoder's Lipschitz bound by its operator norm, the product of the two 1-D
interpolation matrices' norms: the same factor :mod:`gmcert.bounds.lipschitz` multiplies in.
Commands print it and record it (``resize`` in ``pipeline.json``, ``train.json`` and certify's
JSON summary), so that no resize is silent.
"""
from __future__ import annotations

from gmcert.bounds.lipschitz import _SLACK, _interp_matrix_norm


def resize_norm(in_hw, out_hw, interpolation: str) -> float:
    """The L2 operator norm bound of resizing ``in_hw`` -> ``out_hw`` px (1 when they are equal)."""
    (h, w), (oh, ow) = (tuple(int(v) for v in hw) for hw in (in_hw, out_hw))
    if (h, w) == (oh, ow):
        return 1.0
    antialias = interpolation != "nearest" and (oh < h or ow < w)  # as gmcert.data.resize_images does
    return _interp_matrix_norm(h, oh, interpolation, antialias) * _interp_matrix_norm(w, ow, interpolation,
                                                                                    antialias) * _SLACK


def resize_record(card, image_hw) -> dict | None:
    """What ``card``'s encoder does to ``image_hw`` images: None when it keeps their size, else
    ``{"from": [h, w], "to": [H, W], "interpolation", "norm", "card"}``."""
    image_hw, size = [int(v) for v in image_hw], [int(v) for v in card.input_size[1:]]
    if image_hw == size:
        return None
    return {"from": image_hw, "to": size, "interpolation": card.interpolation,
            "norm": resize_norm(image_hw, size, card.interpolation), "card": card.name}


def describe_resize(record, image_hw=None) -> str:
    """One line for a command to print."""
    if record is None:
        size = f" ({image_hw[0]}x{image_hw[1]} px)" if image_hw is not None else ""
        return f"input at the data's native size{size}: no resize"
    (h, w), (oh, ow) = record["from"], record["to"]
    return (f"resizing the data {h}x{w} -> {oh}x{ow} px ({record['interpolation']}; the size card {record['card']} "
            f"fixes): its norm {record['norm']:.6g} multiplies the encoder's Lipschitz bound")

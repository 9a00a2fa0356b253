"""Geometry: where the video and text sit in a [B, S, H, D] sequence. The one geometry type of tilewise's Python
side, shared by the diffusers integration (what a tapped call sees) and calibration (captures, searches)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from tilewise import _args, _capi


@dataclass(frozen=True)
class Geometry:
    """latent: (T, H, W) latent tokens; tile: (tt, th, tw) tokens; text_len: valid text tokens (None = all of the
    S - T*H*W text positions, an int for every batch element, or one per batch element); text_position: "last"
    ([video | text]) or "first"; layout: "bshd" or "bhsd"; scale: None = 1/sqrt(D). Integers only (never
    truncated); the tile grid comes from the library."""

    latent: tuple
    tile: tuple = (6, 8, 8)
    text_len: Union[None, int, tuple] = None
    text_position: str = "last"
    layout: str = "bshd"
    scale: Optional[float] = None

    def __post_init__(self):
        object.__setattr__(self, "latent", _args.triple("latent", self.latent))
        object.__setattr__(self, "tile", _args.triple("tile", self.tile))
        _capi.tile_grid(self.latent, self.tile)  # sizes >= 1, checked by the library
        if self.text_len is not None:
            value = tuple(_args.int_list("text_len", self.text_len)) if _args.is_sequence(self.text_len) \
                else _args.integer("text_len", self.text_len)
            object.__setattr__(self, "text_len", value)
        _args.choice("text_position", self.text_position, _capi.TEXT_POSITIONS)
        _args.choice("layout", self.layout, _capi.LAYOUTS)
        if self.scale is not None:
            object.__setattr__(self, "scale", _args.scale_arg(self.scale))

    @property
    def grid(self) -> tuple:
        """Tiles per axis: ceil(latent / tile), from the library."""
        return _capi.tile_grid(self.latent, self.tile)

    @property
    def video_tokens(self) -> int:
        return _args.volume(self.latent)

    def effective_window(self, window) -> tuple:
        """A window as it acts on this grid (each axis clamped to the tiles there are), from the library."""
        return _capi.effective_window(self.latent, self.tile, _args.window("window", window))

    def text_len_list(self, batch: int):
        """text_len as one int per batch element, or None (all text positions valid)."""
        if self.text_len is None:
            return None
        if isinstance(self.text_len, int):
            return [self.text_len] * batch
        return list(self.text_len)

    def kwargs(self) -> dict:
        """Keyword arguments of the tilewise attention functions."""
        return dict(latent=self.latent, tile=self.tile, text_position=self.text_position, layout=self.layout,
                    scale=self.scale)

    def to_json(self) -> dict:
        return {"latent": list(self.latent), "tile": list(self.tile),
                "text_len": self.text_len if self.text_len is None or isinstance(self.text_len, int)
                else list(self.text_len),
                "text_position": self.text_position, "layout": self.layout, "scale": self.scale}

    @staticmethod
    def from_json(d: dict) -> "Geometry":
        return Geometry(latent=d["latent"], tile=d["tile"], text_len=d.get("text_len"),
                        text_position=d.get("text_position", "last"), layout=d.get("layout", "bshd"),
                        scale=d.get("scale"))

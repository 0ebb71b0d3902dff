"""How a label store keeps each view's teacher label: all C fp16 logits, per-row quantised codes, or top-k.

At ImageNet scale the stored soft labels, not the images, are the bytes (LPQLD: 5.67 GB of full fp16
labels at ImageNet-1K IPC 10 against 0.13 GB compressed). An *encoding* says which label tensors one
stored epoch holds instead of the plain ``logits float16 (n, C)``, and how a replayed batch turns them
back into the ``(n, C)`` teacher "logits" the soft loss ``KL(softmax(t/T) || softmax(s/T))`` reads
(docs/label-store.md, Label encodings). Every rule is per row (per stored view), so encoding commutes
with LPLD's pruning (which keeps whole rows): ``encode(prune(store)) == prune(encode(store))``.

Two knobs, combinable:

``topk`` = k (``decoct relabel --label-topk K``, ``k < C``): keep k of the C classes per view, with
their class ids as int16 (``topk_ids (n, k)``, largest first), and one of two *fills* for the others:

* ``zero`` -- LPQLD's MR-k (``train_FKD_LPQLD.py``, ``--label_quantization MR-k``; the reference notes
  rded-scores-labels.md §3.1): the k largest *pre-softmax logits* are kept; at training time the
  target is ``softmax(topk_logits / T)`` over those k at the loss's current temperature T and exactly
  0 for the other C-k classes. Decoded as logits with :data:`DROPPED_LOGIT` (-1e30) for the dropped
  classes, whose probability at any temperature above ~1e-8 is exactly 0 in float32, so the
  unchanged soft loss computes MR-k. The stored values serve every temperature.
* ``spread`` -- FKD's "marginal smoothing" (``szq0214/FKD`` ``utils_FKD.py``; §3.2): the k largest
  *probabilities* ``softmax(z / T_s)`` are kept, and the remaining mass ``1 - sum(top-k)`` is spread
  evenly over the other C-k classes (clamped at 0 when fp16 rounding makes the k sum above 1).
  **Temperature:** FKD takes the probabilities at its student's temperature (teacher T = 1, student
  temp = 1), so decoct takes them at the soft protocol's temperature ``T_s`` (the dataset's recipe:
  30 CIFAR, 20 Tiny-ImageNet and ImageNet; recorded as ``temperature``). The decoded "logits" are
  ``T_s * log(p)``: at the training temperature ``T = T_s`` (the default) the loss's target is FKD's
  vector exactly; at another ``T`` it is that vector re-tempered, ``p^(T_s/T)`` renormalised.

``bits`` (``--label-bits 8|4``; 16, the default, keeps fp16 values) -- one step past both references:
the values of each row (the C logits, or the k kept values) are quantised to ``2^bits - 1`` levels,
``value ~= qzero + qscale * code``, with the row's ``qscale`` and ``qzero`` stored as **float16**
(4 bytes per row). ``qzero`` is the largest fp16 <= the row minimum and ``qscale`` the smallest fp16
>= (max - qzero) / (2^bits - 1), so every value lies on the row's grid and decodes within
``qscale / 2`` of the fp16 value it came from (float32 arithmetic aside). 4-bit codes are packed two
per byte, value 2j in the low nibble and 2j+1 in the high one (an odd row ends with a zero nibble).
Encoding always starts from the fp16 logits a plain store holds, so relabelling straight into an
encoding equals relabelling and then encoding the store (``decoct relabel RUN --label-bits 8``).

Bytes per stored view (row), C classes, k kept (the tensors listed):

==================  =====================================  =================================
encoding            tensors                                bytes per row
==================  =====================================  =================================
``fp16``            ``logits`` f16 (n, C)                  ``2C``
``q8``              ``codes`` u8 (n, C), ``qscale``,       ``C + 4``
                    ``qzero`` f16 (n,)
``q4``              ``codes`` u8 (n, ceil(C/2)) + the two  ``ceil(C/2) + 4``
``top{k}-{fill}-fp16``  ``topk_ids`` i16 (n, k),           ``4k``
                    ``topk_values`` f16 (n, k)
``top{k}-{fill}-q8``    ``topk_ids``, ``codes`` u8 (n, k), ``3k + 4``
                    ``qscale``, ``qzero``
``top{k}-{fill}-q4``    ``topk_ids``, ``codes`` u8         ``2k + ceil(k/2) + 4``
                    (n, ceil(k/2)), ``qscale``, ``qzero``
==================  =====================================  =================================

Quirks of the references not copied (§3): LPQLD's ``MS-k`` (help text promises smoothing, code scatters
raw values) and ``MRS-k`` (needs a ``sample_min`` the generator never saves); FKD's ``marginal_renorm``
name mismatch; FKD's float class ids (ids here are int16, so C <= 32767 for top-k).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "BITS",
    "DROPPED_LOGIT",
    "FILLS",
    "KNOWN_FORMATS",
    "PLAIN",
    "LabelEncoding",
    "dequantize_rows",
    "pack4",
    "quantize_rows",
    "unpack4",
]

BITS = (16, 8, 4)
"""Value widths: 16 keeps fp16 values; 8 and 4 store per-row quantised codes."""
FILLS = ("zero", "spread")
"""What the classes outside the top k get: ``zero`` (LPQLD MR-k) or ``spread`` (FKD marginal smoothing)."""
DROPPED_LOGIT = -1.0e30
"""Decoded logit of a class a ``zero``-fill store does not keep: probability exactly 0 after softmax(./T)."""
MAX_TOPK_CLASSES = 32767
"""Top-k class ids are int16 (LPQLD's ``.short()``)."""
KNOWN_FORMATS = "fp16, q8, q4, top<k>-zero-<fp16|q8|q4>, top<k>-spread-<fp16|q8|q4>"
_NAME_RE = re.compile(r"^(?:top([1-9][0-9]*)-(zero|spread)-)?(fp16|q8|q4)$")
_KEYS = {"name", "topk", "fill", "bits", "values", "temperature", "row_params"}


def _unknown(name: Any) -> ValueError:
    return ValueError(f"label store format {str(name)[:60]!r} is not known to this decoct (it reads {KNOWN_FORMATS}); "
                      "update decoct, or relabel the set with this version")


@dataclass(frozen=True)
class LabelEncoding:
    """One label encoding (see the module docstring); ``LabelEncoding()`` is the plain fp16 store.

    Raises ValueError naming the ``decoct relabel`` option for a bad combination: ``bits`` not in
    {16, 8, 4}, ``topk`` < 1, a ``fill`` without ``topk`` or not in :data:`FILLS`, a ``spread`` fill
    without a positive ``temperature``. ``topk < C`` is checked by :meth:`check_classes`, which needs C.
    """

    topk: int | None = None
    fill: str | None = None
    bits: int = 16
    temperature: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise ValueError(f"--label-bits must be 8 or 4 (or 16, the default: fp16 values), got {self.bits!r}")
        if self.topk is None:
            if self.fill is not None:
                raise ValueError("--label-fill says what the classes outside the top k get; it needs --label-topk K")
        else:
            if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 1:
                raise ValueError(f"--label-topk must be an integer >= 1, got {self.topk!r}")
            if self.fill is None:
                object.__setattr__(self, "fill", "zero")
            if self.fill not in FILLS:
                raise ValueError(f"--label-fill must be one of {', '.join(FILLS)}, got {self.fill!r}")
        if self.fill == "spread":
            t = self.temperature
            if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t <= 0:
                raise ValueError(f"a spread-fill store needs the positive temperature its probabilities are taken "
                                 f"at, got {t!r}")
            object.__setattr__(self, "temperature", float(t))
        elif self.temperature is not None:
            raise ValueError("a temperature belongs to spread-fill stores only (their stored probabilities); "
                             "zero-fill and full stores keep logits")

    # ------------------------------------------------------------------ description
    @property
    def plain(self) -> bool:
        """All C logits in fp16: the store format every decoct reads (header version 1)."""
        return self.topk is None and self.bits == 16

    @property
    def name(self) -> str:
        """``fp16``, ``q8``, ``q4``, ``top5-zero-fp16``, ``top2-spread-q4``, ..."""
        base = "fp16" if self.bits == 16 else f"q{self.bits}"
        return base if self.topk is None else f"top{self.topk}-{self.fill}-{base}"

    @property
    def values(self) -> str:
        """What the stored values are: ``logits``, or ``probabilities`` (spread fill)."""
        return "probabilities" if self.fill == "spread" else "logits"

    def to_dict(self) -> dict[str, Any]:
        """The header's ``encoding`` entry."""
        return {"name": self.name, "topk": self.topk, "fill": self.fill, "bits": self.bits, "values": self.values,
                "temperature": self.temperature, "row_params": "float16" if self.bits < 16 else None}

    @classmethod
    def from_dict(cls, d: Any) -> LabelEncoding:
        """The encoding a header names; anything this version does not know raises ValueError naming it."""
        if not isinstance(d, dict):
            raise _unknown(d)
        name = d.get("name")
        if set(d) - _KEYS or not isinstance(name, str) or not _NAME_RE.match(name):
            raise _unknown(name if isinstance(name, str) else d)
        try:
            enc = cls(topk=d.get("topk"), fill=d.get("fill"), bits=d.get("bits", 16),
                      temperature=d.get("temperature"))
        except ValueError as e:
            raise ValueError(f"label store format {name!r}: {e}") from e
        if enc.to_dict() != {**enc.to_dict(), **{k: d[k] for k in d}}:
            raise _unknown(name)
        return enc

    @staticmethod
    def check_name(name: Any) -> None:
        """Raise ValueError unless ``name`` is a format this version reads (a manifest's record)."""
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise _unknown(name)

    def check_classes(self, num_classes: int) -> None:
        """Top-k must keep fewer than C classes, with ids that fit int16."""
        if self.topk is None:
            return
        if self.topk >= num_classes:
            raise ValueError(f"--label-topk {self.topk} must be below the number of classes ({num_classes}); "
                             "keeping every class is the full store: drop --label-topk")
        if num_classes > MAX_TOPK_CLASSES:
            raise ValueError(f"--label-topk stores class ids as int16, so at most {MAX_TOPK_CLASSES} classes; "
                             f"this set has {num_classes}")

    # ------------------------------------------------------------------ sizes
    def width(self, num_classes: int) -> int:
        """Values kept per row: k, or C."""
        return self.topk if self.topk is not None else num_classes

    def specs(self, rows: int, num_classes: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """(dtype, shape) of each label tensor of ``rows`` stored views."""
        m = self.width(num_classes)
        out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        if self.topk is not None:
            out["topk_ids"] = (torch.int16, (rows, m))
        if self.bits == 16:
            out["logits" if self.topk is None else "topk_values"] = (torch.float16, (rows, m))
        else:
            out["codes"] = (torch.uint8, (rows, m if self.bits == 8 else (m + 1) // 2))
            out["qscale"] = (torch.float16, (rows,))
            out["qzero"] = (torch.float16, (rows,))
        return out

    def row_bytes(self, num_classes: int) -> int:
        """Bytes of one stored view's label (the table of the module docstring)."""
        m = self.width(num_classes)
        ids = 2 * m if self.topk is not None else 0
        if self.bits == 16:
            return ids + 2 * m
        return ids + (m if self.bits == 8 else (m + 1) // 2) + 4

    # ------------------------------------------------------------------ encode / decode
    def encode(self, logits: Tensor) -> dict[str, Tensor]:
        """The label tensors of ``logits`` (n, C), taken as fp16 first (what a plain store holds), on the CPU."""
        half = logits.detach().cpu().to(torch.float16)
        if self.plain:
            return {"logits": half.contiguous()}
        n, c = half.shape
        self.check_classes(c)
        x = half.float()
        out: dict[str, Tensor] = {}
        if self.topk is not None:
            src = torch.softmax(x / float(self.temperature), dim=1) if self.fill == "spread" else x
            vals, ids = torch.topk(src, self.topk, dim=1, largest=True, sorted=True)
            out["topk_ids"] = ids.to(torch.int16).contiguous()
        else:
            vals = x
        if self.bits == 16:
            out["logits" if self.topk is None else "topk_values"] = vals.to(torch.float16).contiguous()
            return out
        codes, scale, zero = quantize_rows(vals, self.bits)
        out["codes"] = pack4(codes) if self.bits == 4 else codes
        out["qscale"], out["qzero"] = scale, zero
        return out

    def values_of(self, t: dict[str, Tensor], num_classes: int) -> Tensor:
        """The kept values (n, width) in float32: fp16 values as they are, codes dequantised."""
        if self.bits == 16:
            return t["logits" if self.topk is None else "topk_values"].float()
        codes = t["codes"]
        if self.bits == 4:
            codes = unpack4(codes, self.width(num_classes))
        return dequantize_rows(codes, t["qscale"], t["qzero"])

    def decode(self, t: dict[str, Tensor], num_classes: int) -> Tensor:
        """(n, C) teacher logits for the soft loss from one stored batch's label tensors.

        The plain store's fp16 logits are returned as they are; otherwise float32: dequantised logits;
        top-k zero fill: the kept logits and :data:`DROPPED_LOGIT`; spread fill: ``T_s * log(p)`` of FKD's
        smoothed vector (see the module docstring). Raises ValueError for class ids outside [0, C).
        """
        if self.plain:
            return t["logits"]
        vals = self.values_of(t, num_classes)
        if self.topk is None:
            return vals
        ids = t["topk_ids"].long()
        n, c = int(ids.shape[0]), int(num_classes)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= c):
            raise ValueError(f"top-k class ids outside [0, {c}) in the label store")
        if self.fill == "zero":
            return torch.full((n, c), DROPPED_LOGIT).scatter_(1, ids, vals)
        p = vals.clamp(min=0.0)
        rest = (1.0 - p.sum(dim=1, keepdim=True)).clamp(min=0.0) / (c - self.topk)
        probs = rest.expand(n, c).clone().scatter_(1, ids, p)
        return torch.where(probs > 0, float(self.temperature) * probs.log(), torch.tensor(DROPPED_LOGIT))


PLAIN = LabelEncoding()
"""The plain store: all C logits in fp16."""


# ---------------------------------------------------------------------- per-row quantisation
def _fp16_step(h: Tensor, up: bool) -> Tensor:
    """The next float16 above (``up``) or below each finite ``h``, by stepping its bit pattern."""
    b = h.view(torch.int16).to(torch.int32)
    if up:  # h >= 0 here (scales): +0 -> smallest subnormal
        nb = torch.where(b >= 0, b + 1, torch.where(b == -32768, torch.ones_like(b), b - 1))
    else:  # positive: one less; +0: the negative smallest subnormal (0x8001); negative (and -0): one more
        nb = torch.where(b > 0, b - 1, torch.where(b == 0, torch.full_like(b, -32767), b + 1))
    return nb.to(torch.int16).view(torch.float16)


def _fp16_floor(x: Tensor) -> Tensor:
    """The largest float16 <= each float32 ``x``."""
    h = x.to(torch.float16)
    return torch.where(h.float() > x, _fp16_step(h, up=False), h)


def _fp16_ceil(x: Tensor) -> Tensor:
    """The smallest float16 >= each non-negative float32 ``x``."""
    h = x.to(torch.float16)
    return torch.where(h.float() < x, _fp16_step(h, up=True), h)


def quantize_rows(x: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row affine quantisation of ``x`` (n, m) float: (codes uint8 (n, m) in [0, 2^bits - 1],
    qscale float16 (n,), qzero float16 (n,)) with ``|x - (qzero + qscale * code)| <= qscale / 2``.

    ``qzero`` = largest fp16 <= the row min, ``qscale`` = smallest fp16 >= (max - qzero) / levels, so
    the grid covers the row; a constant row gets qscale 0 (or one fp16 step) and decodes exactly (or
    within it). Raises ValueError for non-finite values or a range beyond float16.
    """
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    x = x.float()
    if x.dim() != 2 or x.shape[1] < 1:
        raise ValueError(f"quantize_rows needs (n, m >= 1) values, got {tuple(x.shape)}")
    levels = (1 << bits) - 1
    if not torch.isfinite(x).all():
        raise ValueError("label values to quantise must be finite")
    zero = _fp16_floor(x.min(dim=1).values)
    scale = _fp16_ceil((x.max(dim=1).values - zero.float()) / levels)
    if not (torch.isfinite(zero).all() and torch.isfinite(scale).all()):
        raise ValueError("label values exceed the float16 range of the quantisation parameters")
    s = scale.float()[:, None]
    q = torch.where(s > 0, ((x - zero.float()[:, None]) / torch.where(s > 0, s, 1.0)).round(), 0.0)
    return q.clamp(0, levels).to(torch.uint8).contiguous(), scale.contiguous(), zero.contiguous()


def dequantize_rows(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """``qzero + qscale * code`` per row, in float32 (n, m)."""
    return zero.float()[:, None] + scale.float()[:, None] * codes.float()


def pack4(codes: Tensor) -> Tensor:
    """(n, m) codes in [0, 15] -> (n, ceil(m/2)) uint8: value 2j in the low nibble, 2j+1 in the high one."""
    n, m = codes.shape
    c = codes.to(torch.uint8)
    if m % 2:
        c = torch.cat([c, torch.zeros(n, 1, dtype=torch.uint8)], dim=1)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def unpack4(packed: Tensor, width: int) -> Tensor:
    """Inverse of :func:`pack4`: (n, ceil(width/2)) uint8 -> (n, width) codes."""
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack([lo, hi], dim=2).reshape(packed.shape[0], -1)[:, :width]

"""The shifted-GEMM convolution: "same" convolutions as ``k²`` accumulating GEMMs on channel-major frames.

im2col (:mod:`nflow_np.nn.conv`) copies every input pixel ``k²`` times into a ``(C·k², N·H·W)`` matrix (115 MB
for the 28×28 nets at batch 64), and the GEMM then streams that matrix from memory. Here nothing is copied:
activations live in a **frame** (:class:`Frame`), a ``(C, L)`` array whose flat axis holds the images one
after another, each row of pixels followed by ``p = k // 2`` zeros and each image by ``p`` zero rows, with
``p·(W + p) + p`` zeros in front. A kernel offset ``(i, j)`` is then one constant shift
``δ_ij = (i − p)(W + p) + (j − p)`` along the flat axis, and a convolution is

    y[:, q] = Σ_ij W_ij · x[:, q + δ_ij]        (W_ij = w[:, :, i, j]: C_out × C_in)

for every position ``q`` of ``[start, stop)`` (first to last pixel): ``k²`` GEMMs on column ranges of ``x``,
accumulated into ``y`` with ``β = 1`` (:func:`nflow_np.gemm.gemm`). The zeros between rows and images are
the padding of *both* neighbours (the ring is shared), so the next convolution reads its input with no pad
copy. Outputs at ring positions are garbage (their sums run into the neighbouring row or image); they are
discarded and the ring re-zeroed (:func:`finish`) before a frame is read as a convolution's input.
Backward: ``∂L/∂x[:, q] = Σ_ij W_ijᵀ ∂L/∂y[:, q − δ_ij]`` (opposite shifts) and
``∂L/∂W_ij = Σ_q ∂L/∂y[:, q] x[:, q + δ_ij]ᵀ``, both exact when ``∂L/∂y`` is zero on the ring.
Derivation, the mask argument and why the ring must be zero: ``docs/conv.md#the-shifted-gemm-convolution``.

The columns are processed in chunks (:func:`chunk_columns`) so that a chunk of the output and the input
columns it reads stay in the core's cache across the ``k²`` products. The pure functions here are the
reference the Numba kernels of ``kernels/conv/numba_frames.py`` replace (through
:func:`nflow_np.backend.fused`): :func:`to_frame`, :func:`from_frame`, :func:`finish`,
:func:`batch_norm_relu`, :func:`batch_norm_relu_backward`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from nflow_np import gemm
from nflow_np.gemm import Blocks

CHUNK_BYTES = 1 << 20
"""Bytes of one chunk's output and input columns together: about half of a core's L2 cache."""

ALIGN = 16
"""Entries a frame's channel rows are padded to a multiple of, and chunk boundaries rounded to: with rows
allocated on 64-byte boundaries (:func:`new_frame`), each chunk's output block then starts on one (float32:
64 bytes, float64: 128), which BLAS writes 3–10 % faster (``docs/conv.md#speed``)."""


@dataclasses.dataclass(frozen=True)
class Frame:
    """Where the pixels of an ``(N, C, H, W)`` batch live in a ``(C, length)`` frame, for odd kernel size ``k``.

    Pixel ``(n, h, w)`` of every channel sits at ``lead + n·image + h·row + w`` with ``p = k // 2``,
    ``row = W + p``, ``image = (H + p)·row`` and ``lead = p·row + p``; every other entry (the ``lead`` zeros,
    the last ``p`` entries of each row, the last ``p`` rows of each image) is the **ring**, zero in a clean
    frame. ``end = lead + N·image``, and ``length`` is ``end`` rounded up to a multiple of :data:`ALIGN` (the
    entries past ``end`` are ring too); the pixels span ``[start, stop)``, ``start = lead``.
    """

    n: int
    h: int
    w: int
    k: int

    @property
    def p(self) -> int:
        return self.k // 2

    @property
    def row(self) -> int:
        return self.w + self.p

    @property
    def image(self) -> int:
        return (self.h + self.p) * self.row

    @property
    def lead(self) -> int:
        return self.p * self.row + self.p

    @property
    def end(self) -> int:
        return self.lead + self.n * self.image

    @property
    def length(self) -> int:
        return -(-self.end // ALIGN) * ALIGN

    @property
    def start(self) -> int:
        return self.lead

    @property
    def stop(self) -> int:
        return self.lead + (self.n - 1) * self.image + (self.h - 1) * self.row + self.w

    @property
    def pixel_count(self) -> int:
        return self.n * self.h * self.w

    def offsets(self) -> list[tuple[int, int, int]]:
        """``(i, j, δ_ij)`` for every kernel offset, ``δ_ij = (i − p)·row + (j − p)``."""
        p = self.p
        return [(i, j, (i - p) * self.row + (j - p)) for i in range(self.k) for j in range(self.k)]

    def grid(self, frame: np.ndarray) -> np.ndarray:
        """The view ``(C, N, H + p, W + p)`` of ``frame[:, lead:end]``: pixels top left, ring right and below."""
        return frame[:, self.lead : self.end].reshape(frame.shape[0], self.n, self.h + self.p, self.row)

    def pixels(self, frame: np.ndarray) -> np.ndarray:
        """The view ``(C, N, H, W)`` of the pixels of ``frame``."""
        return self.grid(frame)[:, :, : self.h, : self.w]


def frame_of(x_shape: tuple[int, ...], k: int) -> Frame:
    """The :class:`Frame` of an ``(N, C, H, W)`` batch for kernel size ``k``."""
    n, _, h, w = x_shape
    return Frame(int(n), int(h), int(w), int(k))


def chunk_columns(frame: Frame, channels: int, itemsize: int) -> int:
    """Columns per chunk: :data:`CHUNK_BYTES` over the bytes of one column of input and output channels."""
    return max(64, CHUNK_BYTES // max(1, channels * itemsize))


def _chunks(frame: Frame, chunk: int) -> list[tuple[int, int]]:
    """``[start, stop)`` in column ranges of about ``chunk``, as equal as can be (no short last one).

    For chunks of at least ``4·ALIGN`` columns the inner boundaries are rounded to multiples of :data:`ALIGN`,
    each moves by at most ``ALIGN / 2``, so a chunk may be up to ``ALIGN`` columns longer than ``chunk``;
    smaller chunks are exact.
    """
    total = frame.stop - frame.start
    if total <= 0:
        return []
    count = -(-total // chunk)
    bounds = [frame.start + total * i // count for i in range(count + 1)]
    if chunk >= 4 * ALIGN:
        bounds[1:-1] = [(b + ALIGN // 2) // ALIGN * ALIGN for b in bounds[1:-1]]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _widest(spans: list[tuple[int, int]]) -> int:
    return max((b - a for a, b in spans), default=1)


def new_frame(channels: int, frame: Frame, dtype: np.dtype | type, zero: bool = False) -> np.ndarray:
    """A C-contiguous ``(channels, frame.length)`` array whose rows start on 64-byte boundaries.

    Uninitialised (``np.empty``), or zeros with ``zero=True``; a view into a slightly larger allocation
    (``frame.length`` is a multiple of :data:`ALIGN`, so every row is aligned when the first is).
    """
    dtype = np.dtype(dtype)
    size, spare = channels * frame.length, 64 // dtype.itemsize
    flat = (np.zeros if zero else np.empty)(size + spare, dtype=dtype)
    offset = (-flat.ctypes.data % 64) // dtype.itemsize
    return flat[offset : offset + size].reshape(channels, frame.length)


# -- layout: NCHW ↔ frame (references of the kernels "frame.to", "frame.from", "frame.finish") --------------------
def to_frame(x: np.ndarray, frame: Frame) -> np.ndarray:
    """``x: (N, C, H, W)`` as a clean ``(C, frame.length)`` frame (zero ring)."""
    out = new_frame(x.shape[1], frame, x.dtype, zero=True)
    frame.pixels(out)[...] = x.transpose(1, 0, 2, 3)
    return out


def from_frame(y: np.ndarray, frame: Frame, bias: np.ndarray | None = None) -> np.ndarray:
    """The pixels of ``y: (C, length)`` as a new ``(N, C, H, W)`` array, plus ``bias: (C,)`` if given."""
    c = y.shape[0]
    out = np.empty_like(y, shape=(frame.n, c, frame.h, frame.w))
    if bias is None:
        out.transpose(1, 0, 2, 3)[...] = frame.pixels(y)
    else:
        np.add(frame.pixels(y), bias[:, None, None, None], out=out.transpose(1, 0, 2, 3))
    return out


def finish(y: np.ndarray, frame: Frame, bias: np.ndarray | None = None, skip: np.ndarray | None = None) -> np.ndarray:
    """In place: the pixels of ``y`` become ``(y + bias) + skip``, every ring entry 0; returns ``y``.

    What turns a convolution's raw output (garbage on the ring) into a clean frame, with the bias and a
    residual connection's skip (a clean frame of the same shape) added on the way.
    """
    y[:, : frame.lead] = 0
    y[:, frame.end :] = 0
    grid = frame.grid(y)
    inner = grid[:, :, : frame.h, : frame.w]
    if bias is not None:
        inner += bias[:, None, None, None]
    if skip is not None:
        inner += frame.pixels(skip)
    grid[:, :, : frame.h, frame.w :] = 0
    grid[:, :, frame.h :, :] = 0
    return y


# -- the convolution ------------------------------------------------------------------------------------------------
def pixel_major(x: np.ndarray) -> np.ndarray:
    """A frame ``x: (C, length)`` as the C-contiguous ``(length, C)``: each position's channels side by side."""
    return np.ascontiguousarray(x.T)


def stack_weights(w: np.ndarray) -> np.ndarray:
    """``w: (C_out, C_in, k, k)`` as ``(k, k, C_out, C_in)``, C-contiguous: ``W_ij`` is one contiguous matrix."""
    return np.ascontiguousarray(w.transpose(2, 3, 0, 1))


THIN_CHANNELS = 16
"""A convolution with fewer input or output channels than this is computed by a gather (:func:`method_for`)."""

METHODS = ("shifted", "gather_input", "gather_output")


def method_for(c_in: int, c_out: int, k: int) -> str:
    """How :func:`conv_forward` and :func:`conv_backward` compute a ``c_in → c_out`` convolution of size ``k``.

    - ``"shifted"``: ``k²`` products ``W_ij · x[:, a+δ : b+δ]`` per chunk (inner dimension ``C_in``, rows
      ``C_out``), the default;
    - ``"gather_input"`` when ``C_in`` is thin (under :data:`THIN_CHANNELS`, and ``C_in ≤ C_out``): the chunk's
      ``k²`` shifted input blocks are copied into one ``(k² C_in, b − a)`` matrix (a chunked im2col, small
      because ``C_in`` is), and each pass is one product with inner dimension ``k² C_in``;
    - ``"gather_output"`` when ``C_out`` is thin: one product with ``k² C_out`` rows computes every offset's
      unshifted partial output, and the shifted blocks are summed (the adjoint of the gather).

    A product with 2 to 8 rows or inner columns (the first and last convolutions of a coupling net) runs at a
    fraction of the GEMM rate; the gathers give it ``k²`` times as many (``docs/conv.md#thin-convolutions``).
    """
    if k == 1 or min(c_in, c_out) >= THIN_CHANNELS:
        return "shifted"
    return "gather_input" if c_in <= c_out else "gather_output"


def _deltas(frame: Frame) -> list[int]:
    """The shifts ``δ_r`` of :meth:`Frame.offsets`, in offset order ``r = i·k + j``."""
    return [d for _, _, d in frame.offsets()]


def _weight_offsets(frame: Frame, c_out: int, c_in: int) -> list[tuple[int, int]]:
    """``(where W_ij starts in wk's flat data, δ_ij)`` for every offset ``r = i·k + j``: the shifted products'
    block addresses (:class:`~nflow_np.gemm.Blocks` names blocks by flat index)."""
    return [((i * frame.k + j) * c_out * c_in, d) for i, j, d in frame.offsets()]


def _halo(frame: Frame) -> int:
    """``h = p·row + p``, the largest ``|δ_ij|``: a chunk ``[a, b)`` reads columns ``[a − h, b + h)``."""
    return frame.p * frame.row + frame.p


def _gather(out: np.ndarray, src: np.ndarray, deltas: list[int], a: int, b: int, sign: int) -> None:
    """``out[r·C : (r+1)·C, : b − a] = src[:, a + sign·δ_r : b + sign·δ_r]`` for every offset ``r = i·k + j``
    (``deltas``: the ``δ_r`` of :meth:`Frame.offsets`)."""
    c = src.shape[0]
    for r, d in enumerate(deltas):
        out[r * c : (r + 1) * c, : b - a] = src[:, a + sign * d : b + sign * d]


def _shift_sum(out: np.ndarray, z: np.ndarray, deltas: list[int], h: int, c: int, n: int, sign: int,
               beta: float) -> None:  # fmt: skip
    """``out (+)= Σ_r z[r·C : (r+1)·C, h + sign·δ_r : h + sign·δ_r + n]``, the adjoint of :func:`_gather`.

    ``z`` holds the columns ``[a − h, b + h)`` of ``k²`` partial outputs (column ``h`` is position ``a``, ``h``
    the :func:`_halo`), so the block of offset ``r`` read at ``q + sign·δ_r`` starts at column ``h + sign·δ_r``.
    """
    for r, d in enumerate(deltas):
        block = z[r * c : (r + 1) * c, h + sign * d : h + sign * d + n]
        if r == 0 and beta == 0:
            out[...] = block
        else:
            out += block


def _flat_weights(wk: np.ndarray) -> np.ndarray:
    """``wk: (k, k, C_out, C_in)`` as ``(C_out, k² C_in)``, ``[o, r·C_in + c] = W_r[o, c]``: the gathered input's
    filter matrix (``wk`` itself, read as ``(k² C_out, C_in)``, is the gathered output's)."""
    k, _, c_out, c_in = wk.shape
    return np.ascontiguousarray(wk.transpose(2, 0, 1, 3)).reshape(c_out, k * k * c_in)


def conv_forward(x: np.ndarray, wk: np.ndarray, frame: Frame, out: np.ndarray | None = None,
                 beta: float = 0.0, chunk: int | None = None, method: str | None = None) -> np.ndarray:  # fmt: skip
    """``out[:, q] ← Σ_ij W_ij x[:, q + δ_ij] (+ out[:, q] when beta = 1)`` for ``q ∈ [start, stop)``.

    Parameters
    ----------
    x : array, shape (C_in, length)
        A clean frame (zero ring: the mask argument of ``docs/conv.md``).
    wk : array, shape (k, k, C_out, C_in)
        :func:`stack_weights` of the filter.
    frame : Frame
    out : array, shape (C_out, length), optional
        Where to write (a new array when omitted); only the columns ``[start, stop)`` are written.
    beta : {0, 1}
        ``1`` adds to what ``out`` holds there.
    chunk : int, optional
        Columns per chunk (:func:`chunk_columns` when omitted).
    method : {"shifted", "gather_input", "gather_output"}, optional
        :func:`method_for` the shape when omitted; all three compute the same sums.

    Returns
    -------
    array, shape (C_out, length)
        Correct at the pixels; garbage on the ring inside ``[start, stop)``, untouched outside it.

    Notes
    -----
    Every array is C-contiguous: the products address their blocks by pointer arithmetic
    (:class:`~nflow_np.gemm.Blocks`).
    """
    k, _, c_out, c_in = wk.shape
    method = method or method_for(c_in, c_out, k)
    if out is None:
        out = new_frame(c_out, frame, x.dtype)
    if method == "gather_input":  # out[:, a:b] = W_flat · [x[:, a+δ_r : b+δ_r]]_r
        chunk = chunk or chunk_columns(frame, k * k * c_in + c_out, x.itemsize)
        w_flat, spans, deltas = _flat_weights(wk), _chunks(frame, chunk), _deltas(frame)
        cols = np.empty_like(x, shape=(k * k * c_in, _widest(spans)))
        product = Blocks(w_flat, cols, out)
        for a, b in spans:
            _gather(cols, x, deltas, a, b, +1)
            product(c_out, b - a, k * k * c_in, 0, 0, a, beta)
        return out
    if method == "gather_output":  # z = W_stack · x[:, a−h : b+h], out[:, q] = Σ_r z_r[:, q + δ_r]
        chunk = chunk or chunk_columns(frame, k * k * c_out + c_in, x.itemsize)
        h, spans, deltas = _halo(frame), _chunks(frame, chunk), _deltas(frame)
        z = np.empty_like(x, shape=(k * k * c_out, _widest(spans) + 2 * h))
        product = Blocks(wk, x, z)
        for a, b in spans:
            product(k * k * c_out, b - a + 2 * h, c_in, 0, a - h, 0, 0.0)
            _shift_sum(out[:, a:b], z, deltas, h, c_out, b - a, +1, beta)
        return out
    chunk = chunk or chunk_columns(frame, c_in + c_out, x.itemsize)
    product = Blocks(wk, x, out)  # W_ij @ x[:, a + d : b + d] into out[:, a:b], by flat indices
    offsets = _weight_offsets(frame, c_out, c_in)
    for a, b in _chunks(frame, chunk):
        for index, (w_at, d) in enumerate(offsets):
            product(c_out, b - a, c_in, w_at, a + d, a, beta if index == 0 else 1.0)
    return out


def conv_backward(d_y: np.ndarray, x: np.ndarray, wk: np.ndarray, frame: Frame, d_x: np.ndarray | None = None,
                  beta: float = 0.0, input_grad: bool = True, chunk: int | None = None,
                  method: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:  # fmt: skip
    """``(∂L/∂W_ij, ∂L/∂x)`` from ``∂L/∂y``, in one pass over the chunks of ``[start, stop)``.

    ``∂L/∂W_ij = Σ_q d_y[:, q] x[:, q + δ_ij]ᵀ`` and ``∂L/∂x[:, q] (+)= Σ_ij W_ijᵀ d_y[:, q − δ_ij]``.

    Parameters
    ----------
    d_y : array, shape (C_out, length)
        A clean frame: zero on the ring (the gradient of the discarded outputs), so that the sums over
        ``q`` may run over ring positions too.
    x : array, shape (C_in, length)
        The forward pass's (clean) input frame.
    wk : array, shape (k, k, C_out, C_in)
    frame : Frame
    d_x : array, shape (C_in, length), optional
        Where ``∂L/∂x`` goes (new when omitted); ``beta = 1`` adds to it (a residual connection's gradient).
    input_grad : bool
        ``False`` skips ``∂L/∂x`` (returns ``None`` for it).
    chunk : int, optional
    method : {"shifted", "gather_input", "gather_output"}, optional
        As for :func:`conv_forward`.

    Returns
    -------
    d_wk : array, shape (k, k, C_out, C_in)
    d_x : array, shape (C_in, length) or None
        Correct at the pixels; garbage on the ring inside ``[start, stop)``.

    Notes
    -----
    Every array is C-contiguous, as for :func:`conv_forward`. With NumPy's OpenBLAS the weight gradient reads
    ``x`` pixel-major (:func:`pixel_major`, one transposed copy), which OpenBLAS runs faster for its 64×64-output
    products; MKL is faster reading ``x`` itself, transposed (``docs/conv.md#speed``).
    """
    k, _, c_out, c_in = wk.shape
    method = method or method_for(c_in, c_out, k)
    if input_grad and d_x is None:
        d_x = new_frame(c_in, frame, x.dtype)
    if method == "gather_input":
        return _gather_input_backward(d_y, x, wk, frame, d_x, beta, input_grad, chunk)
    if method == "gather_output":
        return _gather_output_backward(d_y, x, wk, frame, d_x, beta, input_grad, chunk)
    d_wk = np.empty_like(wk, shape=wk.shape)
    chunk = chunk or chunk_columns(frame, c_in + c_out, x.itemsize)
    if gemm.get_engine() == "mkl":
        weight_grad = Blocks(d_y, x, d_wk, trans_b=True)  # d_y[:, a:b] @ x[:, a + d : b + d]ᵀ into d_wk[i, j]
        x_at = 1
    else:
        x_pixels = pixel_major(x)  # (length, C_in): the weight gradient's operand (measured faster, docs/conv.md)
        weight_grad = Blocks(d_y, x_pixels, d_wk)  # d_y[:, a:b] @ x_pixels[a + d : b + d] into d_wk[i, j]
        x_at = c_in
    input_grad_product = Blocks(wk, d_y, d_x, trans_a=True) if input_grad else None  # W_ijᵀ @ d_y[:, a − d : b − d]
    offsets = _weight_offsets(frame, c_out, c_in)
    for number, (a, b) in enumerate(_chunks(frame, chunk)):
        for w_at, d in offsets:
            weight_grad(c_out, c_in, b - a, a, (a + d) * x_at, w_at, 0.0 if number == 0 else 1.0)
        if input_grad:
            for index, (w_at, d) in enumerate(offsets):
                input_grad_product(c_in, b - a, c_out, w_at, a - d, a, beta if index == 0 else 1.0)
    return d_wk, (d_x if input_grad else None)


def _gather_input_backward(d_y: np.ndarray, x: np.ndarray, wk: np.ndarray, frame: Frame, d_x: np.ndarray | None,
                           beta: float, input_grad: bool,
                           chunk: int | None) -> tuple[np.ndarray, np.ndarray | None]:  # fmt: skip
    """:func:`conv_backward` for a thin input: per chunk, with ``X = [x[:, a+δ_r : b+δ_r]]_r`` (the forward's
    gather), ``∂W_flat += d_y[:, a:b] · Xᵀ`` and ``z = W_flatᵀ · d_y[:, a−h : b+h]``,
    ``∂x[:, q] (+)= Σ_r z_r[:, q − δ_r]``."""
    k, _, c_out, c_in = wk.shape
    chunk = chunk or chunk_columns(frame, k * k * c_in + c_out, x.itemsize)
    spans, deltas = _chunks(frame, chunk), _deltas(frame)
    h, width = _halo(frame), _widest(spans)
    w_flat = _flat_weights(wk)
    d_flat = np.zeros_like(w_flat)
    cols = np.empty_like(x, shape=(k * k * c_in, width))
    z = np.empty_like(x, shape=(k * k * c_in, width + 2 * h)) if input_grad else None
    weight_grad = Blocks(d_y, cols, d_flat, trans_b=True)
    spread = Blocks(w_flat, d_y, z, trans_a=True) if input_grad else None
    for number, (a, b) in enumerate(spans):
        _gather(cols, x, deltas, a, b, +1)
        weight_grad(c_out, k * k * c_in, b - a, a, 0, 0, 0.0 if number == 0 else 1.0)
        if input_grad:
            spread(k * k * c_in, b - a + 2 * h, c_out, 0, a - h, 0, 0.0)
            _shift_sum(d_x[:, a:b], z, deltas, h, c_in, b - a, -1, beta)
    d_wk = np.ascontiguousarray(d_flat.reshape(c_out, k, k, c_in).transpose(1, 2, 0, 3))
    return d_wk, (d_x if input_grad else None)


def _gather_output_backward(d_y: np.ndarray, x: np.ndarray, wk: np.ndarray, frame: Frame, d_x: np.ndarray | None,
                            beta: float, input_grad: bool,
                            chunk: int | None) -> tuple[np.ndarray, np.ndarray | None]:  # fmt: skip
    """:func:`conv_backward` for a thin output: per chunk, with ``D = [d_y[:, a−δ_r : b−δ_r]]_r``,
    ``∂W_stack += D · x[:, a:b]ᵀ`` and ``∂x[:, a:b] (+)= W_stackᵀ · D`` (one gather for both)."""
    k, _, c_out, c_in = wk.shape
    chunk = chunk or chunk_columns(frame, k * k * c_out + c_in, x.itemsize)
    d_wk, spans, deltas = np.zeros_like(wk), _chunks(frame, chunk), _deltas(frame)
    cols = np.empty_like(d_y, shape=(k * k * c_out, _widest(spans)))
    weight_grad = Blocks(cols, x, d_wk, trans_b=True)  # d_wk read as (k² C_out, C_in)
    spread = Blocks(wk, cols, d_x, trans_a=True) if input_grad else None
    for number, (a, b) in enumerate(spans):
        _gather(cols, d_y, deltas, a, b, -1)
        weight_grad(k * k * c_out, c_in, b - a, 0, a, 0, 0.0 if number == 0 else 1.0)
        if input_grad:
            spread(c_in, b - a, k * k * c_out, 0, 0, a, beta)
    return d_wk, (d_x if input_grad else None)


# -- batch norm + ReLU on frames (references of "frame.batch_norm_relu" and its backward) ---------------------------
def _channel(v: np.ndarray) -> np.ndarray:
    return v[:, None, None, None]


def batch_norm_relu(t: np.ndarray, frame: Frame, bias: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float,
                    mean: np.ndarray | None = None,
                    var: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """``u = ReLU(γ ⊙ (x − μ) / √(σ² + ε) + β)`` with ``x = t + bias`` at the pixels; a clean frame.

    :class:`~nflow_np.flows.normalization.BatchNorm`'s forward (per channel) followed by the ReLU, on a
    convolution's raw output ``t`` (its ring is never read). ``μ, σ²``: the batch's mean and biased variance
    over the ``N·H·W`` pixels of each channel when not given (training mode), else the given running averages.

    Parameters
    ----------
    t : array, shape (C, length)
    frame : Frame
    bias, gamma, beta : array, shape (C,)
        The convolution's bias, ``γ = exp(log γ)`` and ``β``.
    eps : float
    mean, var : array, shape (C,), optional

    Returns
    -------
    u : array, shape (C, length)
        Clean.
    mean, var : array, shape (C,)
        The statistics used.
    """
    x = frame.pixels(t) + _channel(bias)
    if mean is None:
        mean, var = x.mean(axis=(1, 2, 3)), x.var(axis=(1, 2, 3))
    inv_std = 1 / np.sqrt(var + eps)
    z = (x - _channel(mean)) * _channel(inv_std) * _channel(gamma) + _channel(beta)
    u = new_frame(t.shape[0], frame, t.dtype, zero=True)
    frame.pixels(u)[...] = z * (z > 0)
    return u, mean, var


def batch_norm_relu_backward(d_u: np.ndarray, t: np.ndarray, frame: Frame, bias: np.ndarray, gamma: np.ndarray,
                             beta: np.ndarray, mean: np.ndarray, inv_std: np.ndarray,
                             training: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """``∂L/∂t`` (a clean frame) and the sums the parameter gradients need, from ``∂L/∂u`` (pixels read only).

    With ``x̂ = (t + bias − μ) · inv_std``, ``z = γ x̂ + β`` and ``d_z = d_u ⊙ [z > 0]`` (the ReLU), batch
    norm's backward (``docs/images.md#batch-normalisation``, ``d_logdet = 0``), over the ``M = N·H·W`` pixels
    of each channel: training mode ``∂L/∂t = inv_std · (γ d_z − mean(γ d_z) − x̂ · mean(γ d_z ⊙ x̂))``,
    evaluation mode ``∂L/∂t = γ d_z · inv_std``.

    Returns
    -------
    d_t : array, shape (C, length)
        Clean.
    sum_d_z, sum_d_z_x_hat, sum_d_t : array, shape (C,)
        ``Σ d_z`` (``∂L/∂β``), ``Σ d_z ⊙ x̂`` (``∂L/∂log γ`` over ``γ``), ``Σ ∂L/∂t`` (the bias's gradient).
    """
    x_hat = (frame.pixels(t) + _channel(bias) - _channel(mean)) * _channel(inv_std)
    z = x_hat * _channel(gamma) + _channel(beta)
    d_z = frame.pixels(d_u) * (z > 0)
    axes = (1, 2, 3)
    sum_d_z, sum_d_z_x_hat = d_z.sum(axis=axes), (d_z * x_hat).sum(axis=axes)
    d_x_hat = d_z * _channel(gamma)
    if training:
        d_x = d_x_hat - d_x_hat.mean(axis=axes, keepdims=True)
        d_x -= x_hat * (d_x_hat * x_hat).mean(axis=axes, keepdims=True)
        d_x *= _channel(inv_std)
    else:
        d_x = d_x_hat * _channel(inv_std)
    d_t = new_frame(d_u.shape[0], frame, t.dtype, zero=True)
    frame.pixels(d_t)[...] = d_x
    return d_t, sum_d_z, sum_d_z_x_hat, d_x.sum(axis=axes)

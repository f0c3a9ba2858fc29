"""The convolutional coupling nets' data movement and elementwise passes: im2col/col2im, and the frame passes.

References (the specification; pointers only, this package never imports them):
``nflow_np/nn/conv.py``, functions ``im2col`` and ``col2im``; fused under ``"im2col"`` and ``"col2im"``;
``nflow_np/nn/shifted.py``, functions ``to_frame``, ``from_frame``, ``finish``, ``batch_norm_relu``,
``batch_norm_relu_backward``; fused under ``"frame.to"``, ``"frame.from"``, ``"frame.finish"``,
``"frame.batch_norm_relu"`` and ``"frame.batch_norm_relu_backward"``.

- ``numba_cpu``     im2col / col2im, the reference's bits; in no backend's record (``nflow_np/backend.py``)
  until it is measured faster (``docs/conv.md#speed``)
- ``numba_frames``  backend ``"numba"``: the shifted-GEMM ResNet's passes on channel-major frames, batch norm,
  ReLU, bias, skip and ring fused per channel (``docs/conv.md#the-resnet-on-frames``)

Tests: ``tests/kernels/conv/`` (``test_numba_cpu.py``, ``test_numba_frames.py``). Timings:
``python -m benchmarks.bench_conv``.
"""

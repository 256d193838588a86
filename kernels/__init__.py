"""mechgpu.kernels: every @triton.jit kernel of mechgpu and the thin launchers that take torch tensors.

Installed as ``mechgpu.kernels`` (the source lives in the top-level ``kernels/`` folder).
This package knows nothing of ``mechgpu``; data flows one way.
"""

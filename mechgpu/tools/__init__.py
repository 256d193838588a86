"""mechgpu's tools, apart from the library (optim, nn, clip, init, diagnostics, train): the
``mechgpu`` commands' implementations (``mechgpu check`` is ``mechgpu.testing.check``).

* ``bench``: ``mechgpu bench``, the benchmark runner, its merged results and the README section;
* ``jobs``: ``mechgpu train`` (the main job) and ``mechgpu profile``;
* ``demo`` and ``flow``: ``mechgpu demo`` and ``mechgpu flow``.
"""

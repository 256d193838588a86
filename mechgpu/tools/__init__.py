"""mechgpu's tools, apart from the library (optim, nn, clip, init, diagnostics, train): the
``mechgpu`` commands' implementations (``mechgpu check`` is ``mechgpu.testing.check``).

* ``bench``: ``mechgpu bench``, the benchmark runner, its merged results and the README section;
* ``tour``: ``mechgpu tour``, the main job;
* ``jobs``: ``mechgpu train``, ``mechgpu profile`` and ``mechgpu fit``, on ``gpt``'s character GPT
  and stdlib corpus;
* ``demo`` and ``flow``: ``mechgpu demo`` and ``mechgpu flow``.
"""

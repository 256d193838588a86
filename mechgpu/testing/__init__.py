"""The correctness case database and its runners (``mechgpu check`` and the tests).

* ``compare``: rows, errors, the pass rule and every tolerance;
* ``oracles``: float64 references (activations, init distributions);
* ``registry``: ``Case`` records and the ``Context`` a case runs in;
* ``optim_cases`` (the optimizer table ``OPTIMIZERS``), ``clip_cases``, ``activation_cases``,
  ``init_cases``: the case families;
* ``environment``: triton's version, the device, driver and library versions;
* ``check``: ``mechgpu check`` (running the cases, the table, the JSON, the command line).
"""
